r"""The ``init`` / ``step`` optimizers (EGN and the shared machinery of the family).

One step reads top to bottom (docs/ARCHITECTURE.md):

    batch (x, y[, key, model state]) → the model bound to this step's state and key (one function)
      → λ = damping.value(state.damping, count)                                  (DampingRule)
      → outputs, loss, g, S → Gram → row-space solve → one VJP back             (direction_fn)
      → momentum / optax chain on d
      → α, L(w + αd) = step_size.update(state.step_size, ...)                  (StepSizeRule)
      → ρ (if the damping rule uses it) → damping.update(state.damping, ρ)
      → guard → update, the kept (or on_rejected) states, info

The step-size and damping rules are protocols with their own state (``GaussNewtonState.step_size``
and ``GaussNewtonState.damping``; for the built-in rules ``α_prev`` and λ, scalars): the loop
composes any direction with any rule through :class:`~gaussnewton.StepSizeRule` and
:class:`~gaussnewton.DampingRule` and switches on none of them.

A step is rejected — ``params``, the optimizer state and the model state unchanged except that each
rule keeps its ``on_rejected(state)`` (λ grows under adaptive damping), ``info.rejected`` set — when the loss, gradient, direction or update is not
finite, when the loss at the new point is not finite (no finite trial point: never a step into a
NaN region), when a line search found no acceptable step and its last trial raises the loss, or
when the labels are invalid (METHODS §6).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gaussnewton._sharding import NO_AXIS, BatchAxis
from gaussnewton._tree import (
    any_traced,
    cached_eval_shape,
    tree_all_finite,
    tree_axpy,
    tree_norm,
    tree_scale,
    tree_select,
    tree_signature,
    tree_vdot,
)
from gaussnewton._validate import check_params
from gaussnewton.damping import DampingPolicy, DampingRule, as_damping_rule, gain_ratio
from gaussnewton.linearization import with_output_axis
from gaussnewton.linesearch import LineSearch, StepSizeRule, as_step_size_rule
from gaussnewton.losses import Loss, project
from gaussnewton.model import Model, as_model

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]

__all__ = [
    "GaussNewtonState",
    "StepInfo",
    "empty_info",
    "GaussNewtonOptimizer",
    "Direction",
    "DirectionFn",
    "Linearization",
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
    """Optimizer state (a pytree). ``count`` counts accepted steps.

    ``damping`` is the state of the damping rule (:class:`~gaussnewton.DampingRule`; for the
    built-in rules λ itself, a scalar: ``float(state.damping)``) and ``step_size`` the state of
    the step-size rule (:class:`~gaussnewton.StepSizeRule`; for :class:`~gaussnewton.Armijo`
    ``α_prev``, the step the next search starts from, and for the fixed step the last ``α``).
    A custom rule's state is any pytree; ``opt.damping_rule.value(state.damping, state.count)``
    reads its λ. ``model_state`` is the state of a :class:`~gaussnewton.Model` with
    ``has_state=True`` (e.g. batch norm running statistics), updated by every accepted step;
    ``None`` for stateless models.
    """

    count: jax.Array
    damping: jax.Array
    step_size: jax.Array
    momentum: PyTree
    tx_state: PyTree
    key: jax.Array
    method_state: PyTree = ()
    model_state: PyTree = None


class Direction(NamedTuple):
    """What a direction function returns at the current point (the direction protocol).

    A direction function is ``direction_fn(fn, params, x, y, λ, key, method_state) -> Direction``
    where ``fn(params, x)`` is the model of this step (state and key bound), ``λ`` the damping of
    this step and ``method_state`` the method's own state. ``loss`` and ``grad`` are ``L`` and
    ``∇L`` at ``params``; ``direction`` is ``d`` (a pytree like ``params``; the step loop applies
    momentum, ``tx``, the step size, the damping rule and the non-finite guard).

    ``quad(Δ)`` is the model curvature term ``½ Δᵀ H Δ`` used by the gain ratio. ``method_state``
    is the method's own state for the next step (e.g. a CG warm start or an L-BFGS history); it is
    kept only when the step is accepted.
    ``after_step``, when given, replaces ``method_state``: it is called with the applied update ``Δ``
    and returns the next method state (e.g. an L-BFGS curvature pair ``(Δ, ∇L(w + Δ) − ∇L(w))``).
    ``grad`` may be ``None`` when the step applies ``direction`` unchanged (no momentum, no
    ``tx``); ``slope = ∇Lᵀd`` and ``grad_norm = ‖∇L‖`` are then given instead (EGN computes them
    from the row-space solve and saves the gradient's backward pass).
    """

    loss: jax.Array
    grad: PyTree
    direction: PyTree
    quad: Callable[[PyTree], jax.Array]
    cg_iters: jax.Array | int = 0
    cg_residual: jax.Array | float = 0.0
    method_state: PyTree = ()
    after_step: Callable[[PyTree], PyTree] | None = None
    labels_ok: jax.Array | bool = True
    slope: jax.Array | None = None
    grad_norm: jax.Array | None = None


Linearization = Direction  # the former name

# direction_fn(fn, params, x, y, λ, key, method_state) -> Direction, where fn(params, x) is the
# model of this step (state and key bound: the same function for the direction and every trial).
DirectionFn = Callable[[Callable, PyTree, PyTree, PyTree, jax.Array, jax.Array, PyTree], Direction]


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
    ``model_fn`` is a plain function or a :class:`~gaussnewton.Model` (state and key channels).
    """

    model_fn: Callable | Model
    loss: Loss
    direction_fn: DirectionFn
    learning_rate: float | Schedule
    #: λ₀ (or the schedule) given to ``damping_policy.init``
    damping: float | Schedule
    damping_policy: DampingRule | DampingPolicy
    line_search: StepSizeRule | LineSearch | None
    momentum: float
    tx: optax.GradientTransformation | None
    name: str = "egn"
    init_method_state: Callable[[PyTree], PyTree] | None = None
    #: the batch axis name when ``step`` runs inside ``jax.shard_map`` over a split batch (the
    #: direction function must use the same axis: :func:`egn` passes it on)
    axis_name: Any = None
    # where the gain ratio ρ is measured: at the step taken ("accepted_step") or at the full step
    # α_max d before any backtracking ("full_step", the SGN authors' rule; see gaussnewton.sgn)
    rho_at: str = "accepted_step"

    @property
    def batch_axis(self) -> BatchAxis:
        """:attr:`axis_name` as the :class:`~gaussnewton._sharding.BatchAxis` of the step."""
        return BatchAxis(self.axis_name)

    # ----------------------------------------------------------------------------------- init
    @property
    def model(self) -> Model:
        """``model_fn`` as a :class:`~gaussnewton.Model`."""
        return as_model(self.model_fn)

    @property
    def step_size_rule(self) -> StepSizeRule:
        """``line_search`` as a :class:`~gaussnewton.StepSizeRule` (``None``: the fixed step)."""
        return as_step_size_rule(self.line_search)

    @property
    def damping_rule(self) -> DampingRule:
        """``damping_policy`` as a :class:`~gaussnewton.DampingRule`."""
        return as_damping_rule(self.damping_policy, self.damping)

    def init(
        self, params: PyTree, key: jax.Array | None = None, model_state: PyTree = None
    ) -> GaussNewtonState:
        """Initial state.

        ``key`` seeds the per-step keys (sampled curvature, a model's ``key``) when ``step`` gets no
        key. ``model_state`` is the first state of a stateful :class:`~gaussnewton.Model` (default
        its ``initial_state``).
        """
        check_params(params)
        dt = state_dtype(params)
        zero = jnp.zeros((), jnp.int32)
        lam0 = _as_schedule(self.damping)(zero)
        lr0 = _as_schedule(self.learning_rate)(zero)
        return GaussNewtonState(
            count=zero,
            damping=self.damping_rule.init(lam0, dt),
            step_size=self.step_size_rule.init(lr0, dt),
            momentum=self._momentum_tx.init(params) if self.momentum else (),
            tx_state=self.tx.init(params) if self.tx is not None else (),
            key=_raw_key(key),
            method_state=self.init_method_state(params) if self.init_method_state else (),
            model_state=self.model.initial_state if model_state is None else model_state,
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
        """One optimizer step on the mini-batch ``(x, y)``; pure and jit-able.

        ``key`` (optional) is this step's PRNG key (sampled curvature, a :class:`~gaussnewton.Model`
        that needs one); without it a key is split from the state.

        Called on concrete arrays (outside ``jax.jit``), the step runs compiled all the same: one
        ``jax.jit`` of it per optimizer object, compiled once per input shape (op-by-op it would
        dispatch every primitive of the step from Python: about 200x slower on the MLPs of
        ``benchmarks/bench_gram.py``). Concrete labels are checked by value first and bad ones
        raise a ``ValueError`` naming them (:meth:`~gaussnewton.Loss.check_labels`). Under a
        transformation (``jax.jit``, ``vmap``, ``grad``, ``shard_map``) the step is traced inline.

        With ``axis_name`` set, call it inside ``jax.shard_map`` with ``x``, ``y`` split over that
        mesh axis and ``params``, ``state`` replicated: losses, gradients, the direction and the
        update are those of the whole batch, identical on every device.
        """
        if any_traced((params, state, x, y, key)):
            return self._step(params, state, x, y, key)
        self._check_labels(params, state, x, y, key)
        return self._compiled_step(params, state, x, y, key)

    @functools.cached_property
    def _compiled_step(self) -> Callable:
        """``jax.jit`` of :meth:`_step`, made once per optimizer object (kept in its ``__dict__``,
        left out of copies and pickles: :meth:`__getstate__`)."""
        return jax.jit(self._step)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in _CACHED}

    def _check_labels(self, params, state, x, y, key) -> None:
        """The value checks of concrete labels (ValueError), on the output shape of the model
        (``jax.eval_shape``, cached per input signature): the compiled step sees traced labels,
        which it can only reject."""

        def outputs(params, state, x, key):
            k, _ = self._keys(state, key)
            fn, _ = self._bind_model(params, x, state.model_state, k)
            return with_output_axis(fn)(params, x)

        sig = tree_signature((params, x, state.model_state, key))  # what the outputs depend on
        shapes = self.__dict__.setdefault("_output_shapes", {})
        self.loss.check_labels(cached_eval_shape(shapes, sig, outputs, params, state, x, key), y)

    def _step(self, params, state, x, y, key=None):
        """:meth:`step` as traced (the types are those of :meth:`step`): batch → direction → step
        size → damping → update."""
        dt = state_dtype(params)
        damping, step_size = self.damping_rule, self.step_size_rule
        key, next_key = self._keys(state, key)
        fn, model_state = self._bind_model(params, x, state.model_state, key)
        lam = jnp.asarray(damping.value(state.damping, state.count), dt)
        lin = self.direction_fn(fn, params, x, y, lam, key, state.method_state)
        d, momentum = self._apply_momentum(lin.direction, state)
        d, tx_state = self._apply_tx(d, state.tx_state, params)
        if lin.grad is None:  # the direction function gave ∇Lᵀd and ‖∇L‖ (d applied as is)
            if self.momentum or self.tx is not None:
                raise ValueError(
                    "the direction function returned grad=None, which needs a step that applies "
                    "its direction unchanged: momentum=0 and tx=None; return the gradient."
                )
            slope, grad_norm = jnp.asarray(lin.slope, dt), jnp.asarray(lin.grad_norm, dt)
        else:
            slope, grad_norm = tree_vdot(lin.grad, d).astype(dt), tree_norm(lin.grad).astype(dt)
        loss_at = self._loss_along(fn, params, d, x, y)
        alpha_max = jnp.asarray(_as_schedule(self.learning_rate)(state.count), dt)
        search, step_size_state = step_size.update(
            state.step_size, lambda a: loss_at(a).astype(dt), lin.loss.astype(dt), slope, alpha_max
        )
        alpha, loss_after = jnp.asarray(search.step_size, dt), jnp.asarray(search.loss, dt)
        delta = tree_scale(alpha, d)
        rho = jnp.asarray(jnp.nan, dt)  # not computed: the rule does not use it
        if damping.uses_gain_ratio and self.rho_at == "full_step":  # ρ of α_max d, whatever
            loss_full = jax.lax.cond(  # the line search accepted (the SGN authors' rule)
                alpha == alpha_max, lambda: loss_after, lambda: loss_at(alpha_max).astype(dt)
            )
            rho = _gain_ratio(lin, tree_scale(alpha_max, d), slope * alpha_max, loss_full, dt)
        elif damping.uses_gain_ratio:
            rho = _gain_ratio(lin, delta, slope * alpha, loss_after, dt)
        extra = {"loss": lin.loss.astype(dt)} if getattr(damping, "uses_loss", False) else {}
        damping_state = damping.update(state.damping, rho, count=state.count, **extra)
        new_params = tree_axpy(1.0, delta, params)

        ok = (
            jnp.isfinite(lin.loss)
            & (
                tree_all_finite(lin.grad)
                if lin.grad is not None
                else jnp.isfinite(grad_norm) & jnp.isfinite(slope)
            )
            & tree_all_finite(d)
            & tree_all_finite(new_params)
            & jnp.isfinite(loss_after)  # never a step into a non-finite region
            & jnp.asarray(lin.labels_ok, bool)
            # a search that found no acceptable step and would raise the loss (beyond
            # rounding, √ε relative: a converged step may differ from L(w) by an ulp): rejected
            & (jnp.asarray(search.accepted) | (loss_after <= _with_rounding(lin.loss.astype(dt))))
        )
        new_state = GaussNewtonState(
            count=state.count + 1,
            damping=damping_state,
            step_size=step_size_state,
            momentum=momentum,
            tx_state=tx_state,
            key=next_key,
            method_state=lin.method_state if lin.after_step is None else lin.after_step(delta),
            model_state=model_state,
        )
        rejected_state = state._replace(
            damping=damping.on_rejected(state.damping),
            step_size=step_size.on_rejected(state.step_size),
        )
        out_params = tree_select(ok, new_params, params)
        out_state = tree_select(ok, new_state, rejected_state)
        info = StepInfo(
            loss=lin.loss.astype(dt),
            loss_after=loss_after,
            grad_norm=grad_norm,
            direction_norm=tree_norm(d).astype(dt),
            directional_derivative=slope,
            damping=lam,
            next_damping=jnp.asarray(damping.value(out_state.damping), dt),
            step_size=alpha,
            ls_trials=jnp.asarray(search.trials, jnp.int32),
            ls_accepted=jnp.asarray(search.accepted),
            rho=rho,
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

    def _bind_model(self, params, x, model_state, key):
        """The model of this step as ``fn(params, x)`` (state and key fixed) and its new state.

        The model key is derived from the step key (``fold_in(key, 1)``), so it differs from the key
        of the sampled curvature. The new model state is that of the evaluation at ``params``.
        """
        model = self.model
        model_key = jax.random.fold_in(key, 1) if model.needs_key else None
        fn = model.bind(model_state, model_key)
        if model.has_state:
            _, model_state = model.apply(params, x, model_state, model_key)
            model_state = _mean_floats(self.batch_axis, model_state)
        return fn, model_state

    @property
    def _momentum_tx(self) -> optax.GradientTransformation:
        """``optax.ema(β, debias=True)``: ``m_t = β m + (1 − β) d``, ``d̂ = m_t / (1 − βᵗ)``."""
        return optax.ema(self.momentum, debias=True)

    def _apply_momentum(self, d, state):
        """The bias-corrected direction average (:attr:`_momentum_tx`); its state (``optax``'s
        ``EmaState``: ``count``, ``ema``) advances with accepted steps only."""
        if not self.momentum:
            return d, ()
        return self._momentum_tx.update(d, state.momentum)

    def _apply_tx(self, d, tx_state, params):
        """``tx`` in optax's convention: it maps the gradient-like ``−d`` to an update ``u`` that is
        SUBTRACTED (``d ← −u``), so ``optax.add_decayed_weights(wd)`` decays the weights and
        ``optax.scale_by_adam()`` gives Adam-style moments, as in an optax chain."""
        if self.tx is None:
            return d, tx_state
        u, tx_state = self.tx.update(tree_scale(-1.0, d), tx_state, params)
        return tree_scale(-1.0, u), tx_state

    def _loss_along(self, fn, params, d, x, y):
        fn = with_output_axis(fn)
        axis = self.batch_axis

        def loss_at(alpha):
            f = fn(tree_axpy(alpha, d, params), x)
            return axis.mean(jnp.mean(self.loss.value(f, self.loss.prepare_labels(f, y))))

        return loss_at


#: per-object caches kept in an optimizer's ``__dict__`` (never pickled)
_CACHED = ("_compiled_step", "_output_shapes")


def state_dtype(params: PyTree) -> Any:
    """The float dtype of the optimizer's scalars (λ, α, losses in ``StepInfo``): that of the
    parameters, at least float32 (bfloat16 parameters get float32 scalars)."""
    return jnp.result_type(jnp.float32, *(leaf.dtype for leaf in jax.tree_util.tree_leaves(params)))


def _gain_ratio(lin: Direction, delta: PyTree, lin_decrease, loss_after, dt) -> jax.Array:
    """ρ of the update ``Δ``: ``(L(w + Δ) − L(w)) / (∇LᵀΔ + ½ΔᵀHΔ)`` (METHODS §2.2)."""
    actual = (loss_after - lin.loss).astype(dt)
    predicted = (lin_decrease + lin.quad(delta)).astype(dt)
    return gain_ratio(actual, predicted)


def _mean_floats(axis: BatchAxis, tree: PyTree) -> PyTree:
    """Floating leaves averaged over the devices of ``axis`` (a model state computed from each
    device's block, e.g. batch-norm running statistics, made one state for all devices)."""
    if not axis.sharded:
        return tree

    def one(a):
        return axis.mean(a) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a

    return jax.tree_util.tree_map(one, tree)


def _with_rounding(loss: jax.Array) -> jax.Array:
    """``L + √ε |L|``: a loss at the new point up to this is "not raised" (rounding, not ascent)."""
    return loss + jnp.sqrt(jnp.finfo(loss.dtype).eps) * jnp.abs(loss)


def quad_from_factor(fn, params, x, factor, identity, scale=1.0, axis: BatchAxis = NO_AXIS):
    """``Δ ↦ ½ ΔᵀHΔ = (1/2b) ‖Sᵀ (J Δ)‖²`` by one JVP (per token for ``(b, *tok, c)`` outputs;
    ``Q = scale · I`` when ``identity``; summed over the devices of ``axis`` inside ``shard_map``)."""

    def quad(delta):
        _, jd = jax.jvp(lambda p: fn(p, x), (params,), (delta,))
        b = jd.shape[0] * axis.size()
        if identity:
            return 0.5 * scale * axis.sum(jnp.sum(jnp.square(jd))) / b
        jd = jd if jd.ndim == factor.ndim - 1 else jd.reshape(factor.shape[:-1])
        return 0.5 * axis.sum(jnp.sum(jnp.square(project(factor, jd)))) / b

    return quad
