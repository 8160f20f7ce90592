"""Row-space linear algebra: damped SPD solves (METHODS.md section 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = ["solve_damped_spd"]


def solve_damped_spd(a: jax.Array, shift: jax.Array, rhs: jax.Array) -> jax.Array:
    r"""Solve ``(A + shift I) x = rhs`` for a symmetric PSD ``A`` (``(n, n)``) by one Cholesky.

    ``A`` is symmetrized first (``(A + Aᵀ)/2``) so rounding in its assembly cannot break the
    factorization. ``rhs`` may be ``(n,)`` or ``(n, r)``. A non-PSD or singular system gives non-finite
    values, which the optimizers detect and reject.
    """
    a = 0.5 * (a + a.T)
    n = a.shape[0]
    m = a + shift * jnp.eye(n, dtype=a.dtype)
    factor = cho_factor(m, lower=True)
    return cho_solve(factor, rhs.astype(a.dtype))
