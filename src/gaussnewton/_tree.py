"""Small pytree helpers used across the library (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Real inner product ``sum_leaves <a, b>``, accumulated in at least float32."""
    leaves = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(
            lambda u, v: jnp.vdot(_upcast(u).ravel(), _upcast(v).ravel()).real, a, b
        )
    )
    return sum(leaves, jnp.zeros((), _acc_dtype(a)))


def tree_norm(a: PyTree) -> jax.Array:
    """Euclidean norm of all leaves together."""
    return jnp.sqrt(tree_vdot(a, a))


def tree_axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """``y + alpha * x`` leafwise, keeping the dtype of ``y``."""
    return jax.tree_util.tree_map(lambda u, v: (v + alpha * u).astype(v.dtype), x, y)


def tree_scale(alpha: jax.Array, x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda u: (alpha * u).astype(u.dtype), x)


def tree_zeros_like(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, x)


def tree_all_finite(x: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(x)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [True]))


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``where(pred, on_true, on_false)`` for a scalar predicate."""
    return jax.tree_util.tree_map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def tree_size(x: PyTree) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(x))


def any_traced(tree: PyTree) -> bool:
    """Whether a leaf of ``tree`` is a tracer (inside ``jax.jit``, ``vmap``, ``grad``, ...)."""
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(tree))


def tree_signature(tree: PyTree) -> tuple:
    """Tree structure, shapes and dtypes of ``tree``: what a trace of it depends on (hashable)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((jnp.shape(a), getattr(a, "dtype", type(a))) for a in leaves)


def cached_eval_shape(cache: dict, key: Any, fn, *args) -> Any:
    """``jax.eval_shape(fn, *args)`` kept in ``cache`` under ``key`` (e.g. a
    :func:`tree_signature` of what the shapes depend on); the cache is emptied at 64 entries."""
    out = cache.get(key)
    if out is None:
        if len(cache) >= 64:
            cache.clear()
        out = cache[key] = jax.eval_shape(fn, *args)
    return out


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """Dtype for Gram matrices and solves: at least float32, float64 when an input is float64."""
    return jnp.result_type(jnp.float32, *dtypes)


def _acc_dtype(tree: PyTree) -> jnp.dtype:
    leaves = jax.tree_util.tree_leaves(tree)
    return compute_dtype(*(leaf.dtype for leaf in leaves)) if leaves else jnp.float32


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(compute_dtype(x.dtype))
