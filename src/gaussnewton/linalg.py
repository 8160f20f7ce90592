r"""Row-space linear algebra: damped SPD solves (docs/METHODS.md section 2), and the BLAS thread policy.

Thread policy (why the solves here do not call LAPACK by default)
-----------------------------------------------------------------
On CPU, jaxlib's LAPACK kernels (``lapack_spotrf_ffi``, ``lapack_strsm_ffi``, ...) call the LAPACK
that ``scipy.linalg.cython_lapack`` exports, i.e. **scipy's bundled OpenBLAS**
(``scipy.libs/libscipy_openblas*.so``; numpy has its own ILP64 copy, ``numpy.libs/
libscipy_openblas64_*.so``, which jax never calls). OpenBLAS runs ``potrf``/``trsm`` on its own
pthread pool, and its workers spin for a while after each call; inside a jitted step that pool
competes with XLA's intra-op thread pool for the same cores. On the 2-core CPU here the default
EGN step of 784-256-256-10 exact softmax CE took 25.7 Adam steps with scipy's default OpenBLAS
threads against 11.6 with ``OPENBLAS_NUM_THREADS=1``. Limiting that pool from the library would
also change the user's own ``scipy.linalg`` (same library instance), so instead:

* **default** (``backend="auto"``): on CPU the ``"native"`` solve, on any other platform (GPU,
  TPU) the ``"lapack"`` one, which there is the platform's own dense linear algebra (cuSOLVER /
  hipSOLVER ``potrf``, XLA's triangular solves); chosen when the step is lowered
  (``jax.lax.platform_dependent``: only the branch of the platform compiled for is lowered, so
  the CPU program is exactly the native one).
* ``backend="native"``: every factorization and triangular solve here is written in ``jax.lax``
  (a recursive blocked Cholesky that also returns the inverse factor, see
  :func:`cholesky_inverse`; leaves of at most :data:`LEAF_ROWS` rows by a column loop), so XLA
  runs all of it on its own threads and scipy's OpenBLAS is never entered. numpy and scipy in the
  same process keep their thread counts and results. On a GPU its column loops would launch a few
  kernels per column: ``auto`` does not use it there.
* **opt-out** (``backend="lapack"``): ``jax.lax.linalg``'s Cholesky (padded, see
  :func:`padded_size`) and triangular solves: on CPU jaxlib's LAPACK ``potrf`` and ``trsm``, the
  behaviour before. Faster per call when OpenBLAS runs one thread (e.g.
  ``OPENBLAS_NUM_THREADS=1`` set by the user). Select a backend with the environment variable
  ``GAUSSNEWTON_LINALG=lapack`` (or ``native``; read at import) or :func:`set_backend` (read when
  a function is traced). jax caches traces per function object, so call :func:`set_backend` at
  program start, before the first step is traced: a function already traced (``jax.jit(opt.step)``
  of the same optimizer, or ``opt.step`` called without ``jax.jit``, which jits itself) keeps the
  backend of its first trace; build a new optimizer after a switch. ``egn_direction`` called
  without ``jax.jit`` keys its compilations on the backend and block sizes.

Example:
    >>> import jax.numpy as jnp
    >>> from gaussnewton import linalg
    >>> linalg.get_backend()
    'auto'
    >>> x = linalg.solve_damped_spd(jnp.eye(3), 1.0, jnp.ones(3))  # (I + I) x = 1
    >>> [round(float(v), 6) for v in x]
    [0.5, 0.5, 0.5]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = [
    "solve_damped_spd",
    "solve_tiled_spd",
    "num_tiles",
    "cholesky_inverse",
    "set_backend",
    "get_backend",
    "BACKENDS",
]

_HI = jax.lax.Precision.HIGHEST

#: target rows of one tile in :func:`solve_tiled_spd` (see :func:`num_tiles`)
TILE_ROWS = 288
#: at most this many tiles: the task graph has ~nt³/6 tile updates, and compile time grows with it
MAX_TILES = 8
#: :func:`cholesky_inverse` factors blocks of at most this many rows by a column loop. A column
#: step costs O(leaf²) and is mostly loop overhead: on the 2-core CPU here (quiet, 2026-12-02)
#: leaves of <= 80 rows made the plain EGN step 12 % faster than <= 160 on both reference
#: problems of benchmarks/bench_gram.py (784-256-256-10 CE: 15.4 against 17.1 ms; 8-256-256-1:
#: 2.40 against 2.75 ms) and its first compile 20-40 % slower (one more while loop per leaf)
LEAF_ROWS = 80
#: the solve backends (see the module docstring)
BACKENDS = ("auto", "native", "lapack")

_backend = os.environ.get("GAUSSNEWTON_LINALG", "auto").strip().lower() or "auto"
if _backend not in BACKENDS:
    raise ValueError(
        f"GAUSSNEWTON_LINALG={_backend!r} is unknown; use one of {BACKENDS} (or leave it unset)."
    )


def set_backend(name: str) -> str:
    """Select how the damped SPD solves run: ``"auto"`` (default: ``"native"`` on CPU, the
    platform's ``potrf`` elsewhere), ``"native"`` (``jax.lax`` only, never calls scipy's OpenBLAS)
    or ``"lapack"`` (``jax.lax.linalg``: jaxlib's LAPACK on CPU). Takes effect for functions first
    traced after the call (jax reuses the cached trace of a function traced before, e.g.
    ``jax.jit`` of the same ``opt.step``, or that ``opt.step`` called without ``jax.jit``: build a
    new optimizer after switching); returns the previous backend.

    Example:
        >>> from gaussnewton import linalg
        >>> old = linalg.set_backend("lapack")
        >>> linalg.set_backend(old)
        'lapack'
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; use one of {BACKENDS}.")
    old, _backend = _backend, name
    return old


def get_backend() -> str:
    """The backend the next traced solve uses (``"auto"``, ``"native"`` or ``"lapack"``)."""
    return _backend


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


def _leaf_cholesky_inverse(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(L, L⁻¹)`` of an SPD ``a`` by one column loop (left-looking): column ``j`` of ``L`` is
    ``(a_j − L L_jᵀ)/√·`` and row ``j`` of ``X = L⁻¹`` is ``(e_j − L_j X)/L_jj`` (forward
    substitution of ``L X = I``). Only the lower triangle of ``a`` is read."""
    m = a.shape[0]
    idx = jnp.arange(m)
    eye = jnp.eye(m, dtype=a.dtype)

    def body(j, carry):
        low, inv = carry
        col = a[:, j] - jnp.matmul(low, low[j], precision=_HI)  # columns >= j of L are still 0
        d = jnp.sqrt(col[j])  # NaN for a non-PD pivot: propagates, the optimizers reject it
        low = low.at[:, j].set(jnp.where(idx >= j, col / d, 0))
        inv = inv.at[j].set((eye[j] - jnp.matmul(low[j], inv, precision=_HI)) / d)
        return low, inv

    zero = jnp.zeros_like(a)
    return jax.lax.fori_loop(0, m, body, (zero, zero))


def cholesky_inverse(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Lower Cholesky factor ``L`` of a symmetric PD ``a`` (``(n, n)``) and its inverse ``L⁻¹``,
    in ``jax.lax`` only (no LAPACK call; see the module docstring).

    Recursive 2 x 2 blocking down to leaves of at most :data:`LEAF_ROWS` rows:

    .. math:: L_{11} = \operatorname{chol}(A_{11}),\ L_{21} = A_{21} L_{11}^{-\top},\
              L_{22} = \operatorname{chol}(A_{22} - L_{21} L_{21}^\top),\
              (L^{-1})_{21} = -L_{22}^{-1} L_{21} L_{11}^{-1},

    so all the flops outside the leaves are matrix products (XLA's threaded ``dot``). Only the
    lower triangle of ``a`` is read. A non-PD ``a`` gives NaN entries.

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.linalg import cholesky_inverse
        >>> low, inv = cholesky_inverse(jnp.array([[4.0, 2.0], [2.0, 5.0]]))
        >>> low.tolist(), (inv @ low).round(6).tolist()
        ([[2.0, 0.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])
    """
    m = a.shape[0]
    if m <= LEAF_ROWS:
        return _leaf_cholesky_inverse(a)
    h = m // 2
    l11, x11 = cholesky_inverse(a[:h, :h])
    l21 = jnp.matmul(a[h:, :h], x11.T, precision=_HI)
    l22, x22 = cholesky_inverse(a[h:, h:] - jnp.matmul(l21, l21.T, precision=_HI))
    x21 = -jnp.matmul(x22, jnp.matmul(l21, x11, precision=_HI), precision=_HI)
    zero = jnp.zeros((h, m - h), a.dtype)
    return jnp.block([[l11, zero], [l21, l22]]), jnp.block([[x11, zero], [x21, x22]])


def solve_damped_spd(a: jax.Array, shift: jax.Array, rhs: jax.Array) -> jax.Array:
    r"""Solve ``(A + shift I) x = rhs`` for a symmetric PSD ``A`` (``(n, n)``) by one Cholesky.

    Only one triangle of ``A`` is read, so rounding that makes the assembled ``A`` slightly
    non-symmetric cannot break the factorization. ``rhs`` may be ``(n,)`` or ``(n, r)``. A non-PSD
    or singular system gives non-finite values, which the optimizers detect and reject.

    Backend ``"native"`` (``"auto"`` on CPU): ``x = L⁻ᵀ (L⁻¹ rhs)`` with ``(L, L⁻¹)`` from
    :func:`cholesky_inverse`. Backend ``"lapack"`` (``"auto"`` elsewhere): ``potrf`` on the
    block-diagonal ``diag(A + shift I, I)`` of order :func:`padded_size`, whose solution
    restricted to the first ``n`` entries is exactly ``x``.
    """
    rhs = rhs.astype(a.dtype)
    return _by_platform(_solve_native, _solve_factored, a, jnp.asarray(shift, a.dtype), rhs)


def _by_platform(native: Callable, factored: Callable, *args):
    """``native(*args)`` or ``factored(*args)`` (the platform's dense linear algebra) by the
    backend: under ``"auto"`` chosen when the step is lowered (``jax.lax.platform_dependent``:
    only the branch of the platform compiled for is lowered), native on CPU."""
    if _backend == "native":
        return native(*args)
    if _backend == "lapack":
        return factored(*args)
    return jax.lax.platform_dependent(*args, cpu=native, default=factored)


def _solve_native(a: jax.Array, shift: jax.Array, rhs: jax.Array) -> jax.Array:
    _, inv = _shifted_factor(a, shift)
    return jnp.matmul(inv.T, jnp.matmul(inv, rhs, precision=_HI), precision=_HI)


def _solve_factored(a: jax.Array, shift: jax.Array, rhs: jax.Array) -> jax.Array:
    n = a.shape[0]
    pad = padded_size(n) - n
    rhs_p = jnp.pad(rhs, ((0, pad),) + ((0, 0),) * (rhs.ndim - 1))
    return cho_solve((_padded_cholesky(a, shift), True), rhs_p)[:n]


def _shifted_factor(a: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cholesky_inverse(A + shift I)`` reading the lower triangle of ``A``."""
    return cholesky_inverse(a + jnp.asarray(shift, a.dtype) * jnp.eye(a.shape[0], dtype=a.dtype))


def _padded_cholesky(a: jax.Array, shift: jax.Array) -> jax.Array:
    """Lower Cholesky factor of ``diag(A + shift I, I)`` at order ``padded_size(n)`` (LAPACK)."""
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
    cores while one diagonal tile is being factored on another, and the upper tiles of a
    symmetric Gram are never computed. On the 2-core CPU here the 1152-row exact-CE system of
    ``benchmarks/bench_gram.py`` (Gram and solve, timed alone) went from 10.2 to 7.0 ms with 4
    tiles (LAPACK backend, one OpenBLAS thread). Backend ``"native"`` (``"auto"`` on CPU): each
    diagonal tile by :func:`cholesky_inverse`, and the tile triangular solves are products with
    ``L_kk⁻¹``.
    ``rhs`` is ``(n,)`` or ``(n, r)``; one tile is :func:`solve_damped_spd`.
    """
    nt = len(sizes)
    if nt == 1:
        return solve_damped_spd(block(0, 0), shift, rhs)
    keys = [(i, j) for i in range(nt) for j in range(i + 1)]
    tiles = [block(i, j) for i, j in keys]
    dtype = tiles[0].dtype
    vec = rhs.ndim == 1
    b = (rhs[:, None] if vec else rhs).astype(dtype)

    def run(native: bool) -> Callable:
        return lambda tiles, shift, b: _tiled(
            dict(zip(keys, tiles, strict=True)), sizes, shift, b, native
        )

    out = _by_platform(run(True), run(False), tiles, jnp.asarray(shift, dtype), b)
    return out[:, 0] if vec else out


def _tiled(
    tiles: dict[tuple[int, int], jax.Array],
    sizes: Sequence[int],
    shift: jax.Array,
    b: jax.Array,
    native: bool,
) -> jax.Array:
    """The tile Cholesky and substitutions of :func:`solve_tiled_spd` (``b``: ``(n, r)``)."""
    nt = len(sizes)
    L: dict[tuple[int, int], jax.Array] = {}
    inv: dict[int, jax.Array] = {}  # L_kk⁻¹ (native backend)

    def tri(k: int, r: jax.Array, transpose: bool) -> jax.Array:
        """``L_kk⁻¹ r`` or ``L_kk⁻ᵀ r``."""
        if native:
            return jnp.matmul(inv[k].T if transpose else inv[k], r, precision=_HI)
        return jax.lax.linalg.triangular_solve(
            L[k, k], r, left_side=True, lower=True, transpose_a=transpose
        )

    for k in range(nt):
        if native:
            L[k, k], inv[k] = _shifted_factor(tiles[k, k], shift)
        else:
            L[k, k] = _padded_cholesky(tiles[k, k], shift)[: sizes[k], : sizes[k]]
        for i in range(k + 1, nt):  # L_ik = A'_ik L_kk⁻ᵀ
            if native:
                L[i, k] = jnp.matmul(tiles[i, k], inv[k].T, precision=_HI)
            else:
                L[i, k] = jax.lax.linalg.triangular_solve(
                    L[k, k], tiles[i, k], left_side=False, lower=True, transpose_a=True
                )
        for i in range(k + 1, nt):
            for j in range(k + 1, i + 1):
                tiles[i, j] = tiles[i, j] - jnp.matmul(L[i, k], L[j, k].T, precision=_HI)
    starts = [sum(sizes[:i]) for i in range(nt)]
    y = []
    for i in range(nt):  # L y = b
        r = b[starts[i] : starts[i] + sizes[i]]
        for j in range(i):
            r = r - jnp.matmul(L[i, j], y[j], precision=_HI)
        y.append(tri(i, r, False))
    x: list = [None] * nt
    for i in reversed(range(nt)):  # Lᵀ x = y
        r = y[i]
        for j in range(i + 1, nt):
            r = r - jnp.matmul(L[j, i].T, x[j], precision=_HI)
        x[i] = tri(i, r, True)
    return jnp.concatenate(x, axis=0)
