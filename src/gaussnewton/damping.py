r"""Damping (λ) rules (METHODS §2.2): constant, a schedule of the step count, or adaptive.

A damping rule is an ``init`` / ``update`` pair with its own state (the pattern of optax's
transforms), the :class:`DampingRule` protocol::

    state = rule.init(λ₀, dtype)                 # GaussNewtonState.damping
    λ = rule.value(state, count)                 # the λ of this step (count: accepted steps)
    state_kept = rule.update(state, ρ, count=count)
    state_rejected = rule.on_rejected(state)     # the step loop keeps one of the two

``ρ`` is the gain ratio below when ``rule.uses_gain_ratio``, else NaN (not computed). The built-in
rules keep λ itself as their state (a scalar in the parameters' float dtype):
:class:`AdaptiveDamping` (the gain-ratio rule), :class:`ConstantDamping` (a number, or a schedule
``count -> λ``, whose state is the last λ applied). The stateless form of the protocol,
:class:`DampingPolicy` (``update(λ, ρ)``, ``on_rejected(λ)``), is still accepted; its state is λ.

Adaptive (Levenberg-Marquardt gain ratio) on the same batch, with ``Δ`` the applied update:

.. math:: ρ = \frac{L(w + Δ) − L(w)}{∇L^\top Δ + \tfrac12 Δ^\top H Δ}, \qquad
          λ ← \begin{cases} λ · \text{increase} & ρ < \text{lower} \\
                             λ · \text{decrease} & ρ > \text{upper} \\ λ & \text{otherwise}\end{cases}

clamped to ``[max(min, eps_floor · ε), max]`` with ``ε`` the machine epsilon of λ's dtype (the
dtype of the parameters): the default ``eps_floor = 1000`` is a floor of 1.2e-4 in float32 and
2.2e-13 (below ``min = 1e-8``, so no change) in float64. A non-finite or non-negative predicted decrease counts as a failure
(``ρ < lower``). Defaults ``increase = 3/2``, ``decrease = 2/3`` (Martens; Nocedal-Wright); the EGN
authors' code used ``1.01 / 0.99``.

A REJECTED step (non-finite loss, direction or trial loss; parameters unchanged) multiplies λ by
``reject_increase = 10`` (clamped): the step that follows is on the same kind of batch with the
same λ-dependence, and a factor 1.5 needed 23 rejected steps to grow λ from 1e-3 to 9 where a
factor 10 needs 4 (tests/test_damping.py). The float32 floor: with λ at 1e-8 a 3000-step
float32 run (MLP 8-32-32-1, b = 64) ended with its mini-batch loss 1.9x above its minimum and
0.6 % rejected steps; with 1e-4, 1.4x and none (docs/METHODS.md §2.2,
``benchmarks/damping_floor.py``).

With ``loss_floor = μ > 0`` every update is followed by ``λ ← max(λ, μ L(w))`` (``L(w)`` the
batch loss at the start of the step; :meth:`AdaptiveDamping.with_loss_floor`). ``gn.egn``'s default
(``damping`` not given) is ``λ₀ = 1e-3`` with ``AdaptiveDamping(loss_floor=1)``
(:func:`default_damping`; docs/METHODS.md §2.2, "The library default").

Example:
    >>> import jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> rule = gn.AdaptiveDamping(increase=1.5, decrease=2 / 3, min=1e-6, max=1e4)
    >>> state = rule.init(1e-3, jnp.float32)
    >>> state = rule.update(state, jnp.float32(0.9))  # ρ > 3/4: λ ← λ · 2/3
    >>> round(float(rule.value(state)), 7)
    0.0006667
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "AdaptiveDamping",
    "ConstantDamping",
    "DampingPolicy",
    "DampingRule",
    "DEFAULT_DAMPING",
    "DEFAULT_LOSS_FLOOR",
    "as_damping_rule",
    "default_damping",
    "gain_ratio",
]

#: λ₀ of ``gn.egn`` when ``damping`` is not given (any policy)
DEFAULT_DAMPING = 1e-3
#: ``μ`` of the default adaptive policy's floor ``λ ≥ μ L(w)`` (docs/METHODS.md §2.2, "The
#: library default")
DEFAULT_LOSS_FLOOR = 1.0

PyTree = Any


class DampingRule(Protocol):
    """The damping protocol: an ``init`` / ``update`` pair with its own state.

    ``uses_gain_ratio`` (a class-level bool): whether the step must compute ``ρ`` (one loss value,
    reused from the line search, and the model's predicted decrease); without it ``ρ`` is NaN.
    ``init(lam0, dtype)`` gives the first state (a pytree; it becomes ``GaussNewtonState.damping``)
    from the ``damping`` argument at step 0 and the parameters' float dtype.
    ``value(state, count=None)`` is the λ of the step at ``count`` accepted steps (a scalar
    array); with ``count=None`` the λ the state holds (reported as ``StepInfo.next_damping``).
    ``update(state, rho, count=None)`` is the state kept after an accepted step at ``count``
    (a rule with a true ``uses_loss`` attribute, optional, also receives ``loss=L(w)``, the batch
    loss at the start of the step, e.g. :class:`AdaptiveDamping` with ``loss_floor > 0``);
    ``on_rejected(state)`` the state kept after a rejected one (METHODS §6). All run inside
    ``jit``; the state's structure, shapes and dtypes must not change between steps.

    Example (λ halved after each accepted step, ×4 after a rejected one; state ``(λ, rejections)``;
    ``tests/test_custom_method.py`` runs rules like it):
        >>> import jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> class HalvingWithCount:
        ...     uses_gain_ratio = False
        ...     def init(self, lam0, dtype): return (jnp.asarray(lam0, dtype), jnp.int32(0))
        ...     def value(self, state, count=None): return state[0]
        ...     def update(self, state, rho, count=None): return (state[0] / 2, state[1])
        ...     def on_rejected(self, state): return (4 * state[0], state[1] + 1)
        >>> opt = gn.egn(lambda p, x: x @ p, loss="squared_error", damping_policy=HalvingWithCount())
        >>> state = opt.init(jnp.zeros(3, jnp.float32))
        >>> float(opt.damping_rule.value(state.damping)), int(state.damping[1])
        (0.0010000000474974513, 0)
    """

    uses_gain_ratio: bool

    def init(self, lam0: Any, dtype: Any) -> PyTree: ...

    def value(self, state: PyTree, count: jax.Array | None = None) -> jax.Array: ...

    def update(self, state: PyTree, rho: jax.Array, count: jax.Array | None = None) -> PyTree: ...

    def on_rejected(self, state: PyTree) -> PyTree: ...


class DampingPolicy(Protocol):
    """The stateless damping protocol: the state is λ itself.

    ``uses_gain_ratio``: whether the step must compute ``ρ``; ``update(λ, ρ)`` gives the next λ
    after an accepted step; ``on_rejected(λ)`` the λ after a rejected (non-finite) step. Still
    accepted wherever a :class:`DampingRule` is (:func:`as_damping_rule`); with a schedule as
    ``damping`` and ``uses_gain_ratio = False`` the λ of a step is the schedule's.
    """

    uses_gain_ratio: bool

    def update(self, lam: jax.Array, rho: jax.Array) -> jax.Array: ...

    def on_rejected(self, lam: jax.Array) -> jax.Array: ...


def gain_ratio(actual: jax.Array, predicted: jax.Array) -> jax.Array:
    """``ρ = actual / predicted``; ``−inf`` when ``predicted`` is non-finite or ``≥ 0`` (failure)."""
    ok = jnp.isfinite(predicted) & (predicted < 0) & jnp.isfinite(actual)
    return jnp.where(ok, actual / jnp.where(ok, predicted, -1.0), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _ScalarDamping:
    """A :class:`DampingRule` whose state is λ itself (a scalar in the parameters' dtype)."""

    def init(self, lam0: Any, dtype: Any) -> jax.Array:
        """The first state: ``λ₀`` in ``dtype``."""
        return jnp.asarray(lam0, dtype)

    def value(self, state: jax.Array, count: jax.Array | None = None) -> jax.Array:
        """λ: the state."""
        return state


@dataclasses.dataclass(frozen=True)
class AdaptiveDamping(_ScalarDamping):
    """Gain-ratio (trust-region style) λ update; see the module docstring.

    Fields: ``increase`` (``ρ < lower``, > 1), ``decrease`` (``ρ > upper``, in (0, 1)), the clamp
    ``[min, max]`` raised to ``eps_floor · ε`` (``ε`` of λ's dtype, ``eps_floor >= 0``), the
    thresholds ``lower <= upper``, ``reject_increase`` (>= 1): the factor after a rejected step,
    and ``loss_floor`` (>= 0): ``λ ≥ loss_floor · L(w)`` after every step (0: no such floor).
    """

    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    min: float = 1e-8
    max: float = 1e8
    lower: float = 0.25
    upper: float = 0.75
    reject_increase: float = 10.0
    eps_floor: float = 1000.0
    loss_floor: float = 0.0
    uses_gain_ratio: ClassVar[bool] = True

    def __post_init__(self):
        if not self.increase > 1.0:
            raise ValueError(f"AdaptiveDamping(increase={self.increase!r}): must be > 1, e.g. 1.5.")
        if not 0.0 < self.decrease < 1.0:
            raise ValueError(
                f"AdaptiveDamping(decrease={self.decrease!r}): must lie in (0, 1), e.g. 2/3."
            )
        if not 0.0 <= self.min <= self.max:
            raise ValueError(
                f"AdaptiveDamping(min={self.min!r}, max={self.max!r}): need 0 <= min <= max."
            )
        if not self.reject_increase >= 1.0:
            raise ValueError(
                f"AdaptiveDamping(reject_increase={self.reject_increase!r}): must be >= 1, e.g. 10."
            )
        if not self.eps_floor >= 0.0:
            raise ValueError(
                f"AdaptiveDamping(eps_floor={self.eps_floor!r}): must be >= 0, e.g. 1000 (0: no "
                "dtype floor)."
            )
        if not self.loss_floor >= 0.0:
            raise ValueError(
                f"AdaptiveDamping(loss_floor={self.loss_floor!r}): must be >= 0, e.g. 1 (0: no "
                "floor from the loss)."
            )
        if not self.lower <= self.upper:
            raise ValueError(
                f"AdaptiveDamping(lower={self.lower!r}, upper={self.upper!r}): need lower <= upper."
            )

    @property
    def uses_loss(self) -> bool:
        """Whether :meth:`update` needs ``loss`` (``loss_floor > 0``)."""
        return self.loss_floor > 0

    def update(
        self,
        lam: jax.Array,
        rho: jax.Array,
        count: jax.Array | None = None,
        loss: jax.Array | None = None,
    ) -> jax.Array:
        """The next λ from the gain ratio ``rho`` (``−inf``/NaN count as failures; ``count``
        unused), then ``λ ≥ loss_floor · loss`` when ``loss_floor > 0`` and ``loss`` (the batch
        loss at the start of the step) is given (:meth:`with_loss_floor`)."""
        fail = jnp.logical_not(rho >= self.lower)
        factor = jnp.where(fail, self.increase, jnp.where(rho > self.upper, self.decrease, 1.0))
        lam = self._clamp(lam * factor)
        if self.loss_floor and loss is not None:
            lam = self.with_loss_floor(lam, loss)
        return lam

    def on_rejected(self, lam: jax.Array) -> jax.Array:
        """λ after a rejected (non-finite) step: ``λ · reject_increase``, clamped."""
        return self._clamp(lam * self.reject_increase)

    def with_loss_floor(self, lam: jax.Array, loss: jax.Array) -> jax.Array:
        """``max(λ, loss_floor · L)`` (``L`` the batch loss at the start of the step), clamped.

        The Levenberg-Marquardt rule ``λ ∝ ‖F‖²`` (Yamashita & Fukushima; Fan & Yuan) as a floor:
        it falls with the loss, so a batch that can be fitted exactly is (superlinear convergence
        on a fixed batch), while on fresh mini-batches of noisy data the batch loss stays at the
        noise level and so does λ. :meth:`update` applies it when given the loss (the step loop
        passes it when :attr:`uses_loss`).
        """
        lo = jnp.asarray(self.loss_floor, lam.dtype) * jnp.asarray(loss, lam.dtype)
        return self._clamp(jnp.maximum(lam, lo))

    def floor(self, dtype) -> float:
        """The smallest λ in ``dtype``: ``max(min, eps_floor · ε)``, e.g. 1.2e-4 in float32."""
        return max(self.min, self.eps_floor * float(jnp.finfo(dtype).eps))

    def _clamp(self, lam: jax.Array) -> jax.Array:
        lo = self.floor(lam.dtype)
        return jnp.clip(lam, lo, max(self.max, lo)).astype(lam.dtype)


def default_damping(damping_policy) -> tuple[float, object]:
    r"""``(λ₀, policy)`` of ``gn.egn`` when ``damping`` is not given (METHODS §2.2).

    ``λ₀ = 1e-3``. With ``damping_policy="adaptive"`` (the default) the policy is
    ``AdaptiveDamping(loss_floor=1)``: after every step ``λ ≥ L(w)``, ``L(w)`` the loss of the
    step's batch at its start. The gain ratio ``ρ`` is measured on the batch that built the model
    and stays near 1 for an over-parameterized network (``b·c < D``), so without a floor λ fell
    every step to the dtype floor and each step interpolated its mini-batch (measured on five
    tabular sets: ``benchmarks/defaults_criterion.py``); a floor proportional to the loss keeps
    λ at the noise level of fresh mini-batches and still falls to 0 on a batch that can be fitted
    exactly. Any other policy is returned as given. An explicit ``damping`` bypasses this
    (``"adaptive"`` is then ``AdaptiveDamping()``).

    Example:
        >>> from gaussnewton.damping import default_damping
        >>> lam, policy = default_damping("adaptive")
        >>> lam, policy.loss_floor
        (0.001, 1.0)
        >>> default_damping("constant")
        (0.001, 'constant')
    """
    if isinstance(damping_policy, str) and damping_policy == "adaptive":
        return DEFAULT_DAMPING, AdaptiveDamping(loss_floor=DEFAULT_LOSS_FLOOR)
    return DEFAULT_DAMPING, damping_policy


@dataclasses.dataclass(frozen=True)
class ConstantDamping(_ScalarDamping):
    """Constant λ, or an optax-style ``schedule(count) -> λ`` (no adaptation, ``ρ`` not computed).

    The state is λ: the constant, or with a schedule the λ of the last accepted step
    (``schedule(0)`` at first); the λ of a step is ``schedule(count)`` (``count``: accepted steps).
    ``damping_policy="constant"`` with a schedule as ``damping`` (or a schedule as
    ``damping_policy``) is ``ConstantDamping(schedule)``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import gaussnewton as gn
        >>> rule = gn.ConstantDamping(optax.exponential_decay(1.0, 1, 0.5))
        >>> state = rule.init(1.0, jnp.float32)  # schedule(0) = 1
        >>> float(rule.value(state, jnp.asarray(2)))  # λ of the step after 2 accepted steps
        0.25
    """

    schedule: Callable[[jax.Array], Any] | None = None
    uses_gain_ratio: ClassVar[bool] = False

    def init(self, lam0: Any, dtype: Any) -> jax.Array:
        """The first state: ``λ₀`` (``schedule(0)`` with a schedule) in ``dtype``."""
        if self.schedule is not None:
            lam0 = self.schedule(jnp.zeros((), jnp.int32))
        return jnp.asarray(lam0, dtype)

    def value(self, state: jax.Array, count: jax.Array | None = None) -> jax.Array:
        """λ of the step at ``count``: ``schedule(count)``, or the state (no schedule, or
        ``count=None``)."""
        if self.schedule is None or count is None:
            return state
        return jnp.asarray(self.schedule(count), jnp.result_type(state))

    def update(self, lam: jax.Array, rho: jax.Array, count: jax.Array | None = None) -> jax.Array:
        """The λ applied at ``count`` (unchanged without a schedule)."""
        return self.value(lam, count)

    def on_rejected(self, lam: jax.Array) -> jax.Array:
        """A rejected step leaves λ unchanged."""
        return lam


_Fixed = ConstantDamping  # the former private name


@dataclasses.dataclass(frozen=True)
class _StatelessDamping(_ScalarDamping):
    """A stateless :class:`DampingPolicy` as a :class:`DampingRule` (state λ; with a schedule and
    no gain ratio the λ of a step is ``schedule(count)``)."""

    policy: DampingPolicy
    schedule: Callable[[jax.Array], Any] | None = None

    @property
    def uses_gain_ratio(self) -> bool:
        return self.policy.uses_gain_ratio

    def value(self, state, count=None):
        if self.schedule is None or count is None or self.uses_gain_ratio:
            return state
        return jnp.asarray(self.schedule(count), jnp.result_type(state))

    def update(self, state, rho, count=None):
        lam = self.value(state, count)
        return jnp.asarray(self.policy.update(lam, rho), jnp.result_type(state))

    def on_rejected(self, state):
        return jnp.asarray(self.policy.on_rejected(state), jnp.result_type(state))


def is_damping_rule(obj: Any) -> bool:
    """Whether ``obj`` has the :class:`DampingRule` methods (``init``, ``value``, ``update``,
    ``on_rejected``)."""
    names = ("init", "value", "update", "on_rejected")
    return all(callable(getattr(obj, name, None)) for name in names)


def as_damping_rule(policy: DampingRule | DampingPolicy, damping: Any = None) -> DampingRule:
    """The :class:`DampingRule` of a ``damping_policy`` object: a rule itself, or a stateless
    :class:`DampingPolicy` wrapped with the state λ (``damping``, when a schedule, gives the λ of
    each step of a policy without the gain ratio)."""
    if is_damping_rule(policy):
        return policy
    return _StatelessDamping(policy, damping if callable(damping) else None)
