"""Shared constructor plumbing of the Gauss-Newton family (private).

Every method validates its arguments the same way as :func:`gaussnewton.egn` and is assembled as a
:class:`~gaussnewton.optimizer.GaussNewtonOptimizer` around its own ``direction_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gaussnewton import _validate as v
from gaussnewton.damping import AdaptiveDamping, ConstantDamping
from gaussnewton.linesearch import Armijo, is_step_size_rule
from gaussnewton.losses import Loss, get_loss
from gaussnewton.optimizer import GaussNewtonOptimizer

__all__ = ["check_common", "assemble", "check_int", "make_method"]


def _policy(damping_policy, damping):
    """The damping rule of a ``damping_policy`` argument: a :class:`~gaussnewton.DampingRule`, a
    stateless :class:`~gaussnewton.DampingPolicy` (wrapped by the step loop), or
    :class:`~gaussnewton.ConstantDamping` with the schedule for ``"constant"`` / a schedule."""
    if isinstance(damping_policy, str) and damping_policy == "constant":
        policy = ConstantDamping()
    elif isinstance(damping_policy, str) and damping_policy == "adaptive":
        policy = AdaptiveDamping()
    elif hasattr(damping_policy, "update") and hasattr(damping_policy, "on_rejected"):
        if hasattr(damping_policy, "init") != hasattr(damping_policy, "value"):
            raise TypeError(
                f"damping_policy={damping_policy!r} has only one of init / value: a gn.DampingRule "
                "needs init(lam0, dtype), value(state, count=None), update(state, rho, count=None) "
                "and on_rejected(state); a stateless gn.DampingPolicy neither init nor value."
            )
        if not isinstance(getattr(damping_policy, "uses_gain_ratio", None), bool):
            raise TypeError(
                f"damping_policy={damping_policy!r} needs a boolean attribute uses_gain_ratio "
                "(see gn.DampingRule)."
            )
        policy = damping_policy
    elif callable(damping_policy):
        return ConstantDamping(schedule=damping_policy)
    else:
        raise ValueError(
            f"damping_policy={damping_policy!r} is not supported; use 'constant', 'adaptive', "
            "gn.AdaptiveDamping(...), a gn.DampingRule (or stateless gn.DampingPolicy) or a "
            "schedule count -> λ."
        )
    if policy.uses_gain_ratio and callable(damping):
        raise ValueError(
            "damping_policy='adaptive' adapts λ itself: pass a number as damping (its start value), "
            "not a schedule."
        )
    if isinstance(policy, ConstantDamping) and policy.schedule is None and callable(damping):
        policy = ConstantDamping(schedule=damping)  # a constant rule given a λ schedule
    return policy


def _line_search(line_search):
    """A ``line_search`` argument: ``None`` (the fixed step), a :class:`~gaussnewton.StepSizeRule`
    or a stateless :class:`~gaussnewton.LineSearch` (kept as given), or ``"armijo"``."""
    if line_search is None or is_step_size_rule(line_search):
        return line_search
    if hasattr(line_search, "search"):  # the stateless gn.LineSearch protocol
        return line_search
    if line_search == "armijo":
        return Armijo()
    raise ValueError(
        f"line_search={line_search!r} is not supported; use None, 'armijo', gn.Armijo(...), "
        "gn.FixedStep() or a gn.StepSizeRule."
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
    axis_name: Any = None,
) -> GaussNewtonOptimizer:
    """The :class:`GaussNewtonOptimizer` of a method (policies resolved as in :func:`egn`)."""
    policy = _policy(damping_policy, damping)
    if callable(damping_policy) and not hasattr(damping_policy, "update"):
        v.check_number(
            "damping_policy",
            damping_policy,
            strict=not loss_obj.identity_curvature,
            hint="a λ schedule must give λ > 0 (λ = 0 is allowed for squared error).",
        )
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
        axis_name=axis_name,
    )


def check_axis_name(axis_name: Any) -> Any:
    """``axis_name`` of a step run inside ``shard_map``: ``None``, a name or a tuple of names."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if axis_name is not None and not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"axis_name={axis_name!r}: give the mesh axis name (or a tuple of names) over which "
            "the batch is split inside jax.shard_map, e.g. axis_name='data'; None (default) when "
            "the step sees the whole batch (one device, or jit with sharded inputs)."
        )
    return axis_name


def make_method(
    name: str,
    model_fn: Callable,
    direction_fn: Callable,
    *,
    loss: Any,
    learning_rate: Any = 1.0,
    damping: Any = 1e-3,
    damping_policy: Any = "adaptive",
    line_search: Any = "armijo",
    momentum: float = 0.0,
    tx: Any = None,
    init_method_state: Callable | None = None,
) -> GaussNewtonOptimizer:
    r"""A new method from public pieces: a direction function plus the family's step loop.

    ``direction_fn(fn, params, x, y, λ, key, method_state) -> gn.Direction`` (see
    :class:`~gaussnewton.Direction`; :func:`gaussnewton.linearize` gives the loss, ``g`` and the
    VJP of the batch); the step size (``line_search``: ``None``, ``"armijo"``, a
    :class:`~gaussnewton.StepSizeRule` such as :class:`~gaussnewton.Armijo` or
    :class:`~gaussnewton.FixedStep`, or a stateless :class:`~gaussnewton.LineSearch`), the
    damping (``damping_policy``: ``"constant"``, ``"adaptive"``, a schedule, a
    :class:`~gaussnewton.DampingRule` or a stateless :class:`~gaussnewton.DampingPolicy`),
    momentum, ``tx`` and the non-finite guard are the family's; the rules' states live in
    ``state.step_size`` and ``state.damping``. Arguments are validated as in
    :func:`gaussnewton.egn`.

    Example (a damped gradient method, ``d = −∇L / (1 + λ)``):
        >>> import jax, jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> def damped_gradient(fn, params, x, y, lam, key, state):
        ...     lin = gn.linearize(fn, gn.get_loss("squared_error"), params, x, y)
        ...     grad = lin.grad()
        ...     d = jax.tree_util.tree_map(lambda g: -g / (1 + lam), grad)
        ...     quad = lambda delta: 0.5 * lam * sum(jnp.vdot(u, u) for u in jax.tree_util.tree_leaves(delta))
        ...     return gn.Direction(lin.loss, grad, d, quad, method_state=state, labels_ok=lin.labels_ok)
        >>> opt = gn.make_method("damped_gd", lambda p, x: x @ p, damped_gradient,
        ...                      loss="squared_error", damping_policy="constant", line_search=None)
        >>> p, state, info = jax.jit(opt.step)(jnp.zeros(3), opt.init(jnp.zeros(3)), jnp.ones((4, 3)), jnp.ones(4))
    """
    v.check_callable(
        "direction_fn",
        direction_fn,
        "direction_fn(fn, params, x, y, λ, key, state) -> gn.Direction",
    )
    loss_obj = check_common(model_fn, loss, learning_rate, damping, momentum, tx)
    return assemble(
        name,
        model_fn,
        loss_obj,
        direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=damping_policy,
        line_search=line_search,
        momentum=momentum,
        tx=tx,
        init_method_state=init_method_state,
    )
