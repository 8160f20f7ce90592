"""Row-space linear algebra: damped SPD solves (METHODS.md section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = ["solve_damped_spd"]


def padded_size(n: int) -> int:
    """The order the Cholesky runs at: for ``n ≥ 64``, ``n`` rounded up to an odd multiple of 8.

    LAPACK's blocked ``potrf`` slows down sharply when the leading dimension is a multiple of a
    large power of two (cache-set aliasing). On the 2-core CPU here, float32 orders 1024 and 1280
    took 9.1 and 8.8 ms, against 4.1 and 6.7 ms for 1032 and 1288 (row spaces ``b·c`` are often
    such multiples: b = 128 or 512). Padding with an identity block is exact and costs at most 15
    extra rows; systems smaller than 64 are left alone.

    Example:
        >>> from gaussnewton.linalg import padded_size
        >>> padded_size(1280), padded_size(1152), padded_size(1272), padded_size(50)
        (1288, 1160, 1272, 50)
    """
    if n < 64:
        return n
    m = -(-n // 8)
    return 8 * (m + 1 - m % 2)


def solve_damped_spd(a: jax.Array, shift: jax.Array, rhs: jax.Array) -> jax.Array:
    r"""Solve ``(A + shift I) x = rhs`` for a symmetric PSD ``A`` (``(n, n)``) by one Cholesky.

    Only one triangle of ``A`` is read (LAPACK ``potrf``), so rounding that makes the assembled
    ``A`` slightly non-symmetric cannot break the factorization. The factorization runs on the
    block-diagonal ``diag(A + shift I, I)`` of order :func:`padded_size` (``n`` when no padding is
    needed), whose solution restricted to the first ``n`` entries is exactly ``x``. ``rhs`` may be ``(n,)`` or ``(n, r)``. A non-PSD or singular
    system gives non-finite values, which the optimizers detect and reject.
    """
    n = a.shape[0]
    pad = padded_size(n) - n
    diag = jnp.concatenate([jnp.full((n,), shift, a.dtype), jnp.ones((pad,), a.dtype)])
    m = jnp.pad(a, ((0, pad), (0, pad))) + jnp.diag(diag)
    rhs = rhs.astype(a.dtype)
    rhs_p = jnp.pad(rhs, ((0, pad),) + ((0, 0),) * (rhs.ndim - 1))
    # LAPACK wants column-major input; factoring ``mᵀ`` (the same matrix up to rounding) lets XLA
    # hand over the row-major ``m`` as is instead of a strided transpose copy (3 ms at n = 1160).
    return cho_solve(cho_factor(m.T, lower=True), rhs_p)[:n]
