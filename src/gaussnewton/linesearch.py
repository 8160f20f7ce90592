r"""Step-size rules: a fixed step (``α = α_max``) and Armijo backtracking (METHODS §2.1).

A step-size rule is an ``init`` / ``update`` pair with its own state (the pattern of optax's
transforms, and of optimistix's search beside its descent), the :class:`StepSizeRule` protocol::

    state = rule.init(α_max, dtype)                     # GaussNewtonState.step_size
    result, state_kept = rule.update(state, loss_at, L(w), ∇Lᵀd, α_max)
    state_rejected = rule.on_rejected(state)            # the step loop keeps one of the two

where ``loss_at(α) = L(w + α d)`` on the step's batch and ``α_max`` is the learning rate (or its
schedule at the step count). ``result`` is a :class:`LineSearchResult`: the ``α`` taken, its loss
(reused by the step guard and the gain ratio), the forward passes used and whether the rule's test
passed.

* :class:`FixedStep` (``line_search=None``): ``α = α_max``, one forward pass (the guard needs
  ``L(w + α d)``); state: the last ``α``.
* :class:`Armijo`: accepts ``α`` when ``L(w + α d) ≤ L(w) + c₁ α ∇Lᵀd`` on the SAME mini-batch,
  shrinking ``α ← shrink · α`` for at most ``max_trials`` trials (the last trial is taken if none
  passes, and reported). Each trial costs one forward pass; the loop is a ``lax.while_loop`` and
  runs under ``jit``. State: ``α_prev``, from which the first trial of the next step ("reset") is

  * ``"increase"``: ``α₀ = min(grow · α_prev, α_max)``,
  * ``"conservative"``: ``α₀ = α_prev``,
  * ``"restart"``: ``α₀ = α_max`` every step (the SGN authors' rule),
  * ``"goldstein"``: ``α₀ = α_prev``, and the next step's ``α_prev`` becomes ``min(grow · α, α_max)``
    when the accepted step decreased the loss by more than ``−(1 − c₁) α ∇Lᵀd`` (the step was short).

A rejected step (METHODS §6) keeps ``on_rejected(state)``: the built-in rules return the state
unchanged. The stateless form of the protocol, :class:`LineSearch` (``search(loss_at, loss0, slope,
prev, alpha_max)``), is still accepted: its state is ``α_prev``, the result's ``next_step_size``.

Example:
    >>> import jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> rule = gn.Armijo(c1=0.1, shrink=0.8, max_trials=15, reset="increase")
    >>> state = rule.init(1.0, jnp.float32)
    >>> loss_at = lambda a: (1.0 - a) ** 2  # L(w + α d) along d, L(w) = 1, ∇Lᵀd = -2
    >>> one = jnp.float32(1.0)
    >>> result, state = rule.update(state, loss_at, one, -2 * one, one)
    >>> float(result.step_size), int(result.trials)
    (1.0, 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "Armijo",
    "FixedStep",
    "LineSearch",
    "LineSearchResult",
    "RESETS",
    "StepSizeRule",
    "as_step_size_rule",
]

PyTree = Any
LossAt = Callable[[jax.Array], jax.Array]

RESETS = ("increase", "conservative", "goldstein", "restart")


class LineSearchResult(NamedTuple):
    """What a step-size rule reports for one step (``info.step_size``, ``loss_after``,
    ``ls_trials``, ``ls_accepted``)."""

    step_size: jax.Array  # the α taken
    loss: jax.Array  # L(w + α d)
    trials: jax.Array  # forward passes used (int32)
    accepted: jax.Array  # whether the rule's test (Armijo's) passed (bool)
    # α_prev for the next step's reset: the state of a stateless LineSearch (a StepSizeRule
    # returns its next state beside the result and may leave this None)
    next_step_size: jax.Array | None = None


class StepSizeRule(Protocol):
    """The step-size protocol: an ``init`` / ``update`` pair with its own state.

    ``init(alpha_max, dtype)`` gives the first state (a pytree; it becomes
    ``GaussNewtonState.step_size``) from the learning rate at step 0 and the parameters' float
    dtype. ``update(state, loss_at, loss0, slope, alpha_max)`` runs inside ``jit`` once per step:
    ``loss_at(α) = L(w + α d)`` on the step's batch (one forward pass per call, already in
    ``dtype``), ``loss0 = L(w)``, ``slope = ∇Lᵀd``, ``alpha_max`` the learning rate of this step;
    it returns ``(LineSearchResult, state)``, the state kept when the step is accepted.
    ``on_rejected(state)`` is the state kept when the step loop rejects the step (METHODS §6).
    The state's structure, shapes and dtypes must not change between steps (no retracing).
    :class:`Armijo` and :class:`FixedStep` are the built-in rules; ``tests/test_custom_method.py``
    writes one with its own state (``α`` halved after a rejected step, grown after an accepted one).
    """

    def init(self, alpha_max: Any, dtype: Any) -> PyTree: ...

    def update(
        self,
        state: PyTree,
        loss_at: LossAt,
        loss0: jax.Array,
        slope: jax.Array,
        alpha_max: jax.Array,
    ) -> tuple[LineSearchResult, PyTree]: ...

    def on_rejected(self, state: PyTree) -> PyTree: ...


class LineSearch(Protocol):
    """The stateless step-size protocol: ``search(loss_at, loss0, slope, prev, alpha_max)``.

    ``loss_at(α) = L(w + α d)`` on the step's batch (one forward pass per call), ``loss0 = L(w)``,
    ``slope = ∇Lᵀd``, ``prev`` the step size stored by the previous step, ``alpha_max`` the
    learning rate of this step. Returns a :class:`LineSearchResult`; runs inside ``jit``.
    ``None`` in place of a line search means the fixed step ``α = alpha_max`` (:class:`FixedStep`).
    Still accepted wherever a :class:`StepSizeRule` is: :func:`as_step_size_rule` gives it the
    state ``prev`` (a scalar, the result's ``next_step_size``), unchanged by a rejected step.
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
class _SearchRule:
    """A :class:`StepSizeRule` made of a stateless ``search`` (the :class:`LineSearch` protocol):
    the state is ``α_prev``, the result's ``next_step_size``, unchanged by a rejected step."""

    def init(self, alpha_max: Any, dtype: Any) -> jax.Array:
        """The first state: ``α_prev = α_max`` of step 0, in ``dtype``."""
        return jnp.asarray(alpha_max, dtype)

    def update(
        self,
        state: jax.Array,
        loss_at: LossAt,
        loss0: jax.Array,
        slope: jax.Array,
        alpha_max: jax.Array,
    ) -> tuple[LineSearchResult, jax.Array]:
        """``search`` from ``prev = state``; the next state is the result's ``next_step_size``."""
        result = self.search(loss_at, loss0, slope, state, alpha_max)
        return result, jnp.asarray(result.next_step_size).astype(jnp.result_type(state))

    def on_rejected(self, state: jax.Array) -> jax.Array:
        """A rejected step leaves the state unchanged."""
        return state


@dataclasses.dataclass(frozen=True)
class Armijo(_SearchRule):
    """Armijo backtracking on the same mini-batch (see the module docstring for the math); a
    :class:`StepSizeRule` with the state ``α_prev``."""

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
            alpha = jnp.where(trials > 0, self.shrink * alpha, alpha)
            return alpha, loss_at(alpha), trials + 1

        # the first trial runs inside the loop too: one copy of the forward pass to compile
        nan = jnp.full((), jnp.nan, jnp.result_type(loss0))
        first = (alpha0, nan, jnp.asarray(0, jnp.int32))
        alpha, value, trials = jax.lax.while_loop(cond, body, first)
        accepted = passes(alpha, value)
        nxt = alpha
        if self.reset == "goldstein":
            short = value - loss0 < (1.0 - self.c1) * alpha * slope
            nxt = jnp.where(accepted & short, jnp.minimum(self.grow * alpha, alpha_max), alpha)
        return LineSearchResult(alpha, value, trials, accepted, nxt)


@dataclasses.dataclass(frozen=True)
class FixedStep(_SearchRule):
    """The fixed step ``α = α_max`` (the learning rate or its schedule; ``line_search=None``).

    ``L(w + α d)`` is still evaluated (one forward pass): the step guard rejects a step into a
    non-finite region and the gain ratio reuses it. A :class:`StepSizeRule` whose state is the
    last ``α`` (unused by the rule; kept so that every method's state has the same fields).

    Example:
        >>> import jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> rule, half, one = gn.FixedStep(), jnp.float32(0.5), jnp.float32(1.0)
        >>> loss_at = lambda a: (1.0 - a) ** 2  # L(w + α d), L(w) = 1, ∇Lᵀd = -2
        >>> result, state = rule.update(rule.init(half, jnp.float32), loss_at, one, -2 * one, half)
        >>> float(result.step_size), float(result.loss), bool(result.accepted)
        (0.5, 0.25, True)
    """

    def search(self, loss_at, loss0, slope, prev, alpha_max) -> LineSearchResult:
        """``α = α_max``: one forward pass, no test (``accepted`` is True)."""
        loss = loss_at(alpha_max)
        return LineSearchResult(
            alpha_max, loss, jnp.asarray(0, jnp.int32), jnp.asarray(True), alpha_max
        )


@dataclasses.dataclass(frozen=True)
class _StatelessSearch(_SearchRule):
    """A stateless :class:`LineSearch` as a :class:`StepSizeRule` (state ``α_prev``)."""

    line_search: LineSearch

    def search(self, loss_at, loss0, slope, prev, alpha_max) -> LineSearchResult:
        return self.line_search.search(loss_at, loss0, slope, prev, alpha_max)


def is_step_size_rule(obj: Any) -> bool:
    """Whether ``obj`` has the :class:`StepSizeRule` methods (``init``, ``update``,
    ``on_rejected``)."""
    return all(callable(getattr(obj, name, None)) for name in ("init", "update", "on_rejected"))


def as_step_size_rule(line_search: StepSizeRule | LineSearch | None) -> StepSizeRule:
    """The :class:`StepSizeRule` of a ``line_search`` argument: ``None`` → :class:`FixedStep`, a
    rule itself, or a stateless :class:`LineSearch` wrapped with the state ``α_prev``."""
    if line_search is None:
        return FixedStep()
    if is_step_size_rule(line_search):
        return line_search
    return _StatelessSearch(line_search)
