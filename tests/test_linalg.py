"""Row-space solves against a dense float64 solve, for both backends; the BLAS thread policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gaussnewton as gn
from gaussnewton import linalg
from gaussnewton.linalg import (
    cholesky_inverse,
    num_tiles,
    padded_size,
    solve_damped_spd,
    solve_tiled_spd,
)


@pytest.fixture(params=["native", "lapack"])
def backend(request):
    """Run a test under each solve backend (read at trace time), restoring the default after.
    ``"auto"`` is ``"native"`` on CPU: test_auto_backend_lowers_per_platform checks that."""
    old = linalg.set_backend(request.param)
    yield request.param
    linalg.set_backend(old)


@given(n=st.integers(1, 5000))
def test_padded_size(n):
    """Unchanged below 64; otherwise the smallest odd multiple of 8 that is >= n (<= 15 extra)."""
    m = padded_size(n)
    if n < 64:
        assert m == n
    else:
        assert m >= n and m - n <= 15 and m % 8 == 0 and (m // 8) % 2 == 1


def _solve(a, shift, rhs):
    # jit per backend: the backend is read when the function is traced
    return _jitted[linalg.get_backend()](a, shift, rhs)


# one jit per backend, each around its OWN function object: jax caches traces per function, and
# the backend is a trace-time setting, so a shared function would keep the first backend traced
_jitted = {name: jax.jit(lambda a, s, r: solve_damped_spd(a, s, r)) for name in linalg.BACKENDS}


def test_each_backend_lowers_as_documented(backend):
    """native: no custom call; lapack: jaxlib's LAPACK potrf (the jit above really is per backend)."""
    text = _jitted[backend].lower(jnp.eye(70), 1.0, jnp.ones(70)).as_text()
    assert ("lapack_" in text) == (backend == "lapack")
    assert ("custom_call" in text) == (backend == "lapack")


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.sampled_from([1, 7, 63, 64, 72, 100, 128, 136]), r=st.sampled_from([0, 1, 3]))
def test_solve_matches_dense(backend, n, r):
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
def test_solve_keeps_dtype(backend, dtype):
    a = jnp.eye(70, dtype=dtype) * 2.0
    x = _solve(a, jnp.asarray(1.0, dtype), jnp.ones(70, dtype))
    assert x.dtype == dtype
    np.testing.assert_allclose(x, 1 / 3, rtol=1e-6)


@pytest.mark.parametrize("sizes", [(5,), (3, 4), (4, 1, 6), (2, 3, 3, 5)])
@pytest.mark.parametrize("r", [0, 2])
def test_tiled_solve_matches_dense(backend, sizes, r):
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


@pytest.mark.parametrize("n", [1, 9, 81, 250])
def test_cholesky_inverse_matches_numpy(n):
    """L equals numpy's Cholesky and L⁻¹ L = I to 1e-10 (float64, cond <= ~1e2), for one leaf and
    for the recursive split (n > LEAF_ROWS = 80; 250 splits twice); only the lower triangle is read."""
    rng = np.random.default_rng(n)
    g = rng.standard_normal((n, n + 4))
    a = g @ g.T / n + 0.1 * np.eye(n)
    low, inv = cholesky_inverse(jnp.asarray(a + np.triu(rng.standard_normal((n, n)), 1)))
    ref = np.linalg.cholesky(a)
    np.testing.assert_allclose(low, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(inv) @ ref, np.eye(n), rtol=0, atol=1e-10)
    assert np.all(np.triu(np.asarray(low), 1) == 0) and np.all(np.triu(np.asarray(inv), 1) == 0)


def test_cholesky_inverse_not_pd_is_nan():
    low, _ = cholesky_inverse(jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    assert not np.all(np.isfinite(np.asarray(low)))


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="backend='mkl' is unknown"):
        linalg.set_backend("mkl")


def _egn_step():
    fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    p = {"w1": jnp.full((3, 40), 0.1), "w2": jnp.full((40, 2), 0.1)}
    x, y = jnp.linspace(-1, 1, 600).reshape(200, 3), jnp.zeros((200,), jnp.int32)
    opt = gn.egn(fn, loss="softmax_cross_entropy")  # the default step: Armijo + adaptive damping
    return jax.jit(opt.step), (p, opt.init(p), x, y)


def test_native_step_calls_no_lapack():
    """With the default backend the compiled EGN step contains no LAPACK custom call, so scipy's
    OpenBLAS (which jaxlib's LAPACK kernels use) is never entered from the library."""
    step, args = _egn_step()
    assert linalg.get_backend() == "auto"
    hlo = step.lower(*args).as_text()
    assert "lapack_" not in hlo and "custom_call" not in hlo


@pytest.mark.parametrize("loss,c", [("squared_error", 2), ("softmax_cross_entropy", 5)])
def test_auto_backend_lowers_per_platform(loss, c):
    """The default backend ``"auto"``, with the tile Cholesky (1000 rows, 3 tiles) and one tile
    (the regression row space, 200 rows): lowered for CPU it is the native solve (its loops and
    products, no custom call); lowered for CUDA (``jax.export``, no GPU needed) the factorization
    is cuSOLVER's ``potrf`` and none of the native column loops remain. Lowering does not depend on
    this machine having the platform; the CPU module differs from the native one only by the
    platform switch (``stablehlo.case`` on a constant index, removed by XLA)."""
    fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    p = {"w1": jnp.full((3, 40), 0.1), "w2": jnp.full((40, c), 0.1)}
    x = jnp.linspace(-1, 1, 600).reshape(200, 3)
    y = jnp.zeros((200,), jnp.int32) if c == 5 else jnp.zeros((200, c))
    assert linalg.get_backend() == "auto"

    def lowered(backend: str, platform: str) -> str:
        old = linalg.set_backend(backend)
        try:
            f = jax.jit(lambda p, x, y: gn.egn_direction(fn, p, x, y, loss=loss, damping=1e-3)[0])
            return jax.export.export(f, platforms=[platform])(p, x, y).mlir_module()
        finally:
            linalg.set_backend(old)

    cpu, cuda = lowered("auto", "cpu"), lowered("auto", "cuda")
    assert "custom_call" not in cpu and cpu.count("stablehlo.while") > 0
    native = lowered("native", "cpu")  # the same loops and products: only the native branch
    for op in ("stablehlo.while", "stablehlo.dot_general", "stablehlo.sqrt"):
        assert cpu.count(op) == native.count(op), op
    assert "cusolver_potrf" in cuda and "lapack_" not in cuda
    assert cuda.count("stablehlo.while") == 0


def test_user_numpy_unchanged_by_a_step():
    """numpy (and scipy) results are bitwise identical, and every BLAS thread pool keeps its size,
    after importing gaussnewton and running the default EGN step."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg

    rng = np.random.default_rng(0)
    m = rng.standard_normal((300, 300))
    spd = m @ m.T + 300 * np.eye(300)

    def user_work():
        return (
            m @ m,
            np.linalg.solve(spd, m),
            np.linalg.cholesky(spd),
            scipy.linalg.cho_factor(spd),
        )

    def pools():
        return sorted((i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info())

    before, threads_before = user_work(), pools()
    step, args = _egn_step()
    jax.block_until_ready(step(*args))
    after, threads_after = user_work(), pools()
    assert threads_after == threads_before
    for u, v in zip(
        jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True
    ):
        assert np.array_equal(u, v)
