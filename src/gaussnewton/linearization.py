r"""One batch linearization shared by every method of the family (docs/METHODS.md §1).

For a model ``fn(params, x) -> f`` (``(b, c)`` outputs; ``(b,)`` is read as ``c = 1``), a loss and
labels, :func:`linearize` computes, with ONE forward pass,

* the outputs ``f`` and the canonical labels (:meth:`~gaussnewton.Loss.prepare_labels`),
* the batch loss ``L = (1/b) Σ_i l(f_i, y_i)``,
* the output gradients ``g = ∂l/∂f`` (``(b, c)``),
* the linear maps of the model at ``params``: ``u ↦ Jᵀu`` (one VJP, any number of times) and,
  with ``mode="linearize"``, ``v ↦ J v`` from the same stored linearization,
* whether the labels are valid (a traced flag: a step on invalid labels is rejected).

The gradient is ``∇L = Jᵀ g / b``; every direction of the family is ``Jᵀ`` of some row-space vector
(a solve of the Gram system, a dual solution, a scaled ``g``), so the methods differ only in the
row-space work between :func:`linearize` and the final VJP. This module is also the one place
that knows the batch axis of the outputs.

Example:
    >>> import jax.numpy as jnp
    >>> from gaussnewton.linearization import linearize
    >>> from gaussnewton.losses import get_loss
    >>> fn = lambda p, x: x @ p["w"]
    >>> lin = linearize(fn, get_loss("squared_error"), {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)),
    ...                 jnp.zeros((4, 2)))
    >>> lin.outputs.shape, float(lin.loss)
    ((4, 2), 9.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from gaussnewton import _validate as v
from gaussnewton._sharding import NO_AXIS, BatchAxis
from gaussnewton.gram import as_2d
from gaussnewton.losses import Loss

PyTree = Any

__all__ = ["BatchLinearization", "linearize", "with_output_axis"]


class BatchLinearization(NamedTuple):
    """The model and loss linearized at ``params`` on one batch (see the module docstring)."""

    outputs: jax.Array  # f, (b, c)
    labels: Any  # canonical labels
    loss: jax.Array  # L (mean over the batch)
    g: jax.Array  # ∂l/∂f, (b, c)
    vjp: Callable[[jax.Array], PyTree]  # u (b, c) -> Jᵀ u
    jvp: Callable[[PyTree], jax.Array] | None  # v -> J v (mode="linearize" only)
    labels_ok: jax.Array  # bool scalar
    axis: BatchAxis = NO_AXIS  # the batch axis inside shard_map (outputs, g: local blocks)

    @property
    def batch_size(self) -> int:
        """``b``, the examples of the whole batch (over every device of ``axis``)."""
        return self.outputs.shape[0] * self.axis.size()

    def grad(self) -> PyTree:
        """``∇L = Jᵀ g / b`` (one VJP)."""
        return self.vjp((self.g / self.batch_size).astype(self.outputs.dtype))


def with_output_axis(fn: Callable) -> Callable:
    """``fn`` with ``(b,)`` outputs read as ``(b, 1)``; ``(b, c)`` and per-token ``(b, *tok, c)``
    outputs pass unchanged."""

    def fn_b(p, xx):
        out = fn(p, xx)
        return out[:, None] if out.ndim == 1 else out

    return fn_b


def _labels_ok(loss: Loss, f: jax.Array, y: Any) -> jax.Array:
    check = getattr(loss, "labels_valid", None)
    return jnp.asarray(True) if check is None else jnp.asarray(check(f, y), bool)


def linearize(
    fn: Callable,
    loss: Loss,
    params: PyTree,
    x: PyTree,
    y: Any,
    *,
    mode: Literal["vjp", "linearize"] = "vjp",
    tokens: bool = False,
    axis: BatchAxis = NO_AXIS,
) -> BatchLinearization:
    """Outputs, loss, ``g`` and the linear maps of ``fn`` at ``params`` on ``(x, y)``.

    ``mode="vjp"`` stores the backward pass (``jax.vjp``); ``mode="linearize"`` stores the forward
    linearization (``jax.linearize``) and transposes it, so ``J v`` products need no new forward
    pass (SGN, row-space CG). ``tokens=True`` keeps per-token outputs ``(b, *tok, c)`` (EGN);
    otherwise outputs must be ``(b, c)`` or ``(b,)`` (read as ``(b, 1)``).

    Inside ``shard_map`` with the batch split over ``axis`` (a :class:`~gaussnewton._sharding.
    BatchAxis`), ``x`` and ``y`` are this device's block: the outputs and ``g`` stay local, the
    loss is the mean over the whole batch, ``vjp`` sums over every device (one ``psum`` of the
    ``D``-vector) and ``jvp`` gives this device's rows.
    """
    v.check_params(params)
    fn2 = with_output_axis(fn) if tokens else as_2d(fn)
    local_params = axis.varying(params)  # derivatives of this device's examples only
    if mode == "vjp":
        f, vjp_fn = jax.vjp(lambda p: fn2(p, x), local_params)
        jvp_fn = None

        def vjp(u):
            return axis.sum(vjp_fn(u)[0])

    elif mode == "linearize":
        f, jvp_local = jax.linearize(lambda p: fn2(p, x), local_params)
        transposed = jax.linear_transpose(jvp_local, local_params)

        def vjp(u):
            return axis.sum(transposed(u)[0])

        def jvp_fn(t):
            return jvp_local(axis.varying(t))

    else:  # pragma: no cover - internal misuse
        raise ValueError(f"mode={mode!r}: use 'vjp' or 'linearize'.")
    v.check_batch(x, f)
    labels = loss.prepare_labels(f, y)
    value = axis.mean(jnp.mean(loss.value(f, labels)))
    g = loss.grad(f, labels)
    ok = axis.all(_labels_ok(loss, f, labels))
    return BatchLinearization(f, labels, value, g, vjp, jvp_fn, ok, axis)
