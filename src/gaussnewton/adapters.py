"""Helpers for Flax NNX and Equinox models (optional imports; the core never needs them).

Both return ``(model_fn, params, combine)``: a pure ``model_fn(params, x)`` for the optimizers, the
trainable parameters as a pytree, and ``combine(params)`` that rebuilds the framework's model.

Flax NNX (the recipe behind :func:`from_nnx`)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)

Equinox (the recipe behind :func:`from_equinox`)::

    params, static = eqx.partition(model, eqx.is_inexact_array)
    model_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)   # Equinox models are per-example

Example:
    >>> from flax import nnx
    >>> import gaussnewton as gn
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> model_fn, params, combine = gn.from_nnx(model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["from_nnx", "from_equinox"]


def from_nnx(model: Any) -> tuple[Callable, Any, Callable[[Any], Any]]:
    """Split a Flax NNX module into ``(model_fn, params, combine)``; only ``nnx.Param`` is trained.

    Other state (e.g. batch statistics, RNG counters) is held fixed at its current value.
    """
    try:
        from flax import nnx
    except ImportError as e:  # pragma: no cover - exercised only without flax
        raise ImportError("from_nnx needs flax: pip install flax") from e
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def model_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    def combine(p):
        return nnx.merge(graphdef, p, rest)

    return model_fn, params, combine


def from_equinox(
    model: Any, *, batched: bool = False
) -> tuple[Callable, Any, Callable[[Any], Any]]:
    """Partition an Equinox module into ``(model_fn, params, combine)``.

    Equinox layers act on ONE example; ``model_fn`` vmaps over the batch unless ``batched=True``
    (the model already takes a batch).
    """
    try:
        import equinox as eqx
    except ImportError as e:  # pragma: no cover - exercised only without equinox
        raise ImportError("from_equinox needs equinox: pip install equinox") from e
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def model_fn(p, x):
        m = eqx.combine(p, static)
        return m(x) if batched else jax.vmap(m)(x)

    def combine(p):
        return eqx.combine(p, static)

    return model_fn, params, combine
