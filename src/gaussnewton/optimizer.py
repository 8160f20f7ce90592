r"""The ``init`` / ``step`` optimizers (EGN and the shared machinery of the family).

One step reads top to bottom (ARCHITECTURE.md):

    batch (x, y) → outputs, loss, g, S → Gram → row-space solve → one VJP back   (direction_fn)
      → momentum / optax chain on d → step size (fixed | Armijo) → damping (ρ) → update, info

A non-finite loss, gradient, direction or update leaves ``params`` and the state unchanged (λ may
grow under adaptive damping) and sets ``info.rejected`` (METHODS §6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gaussnewton import _validate as v
from gaussnewton._tree import (
    tree_all_finite,
    tree_axpy,
    tree_norm,
    tree_scale,
    tree_select,
    tree_vdot,
    tree_zeros_like,
)
from gaussnewton.damping import AdaptiveDamping, _Fixed, gain_ratio
from gaussnewton.directions import CURVATURES, SOLVERS, linearize_and_solve
from gaussnewton.gram import STRATEGIES, as_2d
from gaussnewton.linesearch import Armijo
from gaussnewton.losses import Loss, LossLike, get_loss

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]

__all__ = [
    "GaussNewtonState",
    "StepInfo",
    "empty_info",
    "GaussNewtonOptimizer",
    "Linearization",
    "egn",
]


class StepInfo(NamedTuple):
    """Scalars reported by every step (METHODS §5). ``loss_after`` is NaN when not computed."""

    loss: jax.Array
    loss_after: jax.Array
    grad_norm: jax.Array
    direction_norm: jax.Array
    directional_derivative: jax.Array
    damping: jax.Array
    next_damping: jax.Array
    step_size: jax.Array
    ls_trials: jax.Array
    ls_accepted: jax.Array
    rho: jax.Array
    cg_iters: jax.Array
    cg_residual: jax.Array
    rejected: jax.Array


def empty_info(dtype: Any = jnp.float32) -> StepInfo:
    """A :class:`StepInfo` of zeros (the state of a transform that has not stepped yet)."""
    z = jnp.zeros((), dtype)
    i = jnp.zeros((), jnp.int32)
    f = jnp.zeros((), bool)
    return StepInfo(z, z, z, z, z, z, z, z, i, f, z, i, z, f)


class GaussNewtonState(NamedTuple):
    """Optimizer state (a pytree). ``count`` counts accepted steps."""

    count: jax.Array
    damping: jax.Array
    step_size: jax.Array
    momentum: PyTree
    tx_state: PyTree
    key: jax.Array
    method_state: PyTree = ()


class Linearization(NamedTuple):
    """What a direction function returns at the current point.

    ``quad(Δ)`` is the model curvature term ``½ Δᵀ H Δ`` used by the gain ratio. ``method_state``
    is the method's own state for the next step (e.g. a CG warm start or an L-BFGS history); it is
    kept only when the step is accepted.
    ``after_step``, when given, replaces ``method_state``: it is called with the applied update ``Δ``
    and returns the next method state (e.g. an L-BFGS curvature pair ``(Δ, ∇L(w + Δ) − ∇L(w))``).
    """

    loss: jax.Array
    grad: PyTree
    direction: PyTree
    quad: Callable[[PyTree], jax.Array]
    cg_iters: jax.Array | int = 0
    cg_residual: jax.Array | float = 0.0
    method_state: PyTree = ()
    after_step: Callable[[PyTree], PyTree] | None = None


# direction_fn(params, x, y, λ, key, method_state) -> Linearization
DirectionFn = Callable[[PyTree, PyTree, jax.Array, jax.Array, jax.Array, PyTree], Linearization]


def _raw_key(key: jax.Array | None) -> jax.Array:
    if key is None:
        key = jax.random.key(0)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, jnp.uint32)


def _as_schedule(value: float | Schedule) -> Schedule:
    return value if callable(value) else (lambda count: value)


@dataclasses.dataclass(frozen=True)
class GaussNewtonOptimizer:
    """A Gauss-Newton-type optimizer: ``state = init(params)``; ``step(params, state, x, y, key)``.

    Built by :func:`egn` (and the other method constructors); the fields are validated there.
    """

    model_fn: Callable
    loss: Loss
    direction_fn: DirectionFn
    learning_rate: float | Schedule
    damping: float | Schedule
    damping_policy: AdaptiveDamping | _Fixed
    line_search: Armijo | None
    momentum: float
    tx: optax.GradientTransformation | None
    name: str = "egn"
    init_method_state: Callable[[PyTree], PyTree] | None = None

    # ----------------------------------------------------------------------------------- init
    def init(self, params: PyTree, key: jax.Array | None = None) -> GaussNewtonState:
        """Initial state. ``key`` seeds the sampled curvature when ``step`` gets no key."""
        dt = jnp.result_type(
            jnp.float32, *(leaf.dtype for leaf in jax.tree_util.tree_leaves(params))
        )
        zero = jnp.zeros((), jnp.int32)
        lam0 = _as_schedule(self.damping)(zero)
        lr0 = _as_schedule(self.learning_rate)(zero)
        return GaussNewtonState(
            count=zero,
            damping=jnp.asarray(lam0, dt),
            step_size=jnp.asarray(lr0, dt),
            momentum=tree_zeros_like(params) if self.momentum else (),
            tx_state=self.tx.init(params) if self.tx is not None else (),
            key=_raw_key(key),
            method_state=self.init_method_state(params) if self.init_method_state else (),
        )

    # ----------------------------------------------------------------------------------- step
    def step(
        self,
        params: PyTree,
        state: GaussNewtonState,
        x: PyTree,
        y: jax.Array,
        key: jax.Array | None = None,
    ) -> tuple[PyTree, GaussNewtonState, StepInfo]:
        """One optimizer step on the mini-batch ``(x, y)``; pure and jit-able."""
        dt = state.damping.dtype
        key, next_key = self._keys(state, key)
        lam = self._damping_now(state)
        lin = self.direction_fn(params, x, y, lam, key, state.method_state)
        d, momentum = self._apply_momentum(lin.direction, state)
        d, tx_state = self._apply_tx(d, state.tx_state, params)
        slope = tree_vdot(lin.grad, d).astype(dt)
        loss_at = self._loss_along(params, d, x, y)
        alpha, loss_after, trials, accepted, next_alpha = self._step_size(
            loss_at, lin.loss, slope, state
        )
        delta = tree_scale(alpha.astype(dt), d)
        rho, lam_next = self._next_damping(
            lam, lin, delta, slope * alpha, loss_at, alpha, loss_after
        )
        new_params = tree_axpy(1.0, delta, params)

        ok = (
            jnp.isfinite(lin.loss)
            & tree_all_finite(lin.grad)
            & tree_all_finite(d)
            & tree_all_finite(new_params)
        )
        new_state = GaussNewtonState(
            count=state.count + 1,
            damping=lam_next,
            step_size=next_alpha.astype(dt),
            momentum=momentum,
            tx_state=tx_state,
            key=next_key,
            method_state=lin.method_state if lin.after_step is None else lin.after_step(delta),
        )
        rejected_state = state._replace(damping=self.damping_policy.on_rejected(state.damping))
        out_params = tree_select(ok, new_params, params)
        out_state = tree_select(ok, new_state, rejected_state)
        info = StepInfo(
            loss=lin.loss.astype(dt),
            loss_after=jnp.asarray(loss_after, dt),
            grad_norm=tree_norm(lin.grad).astype(dt),
            direction_norm=tree_norm(d).astype(dt),
            directional_derivative=slope,
            damping=lam,
            next_damping=out_state.damping,
            step_size=alpha.astype(dt),
            ls_trials=jnp.asarray(trials, jnp.int32),
            ls_accepted=jnp.asarray(accepted),
            rho=jnp.asarray(rho, dt),
            cg_iters=jnp.asarray(lin.cg_iters, jnp.int32),
            cg_residual=jnp.asarray(lin.cg_residual, dt),
            rejected=jnp.logical_not(ok),
        )
        return out_params, out_state, info

    # ------------------------------------------------------------------------------- helpers
    def _keys(self, state, key):
        if key is not None:
            return key, state.key
        k, nk = jax.random.split(jax.random.wrap_key_data(state.key))
        return k, jax.random.key_data(nk)

    def _damping_now(self, state):
        if isinstance(self.damping_policy, AdaptiveDamping) or not callable(self.damping):
            return state.damping
        return jnp.asarray(self.damping(state.count), state.damping.dtype)

    def _apply_momentum(self, d, state):
        """Bias-corrected average ``m_t = β m + (1 − β) d``, ``d̂ = m_t / (1 − βᵗ)``."""
        if not self.momentum:
            return d, ()
        beta = self.momentum
        m = jax.tree_util.tree_map(
            lambda mo, di: (beta * mo + (1 - beta) * di).astype(di.dtype), state.momentum, d
        )
        t = (state.count + 1).astype(state.damping.dtype)
        return tree_scale(1.0 / (1.0 - beta**t), m), m

    def _apply_tx(self, d, tx_state, params):
        if self.tx is None:
            return d, tx_state
        return self.tx.update(d, tx_state, params)

    def _loss_along(self, params, d, x, y):
        fn = as_2d(self.model_fn)

        def loss_at(alpha):
            f = fn(tree_axpy(alpha, d, params), x)
            return jnp.mean(self.loss.value(f, self.loss.prepare_labels(f, y)))

        return loss_at

    def _step_size(self, loss_at, loss0, slope, state):
        """(α, L(w + αd) or NaN, trials, accepted, α stored for the next step)."""
        dt = state.damping.dtype
        alpha_max = jnp.asarray(_as_schedule(self.learning_rate)(state.count), dt)
        if self.line_search is None:
            nan = jnp.asarray(jnp.nan, dt)
            return alpha_max, nan, 0, True, alpha_max
        res = self.line_search.search(
            lambda a: loss_at(a).astype(dt), loss0.astype(dt), slope, state.step_size, alpha_max
        )
        return res.step_size, res.loss, res.trials, res.accepted, res.next_step_size

    def _next_damping(self, lam, lin, delta, lin_decrease, loss_at, alpha, loss_after):
        """ρ and the next λ (adaptive only; a fixed policy reports ρ = NaN)."""
        if not isinstance(self.damping_policy, AdaptiveDamping):
            return jnp.asarray(jnp.nan, lam.dtype), lam
        if self.line_search is None:
            loss_after = loss_at(alpha)
        actual = (loss_after - lin.loss).astype(lam.dtype)
        predicted = (lin_decrease + lin.quad(delta)).astype(lam.dtype)
        rho = gain_ratio(actual, predicted)
        return rho, self.damping_policy.update(lam, rho)


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


def quad_from_factor(fn, params, x, factor, identity):
    """``Δ ↦ ½ ΔᵀHΔ = (1/2b) ‖Sᵀ (J Δ)‖²`` by one JVP."""

    def quad(delta):
        _, jd = jax.jvp(lambda p: fn(p, x), (params,), (delta,))
        b = jd.shape[0]
        z = jd if identity else jnp.einsum("bcr,bc->br", factor, jd)
        return 0.5 * jnp.sum(jnp.square(z)) / b

    return quad


def egn(
    model_fn: Callable,
    *,
    loss: LossLike,
    learning_rate: float | Schedule = 1.0,
    damping: float | Schedule = 1e-3,
    damping_policy: str | AdaptiveDamping | Schedule = "adaptive",
    line_search: str | Armijo | None = "armijo",
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    gram: str = "auto",
    curvature: str = "exact",
    num_samples: int = 1,
    solver: str = "cholesky",
    max_cg_iters: int | None = None,
    cg_tol: float = 1e-6,
    cg_warm_start: bool = True,
) -> GaussNewtonOptimizer:
    r"""Exact Gauss-Newton (EGN): the Levenberg-Marquardt direction of the mini-batch GGN.

    Each step computes ``d = −(H + λI)⁻¹ ∇L`` exactly in the row space
    (:func:`gaussnewton.egn_direction`), optionally averages it (bias-corrected momentum ``β``), passes
    it through ``tx`` (an optax transform that receives the DESCENT direction: e.g.
    ``optax.clip_by_global_norm``; use ``optax.add_decayed_weights(-wd)`` for weight decay), picks a
    step size (``learning_rate``, or Armijo backtracking capped at it) and adapts λ.

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` or ``(b,)`` outputs.
        loss: ``"squared_error"``, ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
            a :class:`~gaussnewton.losses.Loss` (e.g. :class:`~gaussnewton.ConvexLoss`).
        learning_rate: step size ``α`` (or ``α_max`` with a line search); number or schedule.
        damping: ``λ`` (start value for adaptive damping); number or schedule of the step count.
        damping_policy: ``"adaptive"`` (default, the gain-ratio rule), ``"constant"``,
            :class:`~gaussnewton.AdaptiveDamping`, or a schedule ``count -> λ``.
        line_search: ``"armijo"`` (default), :class:`~gaussnewton.Armijo` or ``None`` (fixed step).
            With ``damping_policy="constant"``, ``line_search=None``, ``momentum=0`` and ``tx=None``
            one step is exactly ``params + learning_rate * egn_direction(...)``.
        momentum: ``β ∈ [0, 1)`` of the bias-corrected direction average.
        tx: optional optax transform applied to the (averaged) direction.
        gram: Gram strategy (``"auto"``, ``"jacobian"``, ``"matvec"``, ``"structured"`` when available).
        curvature: ``"exact"`` or ``"sampled"`` (``num_samples`` Monte-Carlo columns per example).
        solver: ``"cholesky"`` (formed Gram, default) or ``"cg"``: row-space CG with matrix-free
            ``K v`` products (METHODS §4.1), at most ``max_cg_iters`` iterations (``None``: the
            row-space dimension) until the residual max-norm is ``<= cg_tol``; with
            ``cg_warm_start`` it starts from the previous step's direction mapped to the row space
            (see :mod:`gaussnewton.cg`; ``gram`` is not used). ``info.cg_iters`` /
            ``info.cg_residual`` report the solve.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
        >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 1)) * 0.1}
        >>> opt = gn.egn(fn, loss="squared_error", learning_rate=1.0, damping=1e-3)
        >>> state = opt.init(p)
        >>> p, state, info = jax.jit(opt.step)(p, state, jnp.ones((8, 3)), jnp.zeros((8,)))
    """
    v.check_callable("model_fn", model_fn, "model_fn(params, x) -> outputs (b, c) or (b,)")
    loss_obj = get_loss(loss)
    v.check_number("learning_rate", learning_rate, hint="e.g. learning_rate=1.0")
    strict = not loss_obj.identity_curvature or curvature == "sampled"
    v.check_number(
        "damping",
        damping,
        strict=strict,
        hint="λ must be > 0 for this loss/curvature (λ = 0 is allowed for exact squared error); "
        "e.g. damping=1e-3.",
    )
    policy = _policy(damping_policy, damping)
    if callable(damping_policy) and not isinstance(damping_policy, AdaptiveDamping):
        damping = damping_policy  # a schedule given as the policy
    ls = _line_search(line_search)
    v.check_momentum(momentum)
    v.check_choice("curvature", curvature, CURVATURES)
    if gram != "auto" and gram not in STRATEGIES:
        raise ValueError(f"gram={gram!r} is unknown; use 'auto' or one of {sorted(STRATEGIES)}.")
    if curvature == "sampled" and not loss_obj.supports_sampling:
        raise ValueError(
            f"curvature='sampled' is not available for loss {loss_obj.name!r}; use curvature='exact'."
        )
    v.check_choice("solver", solver, SOLVERS)
    if max_cg_iters is not None and not (isinstance(max_cg_iters, int) and max_cg_iters >= 0):
        raise ValueError(f"max_cg_iters={max_cg_iters!r} must be None or an integer >= 0.")
    v.check_number("cg_tol", cg_tol, strict=False, hint="e.g. cg_tol=1e-6.")
    warm = solver == "cg" and bool(cg_warm_start)
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1.")
    if tx is not None and not hasattr(tx, "update"):
        raise TypeError(f"tx={tx!r} must be an optax GradientTransformation (or None).")
    fn = as_2d(model_fn)

    def direction_fn(params, x, y, lam, key, method_state):
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
            solver=solver,
            max_cg_iters=max_cg_iters,
            cg_tol=cg_tol,
            warm_start=method_state if warm else None,
        )
        quad = quad_from_factor(fn, params, x, lin.factor, lin.identity)
        nxt = lin.direction if warm else ()
        return Linearization(
            lin.loss, lin.grad, lin.direction, quad, lin.cg_iters, lin.cg_residual, nxt
        )

    return GaussNewtonOptimizer(
        model_fn=model_fn,
        loss=loss_obj,
        direction_fn=direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=policy,
        line_search=ls,
        momentum=float(momentum),
        tx=tx,
        name="egn",
        init_method_state=tree_zeros_like if warm else None,
    )
