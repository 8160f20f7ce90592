"""Matrix-free Gram products ``K v = J (Jᵀ v)`` (METHODS 3.2): one VJP then one JVP.

:func:`gram_matvec` is what row-space CG uses. :func:`matvec_gram` forms ``K`` column by column
(``n k`` products, vmapped) — correct but slow; kept as a strategy for completeness and tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaussnewton._sharding import vary_like
from gaussnewton._tree import compute_dtype


def gram_matvec(model_fn, params, x1, x2=None):
    """Return ``v -> J(x1) J(x2)ᵀ v`` for ``v`` of shape ``(n2, k)`` (result ``(n1, k)``)."""
    x2 = x1 if x2 is None else x2
    f2, vjp2 = jax.vjp(lambda p: model_fn(p, x2), params)
    _, jvp1 = jax.linearize(lambda p: model_fn(p, x1), params)

    def matvec(v):
        (t,) = vjp2(v.astype(f2.dtype))
        return jvp1(t)

    return matvec


def matvec_gram(model_fn, params, x1, x2=None):
    x2_ = x1 if x2 is None else x2
    f2 = jax.eval_shape(model_fn, params, x2_)
    n2, k = f2.shape
    matvec = gram_matvec(model_fn, params, x1, x2)
    basis = vary_like(jnp.eye(n2 * k, dtype=f2.dtype).reshape(n2 * k, n2, k), f2)
    cols = jax.vmap(matvec)(basis)  # (n2 k, n1, k)
    n1 = cols.shape[1]
    cols = cols.astype(compute_dtype(cols.dtype))
    return jnp.transpose(cols.reshape(n2, k, n1, k), (2, 3, 0, 1))
