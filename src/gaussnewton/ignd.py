r"""IGND — incremental Gauss-Newton descent (Korbit & Zanon), docs/METHODS.md §4.5. Scalar outputs.

For ONE example the GGN ``q_i j_i j_iᵀ`` has rank one, so by Sherman-Morrison its
Levenberg-Marquardt direction is a scaled gradient:

.. math:: (q_i j_i j_i^\top + λI)^{-1} g_i j_i = \frac{g_i\, j_i}{q_i \|j_i\|^2 + λ}
          = ξ_i ∇_w l_i, \qquad ξ_i = \frac{1}{q_i K_{ii} + λ},

with ``j_i = ∇_w f_i``, ``g_i = l'(f_i)``, ``q_i = l''(f_i)`` and ``K_ii = ‖j_i‖²`` the Gram
DIAGONAL. Mini-batch IGND averages the per-example directions:

.. math:: d = −\tfrac1b J^\top (ξ ⊙ g)  \quad(\text{one VJP}),

so with ``b = 1`` it IS the EGN direction. ``K_ii`` comes from per-example gradient norms (``vmap``
of ``grad``), never from the full ``K``. When ``q_i K_ii + λ = 0`` (then ``g_i j_i = 0`` too, or
``λ = 0`` with a flat loss) that example contributes nothing (``ξ_i := 0``). Adam-style moments:
pass ``tx=optax.scale_by_adam()`` (optax's convention: it receives ``−d``, a gradient-like
update, and its output is subtracted).

Example:
    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 1)) * 0.1}
    >>> from gaussnewton.ignd import ignd
    >>> opt = ignd(fn, loss="squared_error", learning_rate=0.5)
    >>> p, state, info = jax.jit(opt.step)(p, opt.init(p), jnp.ones((8, 3)), jnp.zeros((8,)))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gaussnewton._family import assemble, check_axis_name, check_common
from gaussnewton._sharding import BatchAxis
from gaussnewton._tree import compute_dtype
from gaussnewton.damping import AdaptiveDamping
from gaussnewton.gram import as_2d
from gaussnewton.gram import gram_diagonal as _gram_diagonal
from gaussnewton.linearization import linearize
from gaussnewton.linesearch import Armijo
from gaussnewton.losses import LossLike
from gaussnewton.optimizer import GaussNewtonOptimizer, Linearization, quad_from_factor

PyTree = Any

__all__ = ["ignd", "gram_diagonal"]


def gram_diagonal(model_fn: Callable, params: PyTree, x: PyTree) -> jax.Array:
    r"""``K_ii = ‖∇_w f(w, x)_i‖²`` for a scalar-output ``model_fn`` (2-D ``(b, 1)`` outputs).

    The diagonal of the Gram without forming it (:func:`gaussnewton.gram.gram_diagonal`: per-example
    gradient norms, or rows of the batched Jacobian for a batch-coupled model); shape ``(b,)``, at
    least float32.
    """
    return _gram_diagonal(model_fn, params, x)[:, 0]


def ignd(
    model_fn: Callable,
    *,
    loss: LossLike,
    learning_rate: float | Callable,
    damping: float | Callable = 0.0,
    damping_policy: str | AdaptiveDamping | Callable = "constant",
    line_search: str | Armijo | None = None,
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> GaussNewtonOptimizer:
    r"""IGND: ``d = −(1/b) Jᵀ(ξ ⊙ g)``, ``ξ_i = 1/(q_i K_ii + λ)`` (see the module docstring).

    Args:
        model_fn: scalar-output model, ``(b,)`` or ``(b, 1)`` outputs.
        loss: a loss with one output (``"squared_error"``, ``"sigmoid_binary_cross_entropy"`` or a
            :class:`~gaussnewton.ConvexLoss` of a scalar).
        learning_rate: step size (number or schedule; ``α_max`` with a line search).
        damping: ``λ ≥ 0`` (number or schedule).
        damping_policy, line_search, momentum, tx: as in :func:`gaussnewton.egn` (defaults: constant
            ``λ``, fixed step, no momentum; ``tx=optax.scale_by_adam()`` gives Adam-style moments).
        axis_name: the batch axis inside a user's ``jax.shard_map``, as in :func:`gaussnewton.egn`
            (``K_ii`` and ``ξ`` are per example, so they stay on their device).
    """
    loss_obj = check_common(
        model_fn, loss, learning_rate, damping, momentum, tx, damping_strict=False
    )
    axis = BatchAxis(check_axis_name(axis_name))

    def direction_fn(model, params, x, y, lam, key, method_state):
        del key
        fn = as_2d(model)
        lin = linearize(fn, loss_obj, params, x, y, axis=axis)
        f, y, g = lin.outputs, lin.labels, lin.g
        if f.shape[1] != 1:
            raise ValueError(
                f"ignd needs a scalar-output model (outputs (b,) or (b, 1)), but model_fn returns "
                f"shape {tuple(f.shape)}; use gn.egn for {f.shape[1]} outputs."
            )
        b = lin.batch_size
        dt = compute_dtype(f.dtype)
        q = loss_obj.hessian(f, y)[:, 0, 0].astype(dt)
        den = q * gram_diagonal(fn, axis.varying(params), x).astype(dt) + lam.astype(dt)
        xi = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
        cot = jnp.stack([g / b, (-(xi[:, None] * g.astype(dt)) / b).astype(f.dtype)])
        both = jax.vmap(lin.vjp)(cot)
        grad = jax.tree_util.tree_map(lambda a: a[0], both)
        direction = jax.tree_util.tree_map(lambda a: a[1], both)
        quad = quad_from_factor(fn, params, x, loss_obj.factor(f, y), False, axis=axis)
        return Linearization(
            lin.loss, grad, direction, quad, 0, 0.0, method_state, labels_ok=lin.labels_ok
        )

    return assemble(
        "ignd",
        model_fn,
        loss_obj,
        direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=damping_policy,
        line_search=line_search,
        momentum=momentum,
        tx=tx,
        axis_name=axis_name,
    )
