r"""Gram (empirical NTK) matrices ``K = J Jᵀ`` behind one small interface (METHODS.md section 3).

A *strategy* is a function ``strategy(model_fn, params, x1, x2) -> K`` where ``model_fn(params, x)``
returns outputs of shape ``(n, k)`` (always 2-D here), ``x1``/``x2`` are pytrees of arrays with a
leading example axis (``x2=None`` means ``x1``) and ``K`` has shape ``(n1, k, n2, k)`` with

.. math:: K[i, a, j, b] = \langle \partial f_{ia}(x1_i) / \partial w,\; \partial f_{jb}(x2_j) / \partial w \rangle .

Strategies are registered by name (:func:`register_strategy`); ``"auto"`` picks one per problem with
:func:`resolve_strategy`. Everything is computed in at least float32 (float64 under x64), whatever
the parameter dtype.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> p = {"w": jnp.ones((3, 2))}
    >>> gn.empirical_ntk(fn, p, jnp.ones((4, 3))).shape
    (8, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from gaussnewton._tree import tree_size
from gaussnewton.gram._jacobian import jacobian_gram
from gaussnewton.gram._matvec import gram_matvec, matvec_gram
from gaussnewton.gram.structured import structured_gram

PyTree = Any
ModelFn = Callable[[PyTree, PyTree], jax.Array]
GramStrategy = Callable[[ModelFn, PyTree, PyTree, PyTree | None], jax.Array]

__all__ = [
    "GramStrategy",
    "STRATEGIES",
    "register_strategy",
    "resolve_strategy",
    "gram",
    "gram_matvec",
    "as_2d",
    "empirical_ntk",
]

STRATEGIES: dict[str, GramStrategy] = {
    "jacobian": jacobian_gram,
    "matvec": matvec_gram,
    "structured": structured_gram,
}

# A materialized Jacobian above this many bytes makes "auto" avoid the jacobian strategy.
_JACOBIAN_BYTES_LIMIT = 1 << 30


def register_strategy(name: str, strategy: GramStrategy) -> None:
    """Make ``strategy`` available as ``gram=name`` in every method and in :func:`gram`."""
    if not callable(strategy):
        raise TypeError(f"register_strategy: strategy for {name!r} must be callable.")
    STRATEGIES[name] = strategy


def as_2d(model_fn: ModelFn) -> ModelFn:
    """Wrap ``model_fn`` so that ``(b,)`` outputs become ``(b, 1)``; 2-D outputs pass through."""

    def fn2d(params, x):
        f = model_fn(params, x)
        if f.ndim == 1:
            return f[:, None]
        if f.ndim != 2:
            raise ValueError(
                f"model_fn must return outputs of shape (b, c) or (b,), got shape {tuple(f.shape)}; "
                "flatten the per-example outputs (e.g. f.reshape(b, -1))."
            )
        return f

    return fn2d


def resolve_strategy(
    strategy: str, model_fn: ModelFn, params: PyTree, x: PyTree, num_outputs: int
) -> str:
    """The name of the strategy to use; ``"auto"`` prefers ``"structured"`` when registered, else
    ``"jacobian"`` while the materialized Jacobian stays under 1 GiB, else ``"matvec"``."""
    if strategy != "auto":
        if strategy not in STRATEGIES:
            raise ValueError(
                f"gram={strategy!r} is unknown; use 'auto' or one of {sorted(STRATEGIES)}."
            )
        return strategy
    if "structured" in STRATEGIES:
        return "structured"
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    if 4 * n * num_outputs * tree_size(params) <= _JACOBIAN_BYTES_LIMIT:
        return "jacobian"
    return "matvec"


def gram(
    model_fn: ModelFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    strategy: str = "auto",
) -> jax.Array:
    """``K = J(x1) J(x2)ᵀ`` of shape ``(n1, k, n2, k)`` for a 2-D ``model_fn`` (see module doc)."""
    k = jax.eval_shape(model_fn, params, x1).shape[1]
    name = resolve_strategy(strategy, model_fn, params, x1, k)
    return STRATEGIES[name](model_fn, params, x1, x2)


def empirical_ntk(
    model_fn: ModelFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    strategy: str = "auto",
) -> jax.Array:
    r"""The empirical neural tangent kernel ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` of shape ``(n1·c, n2·c)``.

    Rows are example-major (example ``i``, then output ``a``): ``Θ[i c + a, j c + b] =
    ⟨∂f_a(x1_i)/∂w, ∂f_b(x2_j)/∂w⟩``. ``model_fn(params, x)`` returns ``(n, c)`` or ``(n,)``.
    """
    fn = as_2d(model_fn)
    k = gram(fn, params, x1, x2, strategy=strategy)
    n1, c, n2, _ = k.shape
    return k.reshape(n1 * c, n2 * c)
