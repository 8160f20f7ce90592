r"""An optax bridge: a whole Gauss-Newton method as a ``GradientTransformationExtraArgs``.

:func:`as_optax` wraps an optimizer (e.g. :func:`gaussnewton.egn`) that computes its OWN step from
``params`` and the batch: the transform **ignores the incoming updates** and returns
``updates = new_params − params`` (the full step, line search and damping rule included). So
nothing placed *before* it in an ``optax.chain`` has any effect (clipping, weight decay, masking,
``optax.MultiSteps`` accumulation are silently dropped — a chain like that is a mistake); later
links see the Gauss-Newton step. It also works with ``flax.nnx.Optimizer`` (pass ``x=..., y=...``
to ``update``).

The composable form, which preconditions whatever update it receives, is
:func:`gaussnewton.egn_preconditioner`.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gaussnewton as gn
    >>> fn = lambda p, x: x @ p["w"]
    >>> p = {"w": jnp.zeros((3, 1))}
    >>> tx = gn.as_optax(gn.egn(fn, loss="squared_error"))
    >>> state = tx.init(p)
    >>> x, y = jnp.ones((4, 3)), jnp.ones((4,))
    >>> updates, state = tx.update(p, state, p, x=x, y=y)  # the gradient argument is ignored
    >>> p = optax.apply_updates(p, updates)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from gaussnewton.optimizer import (
    GaussNewtonOptimizer,
    GaussNewtonState,
    StepInfo,
    empty_info,
    state_dtype,
)

__all__ = ["as_optax", "GaussNewtonTransformState"]


class GaussNewtonTransformState(NamedTuple):
    """The wrapped optimizer's state and the :class:`StepInfo` of its last step."""

    inner: GaussNewtonState
    info: StepInfo


def as_optax(
    optimizer: GaussNewtonOptimizer, key: jax.Array | None = None
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``optimizer`` (e.g. :func:`gaussnewton.egn`) as an optax transform: an exact LM step.

    ``update(updates, state, params, *, x, y, key=None)`` needs ``params`` and the batch ``(x, y)``
    and returns ``optimizer.step(params, ...)[0] − params``. The incoming ``updates`` are IGNORED
    (only their presence is required by optax's API): transforms chained before this one have no
    effect, and it must not be used inside ``optax.masked`` / ``multi_transform`` /
    ``MultiSteps``. To precondition the incoming update instead (and compose freely), use
    :func:`gaussnewton.egn_preconditioner`.
    """

    def init_fn(params: Any) -> GaussNewtonTransformState:
        inner = optimizer.init(params, key)
        return GaussNewtonTransformState(inner, empty_info(state_dtype(params)))

    def update_fn(updates, state, params=None, *, x=None, y=None, key=None, **extra_args):
        del updates, extra_args
        if params is None or x is None or y is None:
            raise ValueError(
                f"{optimizer.name} as an optax transform needs params and the batch: call "
                "tx.update(grads, state, params, x=x, y=y)."
            )
        new_params, inner, info = optimizer.step(params, state.inner, x, y, key)
        deltas = jax.tree_util.tree_map(lambda a, b: a - b, new_params, params)
        return deltas, GaussNewtonTransformState(inner, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
