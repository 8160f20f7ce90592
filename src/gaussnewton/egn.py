"""Exact Gauss-Newton (EGN): the constructor :func:`egn` (docs/METHODS.md §2).

The step machinery (momentum, tx, step size, damping, non-finite guard, info) is the shared
:class:`~gaussnewton.optimizer.GaussNewtonOptimizer`; EGN contributes its direction function, the
exact row-space Levenberg-Marquardt solve of :mod:`gaussnewton.directions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from gaussnewton import _validate as v
from gaussnewton._family import assemble, check_axis_name, check_common
from gaussnewton._sharding import BatchAxis
from gaussnewton._tree import tree_vdot, tree_zeros_like
from gaussnewton.damping import DampingPolicy, DampingRule, default_damping
from gaussnewton.directions import CURVATURES, linearize_and_solve
from gaussnewton.gram import strategy_name
from gaussnewton.linearization import with_output_axis
from gaussnewton.linesearch import LineSearch, StepSizeRule
from gaussnewton.losses import LossLike, get_loss
from gaussnewton.optimizer import GaussNewtonOptimizer, Linearization, Schedule, quad_from_factor
from gaussnewton.solvers import as_solver

__all__ = ["egn"]


def egn(
    model_fn: Callable,
    *,
    loss: LossLike,
    learning_rate: float | Schedule = 1.0,
    damping: float | Schedule | None = None,
    damping_policy: str | DampingRule | DampingPolicy | Schedule = "adaptive",
    line_search: str | StepSizeRule | LineSearch | None = "armijo",
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    gram: str | Callable = "auto",
    curvature: str = "exact",
    num_samples: int = 1,
    solver: Any = "auto",
    max_cg_iters: int | None = None,
    cg_tol: float = 1e-6,
    cg_warm_start: bool = True,
    axis_name: str | tuple[str, ...] | None = None,
) -> GaussNewtonOptimizer:
    r"""Exact Gauss-Newton (EGN): the Levenberg-Marquardt direction of the mini-batch GGN.

    Each step computes ``d = −(H + λI)⁻¹ ∇L`` exactly in the row space
    (:func:`gaussnewton.egn_direction`), optionally averages it (bias-corrected momentum ``β``), passes
    it through ``tx`` (an optax transform in optax's sign convention: it receives ``−d``, a
    gradient-like update, and its output is subtracted — e.g. ``optax.clip_by_global_norm(1.0)``,
    ``optax.add_decayed_weights(1e-4)`` for weight decay), picks a step size (``learning_rate``, or
    Armijo backtracking capped at it) and adapts λ.

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` or ``(b,)`` outputs, or a
            :class:`~gaussnewton.Model` (model state such as batch-norm statistics, a per-step key
            for dropout). Models whose examples interact in the batch (batch statistics, one
            dropout mask per batch) are detected and get exact whole-batch curvature.
        loss: ``"squared_error"``, ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
            a :class:`~gaussnewton.losses.Loss` (e.g. :class:`~gaussnewton.ConvexLoss`).
        learning_rate: step size ``α`` (or ``α_max`` with a line search); number or schedule.
        damping: ``λ`` (start value for adaptive damping); number or schedule of the step count.
            Not given: ``λ₀ = 1e-3`` and, with the default adaptive policy, the floor
            ``λ ≥ L(w)`` after every step (``AdaptiveDamping(loss_floor=1)``, ``L(w)`` the batch
            loss at the start of the step): on small mini-batches the gain ratio on the batch that
            built the model would otherwise drive λ to the dtype floor and each step would
            interpolate its batch; the floor falls with the loss, so a batch that can be fitted
            exactly still is (METHODS §2.2). Given: used as is, and ``"adaptive"`` is
            ``AdaptiveDamping()`` (λ may fall to ``1e-8``, ``1.2e-4`` in float32; set a floor
            with ``damping_policy=gn.AdaptiveDamping(min=..., loss_floor=...)``).
        damping_policy: ``"adaptive"`` (default, the gain-ratio rule), ``"constant"``,
            :class:`~gaussnewton.AdaptiveDamping`, :class:`~gaussnewton.ConstantDamping`, a
            schedule ``count -> λ``, or any :class:`~gaussnewton.DampingRule` (its state is
            ``state.damping``).
        line_search: ``"armijo"`` (default), :class:`~gaussnewton.Armijo`, ``None`` (the fixed
            step, :class:`~gaussnewton.FixedStep`) or any :class:`~gaussnewton.StepSizeRule` (its
            state is ``state.step_size``).
            With ``damping_policy="constant"``, ``line_search=None``, ``momentum=0`` and ``tx=None``
            one step is exactly ``params + learning_rate * egn_direction(...)``.
        momentum: ``β ∈ [0, 1)`` of the bias-corrected direction average.
        tx: optional optax transform applied to the (averaged) direction, optax's sign convention
            (see above).
        gram: Gram strategy: a name (``"auto"``, ``"jacobian"``, ``"matvec"``, ``"structured"``,
            or one added with :func:`gaussnewton.register_strategy`) or a registered strategy
            object itself (e.g. ``gaussnewton.gram.STRATEGIES["matvec"]``).
        curvature: ``"exact"`` or ``"sampled"`` (``num_samples`` Monte-Carlo columns per example).
        solver: a solver object of :mod:`gaussnewton.solvers` or its name:
            :class:`~gaussnewton.AutoSolver` / ``"auto"`` (default: the cheaper exact space — the
            ``D x D`` parameter-space Cholesky when ``D`` is well below the row-space size and
            the examples are independent, else the row space;
            :func:`gaussnewton.param_space.choose_space`), :class:`~gaussnewton.RowCholesky` /
            ``"cholesky"`` (row space, formed Gram), :class:`~gaussnewton.ParamCholesky` /
            ``"param"`` (parameter space) or :class:`~gaussnewton.RowCG` / ``"cg"``: row-space CG
            with matrix-free ``K v`` products (METHODS §4.1; ``gram`` is not used;
            ``info.cg_iters`` / ``info.cg_residual`` report the solve).
        max_cg_iters, cg_tol, cg_warm_start: with ``solver="cg"``, its
            ``RowCG(max_iters=..., tol=..., warm_start=...)`` (the flattened form, kept for
            compatibility): at most ``max_cg_iters`` iterations (``None``: the row-space
            dimension) until the residual max-norm is ``<= cg_tol``; with ``cg_warm_start`` each
            solve starts from the previous step's direction mapped to the row space.
        axis_name: the mesh axis (or axes) over which the batch is split when ``step`` runs inside
            a user's :func:`jax.shard_map` (``x``, ``y`` local blocks; params and state
            replicated): the per-example passes stay on their device, the per-example Gram factors
            (not the Gram) are gathered, the row-space system is solved on every device and one
            ``psum`` of the ``D``-vector ends the direction; losses of the line search and the gain
            ratio are means over the whole batch. ``None`` (default): the step sees the whole batch
            — also under ``jax.jit`` with batch-sharded inputs (see docs/many_devices.md).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
        >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 1)) * 0.1}
        >>> opt = gn.egn(fn, loss="squared_error", learning_rate=1.0, damping=1e-3)
        >>> state = opt.init(p)
        >>> p, state, info = jax.jit(opt.step)(p, state, jnp.ones((8, 3)), jnp.zeros((8,)))
    """
    if damping is None:  # the library default (METHODS §2.2): λ₀ = 1e-3, adaptive: λ ≥ L(w)
        damping, damping_policy = default_damping(damping_policy)
    strict = not get_loss(loss).identity_curvature or curvature == "sampled"
    loss_obj = check_common(
        model_fn, loss, learning_rate, damping, momentum, tx, damping_strict=strict
    )
    v.check_choice("curvature", curvature, CURVATURES)
    gram = strategy_name(gram)  # a name, or a registered strategy object -> its name
    if curvature == "sampled" and not loss_obj.supports_sampling:
        raise ValueError(
            f"curvature='sampled' is not available for loss {loss_obj.name!r}; use curvature='exact'."
        )
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1.")
    solver_obj = as_solver(
        solver, max_cg_iters=max_cg_iters, cg_tol=cg_tol, cg_warm_start=cg_warm_start
    )
    warm = bool(solver_obj.carries_direction)
    # the applied update is α d exactly: the gain-ratio model comes from the solve when it
    # reports ½dᵀHd (the row-space Cholesky forms; no extra JVP)
    free_quad = not momentum and tx is None
    axis = BatchAxis(check_axis_name(axis_name))

    def direction_fn(model, params, x, y, lam, key, method_state):
        # batch → outputs, loss, g, S → Gram (or K v) → row-space solve → one VJP back
        fn = with_output_axis(model)  # (b,) -> (b, 1); per-token (b, *tok, c) kept
        lin = linearize_and_solve(
            fn,
            params,
            x,
            y,
            loss=loss_obj,
            damping=lam,
            gram_strategy=gram,
            curvature=curvature,
            num_samples=num_samples,
            key=key,
            solver=solver_obj,
            warm_start=method_state if warm else None,
            axis=axis,
            need_grad=not free_quad,  # d applied as is: ∇Lᵀd and ‖∇L‖ from the row space
        )
        if free_quad and lin.quad_direction is not None:
            quad = _scaled_quad(lin.direction, lin.quad_direction)
        else:
            quad = quad_from_factor(
                fn, params, x, lin.factor, lin.identity, lin.identity_scale, axis
            )
        nxt = lin.direction if warm else ()
        return Linearization(
            lin.loss,
            lin.grad,
            lin.direction,
            quad,
            lin.cg_iters,
            lin.cg_residual,
            nxt,
            labels_ok=lin.labels_ok,
            slope=lin.slope,
            grad_norm=lin.grad_norm,
        )

    return assemble(
        "egn",
        model_fn,
        loss_obj,
        direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=damping_policy,
        line_search=line_search,
        momentum=momentum,
        tx=tx,
        init_method_state=tree_zeros_like if warm else None,
        axis_name=axis_name,
    )


def _scaled_quad(d, quad_d):
    """``Δ ↦ ½ΔᵀHΔ`` for ``Δ = s d`` (the applied update of a plain step): ``s² · ½dᵀHd``."""

    def quad(delta):
        dd = tree_vdot(d, d)
        s = jnp.where(dd > 0, tree_vdot(delta, d) / jnp.where(dd > 0, dd, 1.0), 0.0)
        return s * s * quad_d

    return quad
