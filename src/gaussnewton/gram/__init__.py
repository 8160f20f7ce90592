r"""Gram (empirical NTK) matrices ``K = J Jᵀ`` behind one small interface (docs/METHODS.md section 3).

A *strategy* is a function ``strategy(model_fn, params, x1, x2) -> K`` where ``model_fn(params, x)``
returns outputs of shape ``(n, k)`` (always 2-D here), ``x1``/``x2`` are pytrees of arrays with a
leading example axis (``x2=None`` means ``x1``) and ``K`` has shape ``(n1, k, n2, k)`` with

.. math:: K[i, a, j, b] = \langle \partial f_{ia}(x1_i) / \partial w,\; \partial f_{jb}(x2_j) / \partial w \rangle .

Strategies are registered by name (:func:`register_strategy`); ``"auto"`` picks one per problem with
:func:`resolve_strategy`. Everything is computed in at least float32 (float64 under x64), whatever
the parameter dtype.

Batch coupling: ``"jacobian"`` and ``"structured"`` evaluate the model per example (on a batch of
one), which is exact only when examples do not interact inside ``model_fn``. Every entry point here
(:func:`gram`, :func:`gram_factors`, :func:`empirical_ntk`, :func:`gram_diagonal`) first asks
:func:`batch_coupling` (a dataflow analysis of the batched model's jaxpr, shapes only); a coupled
model (batch norm in train mode, ``x - x.mean(0)``, attention across the batch, a ``(b, h)``
dropout mask) gets the exact ``"whole-batch"`` strategy instead: the Jacobian of the BATCHED
function (``K`` from matrix-free products on the whole batch above the Jacobian byte limit). For a
cross Gram ``K(x1, x2)`` of a coupled model, the rows of ``J(x1)`` come from the batch ``x1`` and
those of ``J(x2)`` from the batch ``x2``. ``"matvec"`` is always evaluated on whole batches.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> p = {"w": jnp.ones((3, 2))}
    >>> gn.empirical_ntk(fn, p, jnp.ones((4, 3))).shape
    (8, 8)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gaussnewton._sharding import replicate
from gaussnewton._tree import tree_size
from gaussnewton.gram._coupling import Coupling, batch_coupling
from gaussnewton.gram._jacobian import jacobian_factors, jacobian_gram
from gaussnewton.gram._matvec import gram_matvec, matvec_gram
from gaussnewton.gram._whole import (
    rows_factors,
    whole_batch_diagonal,
    whole_batch_factors,
    whole_batch_gram,
)
from gaussnewton.gram.structured import GramRule, register_rule, unregister_rule
from gaussnewton.gram.structured._assemble import structured_factors, structured_gram

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
    "strategy_name",
    "resolve_strategy",
    "gram",
    "gram_matvec",
    "as_2d",
    "empirical_ntk",
    "gram_diagonal",
    "Coupling",
    "batch_coupling",
    "PER_EXAMPLE",
    "WHOLE_BATCH",
    "GramRule",
    "register_rule",
    "unregister_rule",
]

#: the exact strategy for batch-coupled models: the Jacobian of the batched function
WHOLE_BATCH = "whole-batch"

# A materialized Jacobian above this many bytes makes "auto" avoid the jacobian strategy (and the
# whole-batch strategy form K from matrix-free products instead).
_JACOBIAN_BYTES_LIMIT = 1 << 30


def _whole_batch_gram(model_fn, params, x1, x2=None):
    return whole_batch_gram(model_fn, params, x1, x2, limit=_JACOBIAN_BYTES_LIMIT)


def _whole_batch_factors(model_fn, params, x):
    return whole_batch_factors(model_fn, params, x, limit=_JACOBIAN_BYTES_LIMIT)


STRATEGIES: dict[str, GramStrategy] = {
    "jacobian": jacobian_gram,
    "matvec": matvec_gram,
    "structured": structured_gram,
    WHOLE_BATCH: _whole_batch_gram,
}

#: strategies that can build the Gram of a batch block by block from per-example factors
FACTORS: dict[str, GramFactors] = {
    "jacobian": jacobian_factors,
    "structured": structured_factors,
    WHOLE_BATCH: _whole_batch_factors,
}

#: strategies that evaluate the model per example: a batch-coupled model gets "whole-batch" instead
PER_EXAMPLE: set[str] = {"jacobian", "structured"}
_BUILTIN = frozenset(STRATEGIES)


def register_strategy(
    name: str,
    strategy: GramStrategy,
    factors: GramFactors | None = None,
    *,
    per_example: bool = True,
) -> None:
    """Make ``strategy`` available as ``gram=name`` in every method and in :func:`gram`.

    ``factors`` (optional) is its two-stage form for :func:`gram_factors`; without it, blocks of
    the Gram call ``strategy`` on pairs of example slices (or, for a batch-coupled model, slice a
    Gram formed once on the whole batch). ``per_example=True`` (the default) declares that the
    strategy evaluates the model example by example: for a batch-coupled model (see
    :func:`batch_coupling`) the exact ``"whole-batch"`` strategy is used instead, with a
    ``UserWarning`` naming the reasons. Declare ``per_example=False`` for a strategy that is exact
    on whole batches (as ``"matvec"`` is).

    Example:
        >>> import gaussnewton as gn
        >>> from gaussnewton.gram import PER_EXAMPLE, STRATEGIES
        >>> gn.register_strategy("mine", STRATEGIES["matvec"], per_example=False)
        >>> "mine" in PER_EXAMPLE
        False
        >>> _ = STRATEGIES.pop("mine")
    """
    if not callable(strategy):
        raise TypeError(f"register_strategy: strategy for {name!r} must be callable.")
    if factors is not None and not callable(factors):
        raise TypeError(f"register_strategy: factors for {name!r} must be callable or None.")
    if not isinstance(per_example, bool):
        raise TypeError(
            f"register_strategy: per_example for {name!r} must be True or False, got "
            f"{per_example!r}."
        )
    STRATEGIES[name] = strategy
    FACTORS.pop(name, None)
    if factors is not None:
        FACTORS[name] = factors
    if per_example:
        PER_EXAMPLE.add(name)
    else:
        PER_EXAMPLE.discard(name)


def strategy_name(gram: str | GramStrategy) -> str:
    """The registered name of a ``gram=`` argument: ``"auto"``, a name in :data:`STRATEGIES`, or a
    strategy object / callable registered with :func:`register_strategy` (looked up by identity).

    Example:
        >>> from gaussnewton.gram import STRATEGIES, strategy_name
        >>> strategy_name(STRATEGIES["matvec"]), strategy_name("jacobian")
        ('matvec', 'jacobian')
    """
    if isinstance(gram, str):
        if gram != "auto" and gram not in STRATEGIES:
            raise ValueError(
                f"gram={gram!r} is unknown; use 'auto' or one of {sorted(STRATEGIES)}."
            )
        return gram
    for name, registered in STRATEGIES.items():
        if registered is gram:
            return name
    if callable(gram):
        raise ValueError(
            f"gram={gram!r} is not a registered strategy; register it first with "
            "gn.register_strategy(name, strategy) and pass gram=name (or the same object)."
        )
    raise TypeError(
        f"gram={gram!r} must be a strategy name ('auto' or one of {sorted(STRATEGIES)}) or a "
        "strategy registered with gn.register_strategy."
    )


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
    strategy: str,
    model_fn: ModelFn,
    params: PyTree,
    x: PyTree,
    num_outputs: int,
    *,
    x2: PyTree | None = None,
) -> str:
    """The name of the strategy to use; ``"auto"`` prefers ``"structured"`` when registered, else
    ``"jacobian"`` while the materialized Jacobian stays under 1 GiB, else ``"matvec"``. A
    per-example strategy (:data:`PER_EXAMPLE`) on a batch-coupled model (on ``x`` or ``x2``)
    resolves to ``"whole-batch"``."""
    return _resolve(strategy, model_fn, params, x, num_outputs, x2)[0]


def _pick(strategy: str, params: PyTree, x: PyTree, num_outputs: int) -> str:
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


def _coupling(model_fn: ModelFn, params: PyTree, x: PyTree, x2: PyTree | None) -> Coupling:
    c = batch_coupling(model_fn, params, x)
    if x2 is None or c.coupled:
        return c
    return batch_coupling(model_fn, params, x2)


def _resolve(strategy, model_fn, params, x, num_outputs, x2=None, *, factors=False):
    """``(name, coupling or None)``; the analysis runs for per-example strategies, and with
    ``factors`` for strategies without a factor form (their blocks would slice the batch)."""
    name = _pick(strategy, params, x, num_outputs)
    if name not in PER_EXAMPLE and not (factors and name not in FACTORS):
        return name, None
    c = _coupling(model_fn, params, x, x2)
    if c.coupled and name in PER_EXAMPLE:
        if name not in _BUILTIN:
            warnings.warn(
                f"gram={name!r} is a per-example strategy but the model couples the examples of "
                f"the batch ({c.summary()}); using the exact 'whole-batch' strategy instead. "
                "Register it with per_example=False if it is exact on whole batches.",
                stacklevel=3,
            )
        return WHOLE_BATCH, c
    return name, c


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
    name, _ = _resolve(strategy, model_fn, params, x1, k, x2)
    # on a mesh (jit with batch-sharded inputs): the (n1, n2) result is replicated, so are its inputs
    x1, x2 = replicate((x1, x2))
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
    name, coupling = _resolve(strategy, model_fn, params, x, k, factors=True)
    if name in FACTORS:
        return FACTORS[name](model_fn, params, x)
    fn = STRATEGIES[name]
    if coupling is not None and coupling.coupled:
        return rows_factors(fn(model_fn, params, x, None))

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


def gram_diagonal(
    model_fn: ModelFn, params: PyTree, x: PyTree, *, strategy: str = "auto"
) -> jax.Array:
    r"""The Gram diagonal ``K[i, a, i, a] = ‖∂f_{ia}/∂w‖²``, shape ``(n, c)`` (``c = 1`` for ``(n,)``
    outputs).

    For a per-example model these are the squared norms of the per-example output gradients,
    computed per example from the factors of :func:`gram_factors` (cost linear in ``n``); for a
    batch-coupled model (:func:`batch_coupling`) they come from the Jacobian of the batched
    function (one VJP per row, sequentially, above the Jacobian byte limit), as for strategies
    without a factor form.

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.gram import gram_diagonal
        >>> fn = lambda p, x: x @ p["w"]
        >>> gram_diagonal(fn, {"w": jnp.ones((2, 3))}, jnp.array([[1.0, 2.0], [3.0, 4.0]])).tolist()
        [[5.0, 5.0, 5.0], [25.0, 25.0, 25.0]]
    """
    fn = as_2d(model_fn)
    k = jax.eval_shape(fn, params, x).shape[1]
    name, _ = _resolve(strategy, fn, params, x, k)
    if name == WHOLE_BATCH or name not in FACTORS:
        return whole_batch_diagonal(fn, params, x, limit=_JACOBIAN_BYTES_LIMIT)
    F, block = FACTORS[name](fn, params, x)

    def one(f):
        kk = block(jax.tree_util.tree_map(lambda a: a[None], f))
        return jnp.diagonal(kk[0, :, 0, :])

    return jax.vmap(one)(F)
