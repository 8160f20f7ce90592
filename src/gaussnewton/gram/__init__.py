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
from gaussnewton.gram._jacobian import jacobian_factors, jacobian_gram
from gaussnewton.gram._matvec import gram_matvec, matvec_gram
from gaussnewton.gram.structured import structured_factors, structured_gram

PyTree = Any
ModelFn = Callable[[PyTree, PyTree], jax.Array]
GramStrategy = Callable[[ModelFn, PyTree, PyTree, PyTree | None], jax.Array]
#: ``factors(model_fn, params, x) -> (F, block)``: see :func:`gram_factors`.
GramFactors = Callable[[ModelFn, PyTree, PyTree], tuple[PyTree, Callable[..., jax.Array]]]

__all__ = [
    "GramStrategy",
    "GramFactors",
    "FACTORS",
    "gram_factors",
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

#: strategies that can build the Gram of a batch block by block from per-example factors
FACTORS: dict[str, GramFactors] = {
    "jacobian": jacobian_factors,
    "structured": structured_factors,
}

# A materialized Jacobian above this many bytes makes "auto" avoid the jacobian strategy.
_JACOBIAN_BYTES_LIMIT = 1 << 30


def register_strategy(
    name: str, strategy: GramStrategy, factors: GramFactors | None = None
) -> None:
    """Make ``strategy`` available as ``gram=name`` in every method and in :func:`gram`.

    ``factors`` (optional) is its two-stage form for :func:`gram_factors`; without it, blocks of
    the Gram call ``strategy`` on pairs of example slices.
    """
    if not callable(strategy):
        raise TypeError(f"register_strategy: strategy for {name!r} must be callable.")
    if factors is not None and not callable(factors):
        raise TypeError(f"register_strategy: factors for {name!r} must be callable or None.")
    STRATEGIES[name] = strategy
    FACTORS.pop(name, None)
    if factors is not None:
        FACTORS[name] = factors


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


def gram_factors(
    model_fn: ModelFn, params: PyTree, x: PyTree, *, strategy: str = "auto"
) -> tuple[PyTree, Callable[..., jax.Array]]:
    """The Gram of ``x`` in two stages: ``(F, block)``.

    Every leaf of ``F`` has the leading example axis of ``x``. For index sets ``I``, ``J`` (``F``
    sliced along that axis, e.g. ``tree_map(lambda a: a[I], F)``), ``block(F_I, F_J)`` is
    ``K[I, :, J, :]`` and ``block(F_I)`` is ``K[I, :, I, :]``. Strategies with a factor form
    (:data:`FACTORS`: the per-example passes run once for the whole batch) use it; any other
    strategy gets ``F = x`` and ``block`` calls it on the slices.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gaussnewton.gram import gram, gram_factors
        >>> fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
        >>> p = {"w": jnp.ones((3, 4)) / 3, "v": jnp.ones((4, 2)) / 4}
        >>> x = jnp.arange(15.0).reshape(5, 3) / 15
        >>> F, block = gram_factors(fn, p, x)
        >>> top = jax.tree_util.tree_map(lambda a: a[:2], F)
        >>> rest = jax.tree_util.tree_map(lambda a: a[2:], F)
        >>> bool(jnp.allclose(block(rest, top), gram(fn, p, x)[2:, :, :2], atol=1e-6))
        True
    """
    k = jax.eval_shape(model_fn, params, x).shape[1]
    name = resolve_strategy(strategy, model_fn, params, x, k)
    if name in FACTORS:
        return FACTORS[name](model_fn, params, x)
    fn = STRATEGIES[name]

    def block(x1: PyTree, x2: PyTree | None = None) -> jax.Array:
        return fn(model_fn, params, x1, x2)

    return x, block


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
