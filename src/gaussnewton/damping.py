r"""Damping (λ) policies (METHODS §2.2): constant, a schedule of the step count, or adaptive.

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
    >>> import gaussnewton as gn
    >>> policy = gn.AdaptiveDamping(increase=1.5, decrease=2 / 3, min=1e-6, max=1e4)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "AdaptiveDamping",
    "ConstantDamping",
    "DampingPolicy",
    "DEFAULT_DAMPING",
    "DEFAULT_LOSS_FLOOR",
    "default_damping",
    "gain_ratio",
]

#: λ₀ of ``gn.egn`` when ``damping`` is not given (any policy)
DEFAULT_DAMPING = 1e-3
#: ``μ`` of the default adaptive policy's floor ``λ ≥ μ L(w)`` (docs/METHODS.md §2.2, "The
#: library default")
DEFAULT_LOSS_FLOOR = 1.0


class DampingPolicy(Protocol):
    """The damping protocol: what the step loop asks of a λ policy.

    ``uses_gain_ratio``: whether the step must compute ``ρ`` (one loss value, reused from the line
    search, and the model's predicted decrease); ``update(λ, ρ)`` gives the next λ after an accepted
    step; ``on_rejected(λ)`` the λ after a rejected (non-finite) step.
    """

    uses_gain_ratio: bool

    def update(self, lam: jax.Array, rho: jax.Array) -> jax.Array: ...

    def on_rejected(self, lam: jax.Array) -> jax.Array: ...


def gain_ratio(actual: jax.Array, predicted: jax.Array) -> jax.Array:
    """``ρ = actual / predicted``; ``−inf`` when ``predicted`` is non-finite or ``≥ 0`` (failure)."""
    ok = jnp.isfinite(predicted) & (predicted < 0) & jnp.isfinite(actual)
    return jnp.where(ok, actual / jnp.where(ok, predicted, -1.0), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class AdaptiveDamping:
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

    def update(self, lam: jax.Array, rho: jax.Array) -> jax.Array:
        """The next λ from the gain ratio ``rho`` (``−inf``/NaN count as failures)."""
        fail = jnp.logical_not(rho >= self.lower)
        factor = jnp.where(fail, self.increase, jnp.where(rho > self.upper, self.decrease, 1.0))
        return self._clamp(lam * factor)

    def on_rejected(self, lam: jax.Array) -> jax.Array:
        """λ after a rejected (non-finite) step: ``λ · reject_increase``, clamped."""
        return self._clamp(lam * self.reject_increase)

    def with_loss_floor(self, lam: jax.Array, loss: jax.Array) -> jax.Array:
        """``max(λ, loss_floor · L)`` (``L`` the batch loss at the start of the step), clamped.

        The Levenberg-Marquardt rule ``λ ∝ ‖F‖²`` (Yamashita & Fukushima; Fan & Yuan) as a floor:
        it falls with the loss, so a batch that can be fitted exactly is (superlinear convergence
        on a fixed batch), while on fresh mini-batches of noisy data the batch loss stays at the
        noise level and so does λ. The optimizer applies it after :meth:`update` when
        ``loss_floor > 0``.
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
class ConstantDamping:
    """Constant λ or an optax-style schedule ``count -> λ`` (no adaptation, ``ρ`` not computed)."""

    uses_gain_ratio: ClassVar[bool] = False

    def update(self, lam: jax.Array, rho: jax.Array) -> jax.Array:
        return lam

    def on_rejected(self, lam: jax.Array) -> jax.Array:
        return lam


_Fixed = ConstantDamping  # the former private name
