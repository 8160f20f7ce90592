"""The reference strategy: materialize per-example Jacobians, ``K = J Jᵀ`` (METHODS 3.1).

Memory ``n k d``, time ``O(n² k² d)``. Correct for every model whose examples are independent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaussnewton._sharding import vary_like
from gaussnewton._tree import compute_dtype


def per_example_jacobian(model_fn, params, x):
    """Pytree like ``params`` whose leaves have shape ``(n, k, *leaf.shape)``."""

    def single(xi):
        xb = jax.tree_util.tree_map(lambda a: a[None], xi)
        out, vjp = jax.vjp(lambda p: model_fn(p, xb)[0], params)
        # the rows of the (k, D) Jacobian: one VJP per output, batched (a jacrev written out, so
        # that it also traces on batch-sharded inputs of an Explicit mesh)
        (rows,) = jax.vmap(vjp)(vary_like(jnp.eye(out.shape[0], dtype=out.dtype), out))
        return rows

    return jax.vmap(single)(x)


def _flat(jac, n: int, k: int):
    leaves = jax.tree_util.tree_leaves(jac)
    dtype = compute_dtype(*(leaf.dtype for leaf in leaves))
    return [leaf.reshape(n, k, -1).astype(dtype) for leaf in leaves]


def jacobian_factors(model_fn, params, x):
    """``(F, block)``: the flattened per-example Jacobians of ``x`` and ``block(F1, F2=None)``, the
    Gram block ``J1 J2ᵀ`` of two slices of them (see :func:`gaussnewton.gram.gram_factors`)."""
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    jac = per_example_jacobian(model_fn, params, x)
    k = jax.tree_util.tree_leaves(jac)[0].shape[1]
    return _flat(jac, n, k), _jacobian_block


def _jacobian_block(a, b=None):
    b = a if b is None else b
    n1, k, n2 = a[0].shape[0], a[0].shape[1], b[0].shape[0]
    out = jnp.zeros((n1, k, n2, k), a[0].dtype)
    for u, v in zip(a, b, strict=True):
        out = out + jnp.einsum("iad,jbd->iajb", u, v)
    return out


def jacobian_gram(model_fn, params, x1, x2=None):
    a, block = jacobian_factors(model_fn, params, x1)
    return block(a, None if x2 is None else jacobian_factors(model_fn, params, x2)[0])
