"""Conjugate gradients (gaussnewton.cg) and EGN's ``solver="cg"`` (docs/METHODS.md §4.1), float64.

Tolerances: the CG solver against a dense solve 1e-10 relative; row-space CG converged against the
Cholesky EGN direction 1e-8 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat, init_mlp, make_labels, mlp, rel_err

import gaussnewton as gn
from gaussnewton.cg import cg_solve

PLAIN = dict(damping_policy="constant", line_search=None)


@pytest.fixture(scope="module")
def spd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    m = a @ a.T + 0.5 * np.eye(8)
    return jnp.asarray(m), jnp.asarray(rng.normal(size=8))


def test_cg_solve_matches_dense_solve_and_reports(spd):
    m, rhs = spd
    res = jax.jit(lambda r: cg_solve(lambda v: m @ v, r, max_iters=50, tol=1e-12))(rhs)
    x_ref = np.linalg.solve(np.asarray(m), np.asarray(rhs))
    assert rel_err(res.x, x_ref) < 1e-10
    assert 1 <= int(res.iters) <= 50
    assert float(res.residual_max) <= 1e-12
    np.testing.assert_allclose(res.residual, rhs - m @ res.x, atol=1e-10)


def test_cg_solve_stops_at_tolerance_and_cap_on_pytrees(spd):
    m, rhs = spd

    # the same SPD system split over two leaves: A = m on the stacked vector
    def matvec(t):
        v = jnp.concatenate([t["a"], t["b"]])
        w = m @ v
        return {"a": w[:3], "b": w[3:]}

    r = {"a": rhs[:3], "b": rhs[3:]}
    loose = cg_solve(matvec, r, max_iters=50, tol=1e-1)
    capped = cg_solve(matvec, r, max_iters=2, tol=0.0)
    assert float(loose.residual_max) <= 1e-1 and int(loose.iters) < 8
    assert int(capped.iters) == 2 and float(capped.residual_max) > 0
    # started at the exact solution: zero iterations
    x_ref = np.linalg.solve(np.asarray(m), np.asarray(rhs))
    start = {"a": jnp.asarray(x_ref[:3]), "b": jnp.asarray(x_ref[3:])}
    assert int(cg_solve(matvec, r, start, max_iters=50, tol=1e-8).iters) == 0


def test_cg_solve_stops_on_nonpositive_curvature():
    res = cg_solve(lambda v: -v, jnp.ones(3), max_iters=10, tol=1e-12)
    assert int(res.iters) == 1
    assert np.all(np.asarray(res.x) == 0.0)


@pytest.mark.parametrize(
    ("loss", "c"), [("squared_error", 2), ("softmax_cross_entropy", 3)], ids=["sq", "ce"]
)
def test_row_space_cg_equals_cholesky(loss, c):
    kp, kx, ky = jax.random.split(jax.random.key(3), 3)
    params = init_mlp(kp, 3, c)
    x = jax.random.normal(kx, (6, 3))
    y = make_labels(ky, loss, 6, c)

    @jax.jit
    def both(lam):
        d_chol, _ = gn.egn_direction(mlp, params, x, y, loss=loss, damping=lam)
        d_cg, _ = gn.egn_direction(
            mlp, params, x, y, loss=loss, damping=lam, solver="cg", max_cg_iters=200, cg_tol=1e-13
        )
        return d_chol, d_cg

    for lam in (1e-2, 1.0):
        d_chol, d_cg = both(lam)
        assert rel_err(flat(d_cg), flat(d_chol)) < 1e-8, (loss, lam)


def test_egn_cg_warm_start_and_info():
    kp, kx, ky = jax.random.split(jax.random.key(4), 3)
    params = init_mlp(kp, 3, 2)
    x = jax.random.normal(kx, (6, 3))
    y = make_labels(ky, "squared_error", 6, 2)
    iters = {}
    for warm in (True, False):
        # a tiny step keeps the point (almost) fixed: the warm start is then (almost) the solution
        opt = gn.egn(
            mlp,
            loss="squared_error",
            learning_rate=1e-9,
            damping=0.1,
            solver="cg",
            max_cg_iters=100,
            cg_tol=1e-9,
            cg_warm_start=warm,
            **PLAIN,
        )
        step = jax.jit(opt.step)
        p, state = params, opt.init(params)
        out = []
        for _ in range(2):
            p, state, info = step(p, state, x, y)
            out.append(int(info.cg_iters))
            assert float(info.cg_residual) <= 1e-9
        iters[warm] = out
        if warm:
            d, _ = gn.egn_direction(mlp, params, x, y, loss="squared_error", damping=0.1)
            assert rel_err(flat(state.method_state), flat(d)) < 1e-7  # the stored warm start
    assert iters[False][0] == iters[False][1] > 3
    # from the previous (1e-9-accurate) solution CG needs far fewer iterations than from zero
    assert 2 * iters[True][1] <= iters[True][0]


def test_egn_cg_bad_configuration():
    with pytest.raises(ValueError, match="solver"):
        gn.egn(mlp, loss="squared_error", solver="qr")
    with pytest.raises(ValueError, match="max_cg_iters"):
        gn.egn(mlp, loss="squared_error", solver="cg", max_cg_iters=-1)
