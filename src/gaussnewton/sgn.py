r"""SGN — stochastic generalized Gauss-Newton (Gargiani et al., 2020), docs/METHODS.md §4.2.

Truncated conjugate gradients in PARAMETER space on the damped GGN system of the mini-batch,

.. math:: (H + λI)\,Δ = −∇L, \qquad H v = \tfrac1b J^\top Q (J v),

where ``J v`` is the JVP of ONE ``jax.linearize`` of the batch outputs per step and ``Jᵀ u`` its
transpose (``jax.linear_transpose``): each CG iteration costs one linear forward and one linear
backward pass through the stored linearization — never a new forward pass of the model. CG starts
at ``Δ = 0``, so every iterate is a descent direction (``∇Lᵀ Δ_k < 0`` for ``k ≥ 1``).

Gain ratio: the authors' model includes the damping and reads it off the final CG residual
``r = −∇L − (H + λI)Δ``: ``½ Δᵀ(H + λI)Δ = −½ (∇L + r)ᵀ Δ``, so the predicted change of the
full step is ``m(Δ) = ∇LᵀΔ + ½ Δᵀ(H + λI)Δ = ½ (∇L − r)ᵀ Δ`` (their ``½ (r + ∇L)ᵀΔ`` with the
opposite sign convention for ``r``); for a scaled step ``αΔ`` it is ``α ∇LᵀΔ − α² ½ (∇L + r)ᵀ Δ``.
With momentum or ``tx`` the applied update is no longer a multiple of ``Δ`` and the curvature term
is evaluated by one JVP of the stored linearization instead.

Defaults are the authors' runs: ≤ 10 CG iterations (residual max-norm ``≤ 1e-6``), ``α = 1`` at every step (``reset="restart"``) with
Armijo backtracking (``c₁ = 1e-4``, ``α ← α/2``, ≤ 10 trials), ``λ₀ = 1e-4`` with the trust-region
rule ``ρ < ¼ → λ·3/2``, ``ρ > ¾ → λ·2/3``, ``λ ≥ 1e-6``. One difference is kept as an option: the
authors measure ``ρ`` at the full step before backtracking (``rho_at="full_step"``), this library
by default at the step taken (``rho_at="accepted_step"``); see :func:`sgn`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 1)) * 0.1}
    >>> from gaussnewton.sgn import sgn
    >>> opt = sgn(fn, loss="squared_error")
    >>> state = opt.init(p)
    >>> p, state, info = jax.jit(opt.step)(p, state, jnp.ones((8, 3)), jnp.zeros((8,)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gaussnewton._family import assemble, check_axis_name, check_common, check_int
from gaussnewton._sharding import NO_AXIS, BatchAxis
from gaussnewton._tree import tree_axpy, tree_vdot
from gaussnewton.cg import cg_solve
from gaussnewton.damping import AdaptiveDamping
from gaussnewton.linearization import linearize
from gaussnewton.linesearch import Armijo
from gaussnewton.losses import LossLike
from gaussnewton.optimizer import GaussNewtonOptimizer, Linearization

PyTree = Any

__all__ = ["sgn", "RHO_AT"]

#: where SGN measures its trust-region ratio (the ``rho_at`` argument of :func:`sgn`)
RHO_AT = ("accepted_step", "full_step")


def _ggn_operator(fn, params, x, y, loss, axis: BatchAxis = NO_AXIS):
    """(linearization, ∇L, v ↦ H v, Q) from one ``jax.linearize`` of the batch outputs (inside
    ``shard_map``: this device's examples, ``Jᵀ`` summed over the devices of ``axis``)."""
    lin = linearize(fn, loss, params, x, y, mode="linearize", axis=axis)
    b = lin.batch_size
    grad = lin.vjp(lin.g / b)
    unit = loss.identity_scale(lin.outputs, lin.labels) == 1.0  # Q = I (unweighted)
    q = None if unit else loss.hessian(lin.outputs, lin.labels)

    def ggn_mv(v):
        jv = lin.jvp(v)
        qjv = jv if q is None else jnp.einsum("bcd,bd->bc", q, jv)
        return lin.vjp(qjv / b)

    return lin, grad, ggn_mv, q


def sgn(
    model_fn: Callable,
    *,
    loss: LossLike,
    learning_rate: float | Callable = 1.0,
    damping: float = 1e-4,
    max_cg_iters: int = 10,
    cg_tol: float = 1e-6,
    line_search: str | Armijo | None = Armijo(c1=1e-4, shrink=0.5, max_trials=10, reset="restart"),  # noqa: B008
    damping_policy: str | AdaptiveDamping | Callable = AdaptiveDamping(  # noqa: B008
        increase=1.5, decrease=2 / 3, min=1e-6
    ),
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    rho_at: str = "accepted_step",
    axis_name: str | tuple[str, ...] | None = None,
) -> GaussNewtonOptimizer:
    r"""SGN: truncated CG on ``(H + λI)Δ = −∇L`` in parameter space (see the module docstring).

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` or ``(b,)`` outputs.
        loss: a loss name or :class:`~gaussnewton.Loss` (its ``hessian`` gives ``Q``).
        learning_rate: ``α`` (``α_max`` with the line search); number or schedule.
        damping: ``λ₀ > 0`` (start value of the adaptive rule) or a constant / schedule.
        max_cg_iters: at most this many CG iterations (GGN-vector products) per step.
        cg_tol: absolute tolerance on the CG residual max-norm.
        line_search: Armijo on the same batch (default the authors' ``c₁ = 1e-4``, halving, ≤ 10
            trials), ``"armijo"`` or ``None``.
        damping_policy: the authors' trust-region rule by default; ``"constant"`` or a schedule.
        momentum, tx: as in :func:`gaussnewton.egn`.
        axis_name: the batch axis inside a user's ``jax.shard_map``, as in :func:`gaussnewton.egn`
            (``J v`` stays on each device, ``Jᵀ u`` and the CG inner products over ``D``-vectors
            are global after one ``psum``).
        rho_at: where the trust-region ratio ``ρ`` that adapts ``λ`` is measured.
            ``"accepted_step"`` (default): at the step the line search accepted, ``α d``, with
            the model ``m(α d)``. ``"full_step"``: at the full step ``α_max d`` BEFORE any
            backtracking, as the authors' implementation does (it evaluates
            ``ρ = (L(w + α_max Δ) − L(w)) / m(Δ)`` and updates ``λ`` first, then backtracks); the
            full-step loss is the line search's first trial under ``reset="restart"`` and is
            evaluated again (one forward pass) only when the search backtracked. The two differ
            when the full step overshoots: there the authors' ρ is small and ``λ`` RISES (×3/2
            per step), while ρ of the backtracked step is near 1 and ``λ`` falls to its floor
            (``tests/test_sgn.py``). The default stays ``"accepted_step"``: it is what every
            result of this library with ``sgn`` used so far, and the authors' published curves
            were not re-run here to show that ``"full_step"`` reproduces them better.

    ``info.cg_iters`` / ``info.cg_residual`` report the CG solve; ``info.rho`` is the ratio of the
    chosen ``rho_at``.
    """
    loss_obj = check_common(
        model_fn, loss, learning_rate, damping, momentum, tx, damping_strict=True
    )
    check_int("max_cg_iters", max_cg_iters, 1)
    if rho_at not in RHO_AT:
        raise ValueError(
            f"rho_at={rho_at!r} is not supported; use 'accepted_step' (the default: ρ of the step "
            "taken) or 'full_step' (the SGN authors' rule: ρ of α_max·Δ before backtracking)."
        )
    if not cg_tol >= 0:
        raise ValueError(f"cg_tol={cg_tol!r} must be >= 0, e.g. 1e-6.")
    plain = not momentum and tx is None
    axis = BatchAxis(check_axis_name(axis_name))

    def direction_fn(fn, params, x, y, lam, key, method_state):
        del key
        lin, grad, ggn_mv, q = _ggn_operator(fn, params, x, y, loss_obj, axis)
        lam_p = lam.astype(jax.tree_util.tree_leaves(params)[0].dtype)
        rhs = jax.tree_util.tree_map(jnp.negative, grad)
        res = cg_solve(
            lambda v: tree_axpy(lam_p, v, ggn_mv(v)), rhs, max_iters=max_cg_iters, tol=cg_tol
        )
        d = res.x
        dd = tree_vdot(d, d)
        curv = -0.5 * tree_vdot(jax.tree_util.tree_map(jnp.add, grad, res.residual), d)

        def quad(delta):  # ½ Δᵀ(H + λI)Δ of the applied update
            if plain:  # Δ = s d: the authors' residual form, no extra pass
                s = jnp.where(dd > 0, tree_vdot(delta, d) / jnp.where(dd > 0, dd, 1.0), 0.0)
                return s * s * curv
            jd = lin.jvp(delta)
            qjd = jd if q is None else jnp.einsum("bcd,bd->bc", q, jd)
            return 0.5 * (
                axis.sum(jnp.sum(jd * qjd)) / lin.batch_size + lam * tree_vdot(delta, delta)
            )

        return Linearization(
            lin.loss,
            grad,
            d,
            quad,
            res.iters,
            res.residual_max,
            method_state,
            labels_ok=lin.labels_ok,
        )

    opt = assemble(
        "sgn",
        model_fn,
        loss_obj,
        direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=damping_policy,
        line_search=line_search,
        momentum=momentum,
        tx=tx,
    )
    return dataclasses.replace(opt, rho_at=rho_at, axis_name=axis_name)
