"""Shared constructor plumbing of the Gauss-Newton family (private).

Every method validates its arguments the same way as :func:`gaussnewton.egn` and is assembled as a
:class:`~gaussnewton.optimizer.GaussNewtonOptimizer` around its own ``direction_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gaussnewton import _validate as v
from gaussnewton.damping import AdaptiveDamping, _Fixed
from gaussnewton.linesearch import Armijo
from gaussnewton.losses import Loss, get_loss
from gaussnewton.optimizer import GaussNewtonOptimizer

__all__ = ["check_common", "assemble", "check_int"]


def _policy(damping_policy, damping):
    if damping_policy == "constant":
        return _Fixed()
    if damping_policy == "adaptive":
        policy = AdaptiveDamping()
    elif isinstance(damping_policy, AdaptiveDamping):
        policy = damping_policy
    elif callable(damping_policy):
        return _Fixed()
    else:
        raise ValueError(
            f"damping_policy={damping_policy!r} is not supported; use 'constant', 'adaptive', "
            "gn.AdaptiveDamping(...) or a schedule count -> λ."
        )
    if callable(damping):
        raise ValueError(
            "damping_policy='adaptive' adapts λ itself: pass a number as damping (its start value), "
            "not a schedule."
        )
    return policy


def _line_search(line_search):
    if line_search is None or isinstance(line_search, Armijo):
        return line_search
    if line_search == "armijo":
        return Armijo()
    raise ValueError(
        f"line_search={line_search!r} is not supported; use None, 'armijo' or gn.Armijo(...)."
    )


def check_int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    return value


def check_common(
    model_fn: Callable,
    loss: Any,
    learning_rate: Any,
    damping: Any,
    momentum: float,
    tx: Any,
    *,
    damping_strict: bool | None = None,
) -> Loss:
    """Validate the arguments every method shares; return the :class:`Loss` object."""
    v.check_callable("model_fn", model_fn, "model_fn(params, x) -> outputs (b, c) or (b,)")
    loss_obj = get_loss(loss)
    v.check_number("learning_rate", learning_rate, hint="e.g. learning_rate=1.0")
    strict = not loss_obj.identity_curvature if damping_strict is None else damping_strict
    v.check_number(
        "damping",
        damping,
        strict=strict,
        hint="λ must be > 0 for this loss (λ = 0 is allowed for squared error); e.g. damping=1e-3.",
    )
    v.check_momentum(momentum)
    if tx is not None and not hasattr(tx, "update"):
        raise TypeError(f"tx={tx!r} must be an optax GradientTransformation (or None).")
    return loss_obj


def assemble(
    name: str,
    model_fn: Callable,
    loss_obj: Loss,
    direction_fn: Callable,
    *,
    learning_rate: Any,
    damping: Any,
    damping_policy: Any,
    line_search: Any,
    momentum: float,
    tx: Any,
    init_method_state: Callable | None = None,
) -> GaussNewtonOptimizer:
    """The :class:`GaussNewtonOptimizer` of a method (policies resolved as in :func:`egn`)."""
    policy = _policy(damping_policy, damping)
    if callable(damping_policy) and not isinstance(damping_policy, AdaptiveDamping):
        damping = damping_policy
    return GaussNewtonOptimizer(
        model_fn=model_fn,
        loss=loss_obj,
        direction_fn=direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=policy,
        line_search=_line_search(line_search),
        momentum=float(momentum),
        tx=tx,
        name=name,
        init_method_state=init_method_state,
    )
