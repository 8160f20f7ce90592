"""The reference strategy: materialize per-example Jacobians, ``K = J Jᵀ`` (METHODS 3.1).

Memory ``n k d``, time ``O(n² k² d)``. Correct for every model whose examples are independent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaussnewton._tree import compute_dtype


def per_example_jacobian(model_fn, params, x):
    """Pytree like ``params`` whose leaves have shape ``(n, k, *leaf.shape)``."""

    def single(xi):
        xb = jax.tree_util.tree_map(lambda a: a[None], xi)
        return jax.jacrev(lambda p: model_fn(p, xb)[0])(params)

    return jax.vmap(single)(x)


def _flat(jac, n: int, k: int):
    leaves = jax.tree_util.tree_leaves(jac)
    dtype = compute_dtype(*(leaf.dtype for leaf in leaves))
    return [leaf.reshape(n, k, -1).astype(dtype) for leaf in leaves]


def jacobian_gram(model_fn, params, x1, x2=None):
    n1 = jax.tree_util.tree_leaves(x1)[0].shape[0]
    j1 = per_example_jacobian(model_fn, params, x1)
    k = jax.tree_util.tree_leaves(j1)[0].shape[1]
    a = _flat(j1, n1, k)
    if x2 is None:
        b = a
        n2 = n1
    else:
        n2 = jax.tree_util.tree_leaves(x2)[0].shape[0]
        b = _flat(per_example_jacobian(model_fn, params, x2), n2, k)
    out = jnp.zeros((n1, k, n2, k), a[0].dtype if a else jnp.float32)
    for u, v in zip(a, b, strict=True):
        out = out + jnp.einsum("iad,jbd->iajb", u, v)
    return out
