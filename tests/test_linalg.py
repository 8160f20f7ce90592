"""Row-space solves: the padded Cholesky against a dense float64 solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaussnewton.linalg import num_tiles, padded_size, solve_damped_spd, solve_tiled_spd


@given(n=st.integers(1, 5000))
def test_padded_size(n):
    """Unchanged below 64; otherwise the smallest odd multiple of 8 that is >= n (<= 15 extra)."""
    m = padded_size(n)
    if n < 64:
        assert m == n
    else:
        assert m >= n and m - n <= 15 and m % 8 == 0 and (m // 8) % 2 == 1


_solve = jax.jit(solve_damped_spd)


@settings(max_examples=8, deadline=None)
@given(n=st.sampled_from([1, 7, 63, 64, 72, 100, 128, 136]), r=st.sampled_from([0, 1, 3]))
def test_solve_matches_dense(n, r):
    """(A + sI) x = rhs to 1e-10 relative (float64; cond <= ~1e3 here) for every padding case,
    vector (r = 0) or matrix right-hand sides; only one triangle of A is read."""
    rng = np.random.default_rng(n + 10 * r)
    g = rng.standard_normal((n, n + 3))
    a = g @ g.T / n
    rhs = rng.standard_normal((n,) if r == 0 else (n, r))
    x = _solve(jnp.asarray(a), 0.3, jnp.asarray(rhs))
    ref = np.linalg.solve(a + 0.3 * np.eye(n), rhs)
    assert x.shape == rhs.shape
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    skew = np.triu(rng.standard_normal((n, n)), 1)  # rounding-like asymmetry in one triangle only
    lower_read = _solve(jnp.asarray(a + skew), 0.3, jnp.asarray(rhs))
    upper_read = _solve(jnp.asarray(a + skew.T), 0.3, jnp.asarray(rhs))
    assert np.allclose(lower_read, x, rtol=1e-10) or np.allclose(upper_read, x, rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_solve_keeps_dtype(dtype):
    a = jnp.eye(70, dtype=dtype) * 2.0
    x = _solve(a, jnp.asarray(1.0, dtype), jnp.ones(70, dtype))
    assert x.dtype == dtype
    np.testing.assert_allclose(x, 1 / 3, rtol=1e-6)


@pytest.mark.parametrize("sizes", [(5,), (3, 4), (4, 1, 6), (2, 3, 3, 5)])
@pytest.mark.parametrize("r", [0, 2])
def test_tiled_solve_matches_dense(sizes, r):
    """The tile Cholesky equals a dense float64 solve to 1e-10 (cond <= ~1e2 here) for uneven tiles
    and vector / matrix right-hand sides; only the lower tiles are requested, each once."""
    n = sum(sizes)
    rng = np.random.default_rng(len(sizes) + r)
    g = rng.standard_normal((n, n + 2))
    a = g @ g.T / n
    rhs = rng.standard_normal((n,) if r == 0 else (n, r))
    starts = np.cumsum((0,) + sizes)
    calls = []

    def block(i, j):
        calls.append((i, j))
        return jnp.asarray(a[starts[i] : starts[i + 1], starts[j] : starts[j + 1]])

    x = solve_tiled_spd(block, sizes, 0.5, jnp.asarray(rhs))
    ref = np.linalg.solve(a + 0.5 * np.eye(n), rhs)
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    assert sorted(calls) == [(i, j) for i in range(len(sizes)) for j in range(i + 1)]


def test_num_tiles():
    assert [num_tiles(n) for n in (1, 128, 431, 433, 512, 1152)] == [1, 1, 1, 2, 2, 4]
    assert num_tiles(10, tile_rows=3) == 3
    assert num_tiles(10**6) == num_tiles(100, tile_rows=1) == 8  # capped: compile time
