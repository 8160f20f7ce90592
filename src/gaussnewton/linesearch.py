r"""Step-size policies: a fixed learning rate (or optax schedule) and Armijo backtracking (METHODS §2.1).

Armijo accepts ``α`` when ``L(w + α d) ≤ L(w) + c₁ α ∇Lᵀd`` on the SAME mini-batch, shrinking
``α ← shrink · α`` for at most ``max_trials`` trials (the last trial is taken if none passes, and
reported). Each trial costs one forward pass; the loop is a ``lax.while_loop`` and runs under ``jit``.
The first trial of each step ("reset") is

* ``"increase"``: ``α₀ = min(grow · α_prev, α_max)``,
* ``"conservative"``: ``α₀ = α_prev``,
* ``"restart"``: ``α₀ = α_max`` every step (the SGN authors' rule),
* ``"goldstein"``: ``α₀ = α_prev``, and the next step's ``α_prev`` becomes ``min(grow · α, α_max)``
  when the accepted step decreased the loss by more than ``−(1 − c₁) α ∇Lᵀd`` (the step was short).

``α_max`` is the learning rate.

Example:
    >>> import gaussnewton as gn
    >>> opt_ls = gn.Armijo(c1=0.1, shrink=0.8, max_trials=15, reset="increase")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

__all__ = ["Armijo", "LineSearch", "LineSearchResult", "RESETS"]

RESETS = ("increase", "conservative", "goldstein", "restart")


class LineSearchResult(NamedTuple):
    step_size: jax.Array  # the α taken
    loss: jax.Array  # L(w + α d)
    trials: jax.Array  # forward passes used (int32)
    accepted: jax.Array  # whether the Armijo test passed (bool)
    next_step_size: jax.Array  # α_prev stored for the next step's reset


class LineSearch(Protocol):
    """The step-size protocol: ``search(loss_at, loss0, slope, prev, alpha_max)``.

    ``loss_at(α) = L(w + α d)`` on the step's batch (one forward pass per call), ``loss0 = L(w)``,
    ``slope = ∇Lᵀd``, ``prev`` the step size stored by the previous step, ``alpha_max`` the
    learning rate of this step. Returns a :class:`LineSearchResult`; runs inside ``jit``.
    ``None`` in place of a line search means the fixed step ``α = alpha_max``.
    """

    def search(
        self,
        loss_at: Callable[[jax.Array], jax.Array],
        loss0: jax.Array,
        slope: jax.Array,
        prev: jax.Array,
        alpha_max: jax.Array,
    ) -> LineSearchResult: ...


@dataclasses.dataclass(frozen=True)
class Armijo:
    """Armijo backtracking on the same mini-batch (see the module docstring for the math)."""

    c1: float = 0.1
    shrink: float = 0.8
    max_trials: int = 15
    reset: Literal["increase", "conservative", "goldstein", "restart"] = "increase"
    grow: float = 1.5

    def __post_init__(self):
        if not 0.0 < self.c1 < 1.0:
            raise ValueError(f"Armijo(c1={self.c1!r}): c1 must lie in (0, 1), e.g. 0.1.")
        if not 0.0 < self.shrink < 1.0:
            raise ValueError(
                f"Armijo(shrink={self.shrink!r}): shrink must lie in (0, 1), e.g. 0.8."
            )
        if not (isinstance(self.max_trials, int) and self.max_trials >= 1):
            raise ValueError(
                f"Armijo(max_trials={self.max_trials!r}): use an integer >= 1, e.g. 15."
            )
        if self.reset not in RESETS:
            raise ValueError(f"Armijo(reset={self.reset!r}): use one of {RESETS}.")
        if not self.grow >= 1.0:
            raise ValueError(f"Armijo(grow={self.grow!r}): grow must be >= 1, e.g. 1.5.")

    def initial_step_size(self, prev: jax.Array, alpha_max: jax.Array) -> jax.Array:
        if self.reset == "increase":
            return jnp.minimum(self.grow * prev, alpha_max)
        if self.reset == "restart":
            return jnp.asarray(alpha_max, jnp.result_type(prev))
        return jnp.minimum(prev, alpha_max)

    def search(
        self,
        loss_at: Callable[[jax.Array], jax.Array],
        loss0: jax.Array,
        slope: jax.Array,
        prev: jax.Array,
        alpha_max: jax.Array,
    ) -> LineSearchResult:
        """Backtrack from the reset ``α₀``; ``loss_at(α) = L(w + α d)``, ``slope = ∇Lᵀd``."""
        alpha0 = self.initial_step_size(prev, alpha_max)

        def passes(alpha, value):
            return value <= loss0 + self.c1 * alpha * slope  # False for NaN

        def cond(carry):
            alpha, value, trials = carry
            return jnp.logical_and(trials < self.max_trials, jnp.logical_not(passes(alpha, value)))

        def body(carry):
            alpha, _, trials = carry
            alpha = self.shrink * alpha
            return alpha, loss_at(alpha), trials + 1

        first = (alpha0, loss_at(alpha0), jnp.asarray(1, jnp.int32))
        alpha, value, trials = jax.lax.while_loop(cond, body, first)
        accepted = passes(alpha, value)
        nxt = alpha
        if self.reset == "goldstein":
            short = value - loss0 < (1.0 - self.c1) * alpha * slope
            nxt = jnp.where(accepted & short, jnp.minimum(self.grow * alpha, alpha_max), alpha)
        return LineSearchResult(alpha, value, trials, accepted, nxt)
