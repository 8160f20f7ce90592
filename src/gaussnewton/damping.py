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
    "DEFAULT_ADAPTIVE_DAMPING",
    "DEFAULT_CONSTANT_DAMPING",
    "default_damping",
    "gain_ratio",
]

#: λ₀ = λ_min of ``gn.egn``'s default adaptive damping (``damping`` not given): λ starts at 0.3
#: and never falls below it (docs/METHODS.md §2.2, "The library default")
DEFAULT_ADAPTIVE_DAMPING = 0.3
#: λ of ``gn.egn(..., damping_policy="constant")`` when ``damping`` is not given
DEFAULT_CONSTANT_DAMPING = 1e-3


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
    thresholds ``lower <= upper``, and ``reject_increase`` (>= 1): the factor after a rejected step.
    """

    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    min: float = 1e-8
    max: float = 1e8
    lower: float = 0.25
    upper: float = 0.75
    reject_increase: float = 10.0
    eps_floor: float = 1000.0
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

    def floor(self, dtype) -> float:
        """The smallest λ in ``dtype``: ``max(min, eps_floor · ε)``, e.g. 1.2e-4 in float32."""
        return max(self.min, self.eps_floor * float(jnp.finfo(dtype).eps))

    def _clamp(self, lam: jax.Array) -> jax.Array:
        lo = self.floor(lam.dtype)
        return jnp.clip(lam, lo, max(self.max, lo)).astype(lam.dtype)


def default_damping(damping_policy) -> tuple[float, object]:
    r"""``(λ₀, policy)`` of ``gn.egn`` when ``damping`` is not given (METHODS §2.2).

    With ``damping_policy="adaptive"`` (the default): ``λ₀ = λ_min = 0.3``, i.e.
    ``AdaptiveDamping(min=0.3)``: the gain ratio ``ρ`` measured on the batch that built the model
    is close to 1 for an over-parameterized network (``b·c < D``), so λ would otherwise fall every
    step to the dtype floor, each step would interpolate its mini-batch and the training loss and
    test error rise (measured on five tabular sets: ``benchmarks/defaults_criterion.py``). Any
    other policy keeps ``λ₀ = 1e-3`` and is returned as given. An explicit ``damping`` bypasses
    this (``AdaptiveDamping()``'s bounds then apply; set a floor with
    ``damping_policy=gn.AdaptiveDamping(min=...)``).

    Example:
        >>> from gaussnewton.damping import default_damping
        >>> lam, policy = default_damping("adaptive")
        >>> lam, policy.min
        (0.3, 0.3)
        >>> default_damping("constant")
        (0.001, 'constant')
    """
    if isinstance(damping_policy, str) and damping_policy == "adaptive":
        lam = DEFAULT_ADAPTIVE_DAMPING
        return lam, AdaptiveDamping(min=lam)
    return DEFAULT_CONSTANT_DAMPING, damping_policy


@dataclasses.dataclass(frozen=True)
class ConstantDamping:
    """Constant λ or an optax-style schedule ``count -> λ`` (no adaptation, ``ρ`` not computed)."""

    uses_gain_ratio: ClassVar[bool] = False

    def update(self, lam: jax.Array, rho: jax.Array) -> jax.Array:
        return lam

    def on_rejected(self, lam: jax.Array) -> jax.Array:
        return lam


_Fixed = ConstantDamping  # the former private name
