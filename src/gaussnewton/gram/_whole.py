r"""The whole-batch strategy: Gram factors from the Jacobian of the BATCHED function.

Exact for every model, also when examples interact inside ``model_fn`` (batch statistics,
attention across the batch, position-dependent masks: see :mod:`gaussnewton.gram._coupling`).
Row ``(i, a)`` of ``J`` is ``∂ model_fn(params, x)[i, a] / ∂w`` with the whole batch ``x`` fixed,
and ``K = J Jᵀ``. For a cross Gram ``K(x1, x2)`` the rows of ``J(x1)`` come from the batch ``x1``
and those of ``J(x2)`` from the batch ``x2`` (each batch is one evaluation of the model).

Factor forms (see :func:`gaussnewton.gram.gram_factors`), chosen by memory:

* ``"whole-batch-jacobian"``: ``F`` = flattened rows of ``J`` per float leaf, ``(n, k, d_leaf)``
  (``jax.jacrev`` when ``n k <= d``, else ``jax.jacfwd``), ``block(F_I, F_J) = J_I J_Jᵀ``;
* ``"whole-batch-matvec"`` (``J`` over the byte limit): ``K`` formed from ``n k`` matrix-free
  products ``J (Jᵀ e)`` on the whole batch, carried as ``F = (K, example index)``, so that a slice
  ``F_I`` holds the rows of ``K`` for ``I`` and their indices: ``block(F_I, F_J) = K[I, :, J, :]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gaussnewton._tree import compute_dtype
from gaussnewton.gram._jacobian import _jacobian_block
from gaussnewton.gram._matvec import matvec_gram

JACOBIAN = "whole-batch-jacobian"
MATVEC = "whole-batch-matvec"


def _float_split(params: Any):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in leaves]
    fl = [a for a, m in zip(leaves, mask, strict=True) if m]

    def rebuild(float_leaves):
        it = iter(float_leaves)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if m else a for a, m in zip(leaves, mask, strict=True)]
        )

    return fl, rebuild


def _sizes(model_fn: Callable, params: Any, x: Any) -> tuple[int, int, int]:
    n, k = jax.eval_shape(model_fn, params, x).shape
    fl, _ = _float_split(params)
    d = sum(int(np.prod(jnp.shape(a), dtype=np.int64)) for a in fl)
    return int(n), int(k), d


def whole_batch_method(model_fn: Callable, params: Any, x: Any, limit: int) -> str:
    """``"whole-batch-jacobian"`` while ``J`` (``4 n k d`` bytes) stays under ``limit``, else
    ``"whole-batch-matvec"``."""
    n, k, d = _sizes(model_fn, params, x)
    return JACOBIAN if 4 * n * k * d <= limit else MATVEC


def batch_jacobian(model_fn: Callable, params: Any, x: Any) -> list[jax.Array]:
    """Rows of the Jacobian of ``p -> model_fn(p, x)`` (whole batch), one ``(n, k, d_leaf)`` array
    per float leaf of ``params`` (in at least float32)."""
    n, k, d = _sizes(model_fn, params, x)
    fl, rebuild = _float_split(params)
    jac_fn = jax.jacrev if n * k <= d else jax.jacfwd
    jac = jac_fn(lambda f: model_fn(rebuild(f), x))(fl)
    dtype = compute_dtype(*(a.dtype for a in jac)) if jac else jnp.float32
    return [a.reshape(n, k, -1).astype(dtype) for a in jac]


def _rows_block(a, b=None):
    """``K[I, :, J, :]`` from the row form ``(K rows of I, I)`` and ``(K rows of J, J)``."""
    b = a if b is None else b
    return jnp.take(a[0], b[1], axis=2)


def whole_batch_factors(
    model_fn: Callable, params: Any, x: Any, *, limit: int = 1 << 30
) -> tuple[Any, Callable[..., jax.Array]]:
    """``(F, block)`` of the whole-batch Gram of ``x`` (see the module doc for the two forms)."""
    if whole_batch_method(model_fn, params, x, limit) == JACOBIAN:
        return batch_jacobian(model_fn, params, x), _jacobian_block
    return rows_factors(matvec_gram(model_fn, params, x))


def rows_factors(K: jax.Array) -> tuple[Any, Callable[..., jax.Array]]:
    """The row form ``F = (K, arange(n))`` of a formed Gram ``K`` ``(n, k, n, k)``."""
    return (K, jnp.arange(K.shape[0])), _rows_block


def whole_batch_gram(model_fn, params, x1, x2=None, *, limit: int = 1 << 30) -> jax.Array:
    """``K = J(x1) J(x2)ᵀ`` ``(n1, k, n2, k)``, each Jacobian of its own whole batch."""
    big = whole_batch_method(model_fn, params, x1, limit) == MATVEC
    if x2 is not None:
        big = big or whole_batch_method(model_fn, params, x2, limit) == MATVEC
    if big:
        return matvec_gram(model_fn, params, x1, x2)
    j1 = batch_jacobian(model_fn, params, x1)
    return _jacobian_block(j1, None if x2 is None else batch_jacobian(model_fn, params, x2))


def whole_batch_diagonal(model_fn, params, x, *, limit: int = 1 << 30) -> jax.Array:
    """``K[i, a, i, a] = ‖∂f_ia/∂w‖²`` ``(n, k)`` of the whole-batch Gram.

    Under ``limit`` from the rows of ``J``; above it one VJP per row, run sequentially
    (``jax.lax.map``), so memory stays at one gradient.
    """
    if whole_batch_method(model_fn, params, x, limit) == JACOBIAN:
        jac = batch_jacobian(model_fn, params, x)
        n, k = jax.eval_shape(model_fn, params, x).shape
        out = jnp.zeros((n, k), jac[0].dtype if jac else jnp.float32)
        for a in jac:
            out = out + jnp.sum(a * a, axis=-1)
        return out
    fl, rebuild = _float_split(params)
    f, vjp = jax.vjp(lambda p: model_fn(rebuild(p), x), fl)
    n, k = f.shape
    dtype = compute_dtype(f.dtype)

    def sq(r):
        (g,) = vjp(jax.nn.one_hot(r, n * k, dtype=f.dtype).reshape(n, k))
        return sum((jnp.sum(jnp.square(a.astype(dtype))) for a in g), jnp.zeros((), dtype))

    return jax.lax.map(sq, jnp.arange(n * k)).reshape(n, k)
