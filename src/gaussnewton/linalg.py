"""Row-space linear algebra: damped SPD solves (METHODS.md section 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = ["solve_damped_spd", "solve_tiled_spd", "num_tiles"]

_HI = jax.lax.Precision.HIGHEST

#: target rows of one tile in :func:`solve_tiled_spd` (see :func:`num_tiles`)
TILE_ROWS = 288
#: at most this many tiles: the task graph has ~nt³/6 tile updates, and compile time grows with it
MAX_TILES = 8


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
    needed), whose solution restricted to the first ``n`` entries is exactly ``x``. ``rhs`` may be
    ``(n,)`` or ``(n, r)``. A non-PSD or singular system gives non-finite values, which the
    optimizers detect and reject.
    """
    n = a.shape[0]
    pad = padded_size(n) - n
    rhs = rhs.astype(a.dtype)
    rhs_p = jnp.pad(rhs, ((0, pad),) + ((0, 0),) * (rhs.ndim - 1))
    return cho_solve((_padded_cholesky(a, shift), True), rhs_p)[:n]


def _padded_cholesky(a: jax.Array, shift: jax.Array) -> jax.Array:
    """Lower Cholesky factor of ``diag(A + shift I, I)`` at order ``padded_size(n)``."""
    n = a.shape[0]
    pad = padded_size(n) - n
    diag = jnp.concatenate([jnp.full((n,), shift, a.dtype), jnp.ones((pad,), a.dtype)])
    m = jnp.pad(a, ((0, pad), (0, pad))) + jnp.diag(diag)
    # LAPACK wants column-major input; factoring ``mᵀ`` (the same matrix up to rounding) lets XLA
    # hand over the row-major ``m`` as is instead of a strided transpose copy (3 ms at n = 1160).
    return cho_factor(m.T, lower=True)[0]


def num_tiles(n: int, tile_rows: int | None = None) -> int:
    """Tiles for an order-``n`` system: ``round(n / tile_rows)`` clipped to ``[1, MAX_TILES]``.

    One tile (a single padded Cholesky) below about 1.5 tiles' rows; larger systems get bigger
    tiles rather than more than :data:`MAX_TILES`. ``tile_rows`` defaults to :data:`TILE_ROWS`
    (read at call time).

    Example:
        >>> from gaussnewton.linalg import num_tiles
        >>> num_tiles(128), num_tiles(512), num_tiles(1152), num_tiles(12800)
        (1, 2, 4, 8)
    """
    rows = TILE_ROWS if tile_rows is None else tile_rows
    return min(MAX_TILES, max(1, round(n / rows)))


def solve_tiled_spd(
    block: Callable[[int, int], jax.Array],
    sizes: Sequence[int],
    shift: jax.Array,
    rhs: jax.Array,
) -> jax.Array:
    r"""Solve ``(A + shift I) x = rhs`` for a symmetric PSD ``A`` given by tiles, by a tile Cholesky.

    ``A`` is split into ``len(sizes)`` row/column blocks; ``block(i, j)`` returns the tile
    ``A_ij`` of shape ``(sizes[i], sizes[j])`` and is called once for every ``i >= j`` (the upper
    tiles are never formed). Right-looking tile Cholesky, then tile substitutions:

    .. math:: L_{kk} = \operatorname{chol}(A'_{kk}),\quad L_{ik} = A'_{ik} L_{kk}^{-\top},\quad
              A'_{ij} \leftarrow A'_{ij} - L_{ik} L_{jk}^\top \ (i \ge j > k),

    the same factorization as one Cholesky (up to rounding order). Inside ``jax.jit`` the tiles
    form a task graph: XLA runs independent tiles (and the Gram tiles feeding them) on different
    cores while a single-threaded LAPACK ``potrf`` works on another, and the upper tiles of a
    symmetric Gram are never computed. On the 2-core CPU here the 1152-row exact-CE system of
    ``benchmarks/bench_gram.py`` (Gram and solve, timed alone) went from 10.2 to 7.0 ms with 4
    tiles.
    ``rhs`` is ``(n,)`` or ``(n, r)``; one tile is :func:`solve_damped_spd`.
    """
    nt = len(sizes)
    if nt == 1:
        return solve_damped_spd(block(0, 0), shift, rhs)
    tiles = {(i, j): block(i, j) for i in range(nt) for j in range(i + 1)}
    dtype = tiles[0, 0].dtype
    L: dict[tuple[int, int], jax.Array] = {}
    for k in range(nt):
        L[k, k] = _padded_cholesky(tiles[k, k], shift)[: sizes[k], : sizes[k]]
        for i in range(k + 1, nt):
            L[i, k] = jax.lax.linalg.triangular_solve(
                L[k, k], tiles[i, k], left_side=False, lower=True, transpose_a=True
            )
        for i in range(k + 1, nt):
            for j in range(k + 1, i + 1):
                tiles[i, j] = tiles[i, j] - jnp.matmul(L[i, k], L[j, k].T, precision=_HI)
    vec = rhs.ndim == 1
    b = (rhs[:, None] if vec else rhs).astype(dtype)
    starts = [sum(sizes[:i]) for i in range(nt)]
    y = []
    for i in range(nt):  # L y = b
        r = b[starts[i] : starts[i] + sizes[i]]
        for j in range(i):
            r = r - jnp.matmul(L[i, j], y[j], precision=_HI)
        y.append(jax.lax.linalg.triangular_solve(L[i, i], r, left_side=True, lower=True))
    x: list = [None] * nt
    for i in reversed(range(nt)):  # Lᵀ x = y
        r = y[i]
        for j in range(i + 1, nt):
            r = r - jnp.matmul(L[j, i].T, x[j], precision=_HI)
        x[i] = jax.lax.linalg.triangular_solve(
            L[i, i], r, left_side=True, lower=True, transpose_a=True
        )
    out = jnp.concatenate(x, axis=0)
    return out[:, 0] if vec else out
