r"""Models with mutable state (batch norm) and per-step randomness (dropout): :class:`Model`.

Every method takes ``model_fn``: either a plain function ``model_fn(params, x) -> outputs`` or a
:class:`Model`, which says how to call a function that also takes (and returns) model state and/or
takes a PRNG key:

============================  ===================================================================
``Model(fn)``                 ``fn(params, x) -> f``
``Model(fn, needs_key=True)`` ``fn(params, x, *, key) -> f``
``Model(fn, has_state=True)`` ``fn(params, x, *, state) -> (f, new_state)``
both                          ``fn(params, x, *, state, key) -> (f, new_state)``
============================  ===================================================================

What the optimizers do with them (one step on the batch ``(x, y)``):

* the key of the step (``step(..., key=k)``, or split from the optimizer state) is passed to the
  model for the direction AND for every line-search / gain-ratio evaluation of that step, so one
  step sees ONE function ``w ↦ f(w, x; state, key)`` (one dropout mask);
* the model state enters every evaluation of the step unchanged; the state returned by the
  evaluation at the current parameters becomes ``opt_state.model_state`` when the step is accepted
  (a rejected step keeps the old one). ``opt.init(params, model_state=...)`` sets the first value
  (default: ``Model.initial_state``).

A train-mode batch norm or a batch-shaped dropout mask couples the examples of a batch; the Gram
engine detects that and uses whole-batch (exact) Jacobian products for such models.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> def fn(p, x, *, state, key):
    ...     h = x @ p["w"]
    ...     keep = jax.random.bernoulli(key, 0.9, h.shape)
    ...     return jnp.where(keep, h / 0.9, 0.0)[:, 0], {"calls": state["calls"] + 1}
    >>> model = gn.Model(fn, has_state=True, needs_key=True, initial_state={"calls": 0})
    >>> opt = gn.egn(model, loss="squared_error")
    >>> p = {"w": jnp.ones((3, 1))}
    >>> state = opt.init(p)
    >>> p, state, info = jax.jit(opt.step)(p, state, jnp.ones((4, 3)), jnp.zeros(4))
    >>> int(state.model_state["calls"])
    1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any

__all__ = ["Model", "as_model"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model function and how to call it (see the module docstring).

    Attributes:
        fn: the user's function (signature depends on ``has_state`` / ``needs_key``).
        has_state: ``fn`` takes ``state=`` and returns ``(outputs, new_state)``.
        needs_key: ``fn`` takes ``key=`` (a fresh PRNG key per optimizer step).
        initial_state: the model state :meth:`GaussNewtonOptimizer.init` starts from when it is
            not given ``model_state``.
    """

    fn: Callable
    has_state: bool = False
    needs_key: bool = False
    initial_state: PyTree = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Model(fn={self.fn!r}): fn must be callable.")
        for name in ("has_state", "needs_key"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Model({name}={getattr(self, name)!r}) must be True or False.")

    def apply(
        self, params: PyTree, x: PyTree, state: PyTree = None, key: jax.Array | None = None
    ) -> tuple[jax.Array, PyTree]:
        """``(outputs, new_state)``; ``new_state is state`` for a stateless model."""
        kwargs = {}
        if self.has_state:
            kwargs["state"] = state
        if self.needs_key:
            if key is None:
                raise ValueError(
                    "this Model needs a PRNG key (needs_key=True): pass key=jax.random.key(...) "
                    "(the optimizers draw one per step from their state)."
                )
            kwargs["key"] = key
        out = self.fn(params, x, **kwargs)
        if self.has_state:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "a Model with has_state=True must return (outputs, new_state), got "
                    f"{type(out).__name__}."
                )
            return out
        return out, state

    def bind(self, state: PyTree = None, key: jax.Array | None = None) -> Callable:
        """The plain function ``(params, x) -> outputs`` with ``state`` and ``key`` held fixed."""
        if not (self.has_state or self.needs_key):
            return self.fn
        return lambda params, x: self.apply(params, x, state, key)[0]

    def __call__(self, params: PyTree, x: PyTree, state: PyTree = None, key=None) -> jax.Array:
        """The outputs only (``state`` defaults to :attr:`initial_state`)."""
        state = self.initial_state if state is None else state
        return self.apply(params, x, state, key)[0]


def as_model(model_fn: Callable | Model) -> Model:
    """``model_fn`` as a :class:`Model` (a plain callable is ``Model(model_fn)``)."""
    if isinstance(model_fn, Model):
        return model_fn
    if not callable(model_fn):
        raise TypeError(
            f"model_fn must be a callable model_fn(params, x) -> outputs (b, ...) or a gn.Model, "
            f"got {model_fn!r}."
        )
    return Model(model_fn)
