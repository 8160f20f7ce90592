"""SQN — stochastic L-BFGS with same-batch curvature pairs (docs/METHODS.md §4.6), float64.

- the two-loop recursion over the ring buffer equals the dense BFGS inverse-Hessian recursion over
  the newest ``m`` pairs (1e-10 relative), also after the buffer wrapped around;
- SQN minimizes a convex quadratic (linear least squares) to 1e-6 of the solution;
- SQN decreases the loss of a small regression MLP by 10x in 40 steps;
- pairs with ``sᵀy <= eps · sᵀs`` are skipped; otherwise the history fills up to ``m``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import flat, rel_err

from gaussnewton.sqn import LBFGSHistory, sqn, two_loop


def _dense_bfgs(pairs, g):
    s_new, y_new = pairs[-1]
    h = (s_new @ y_new) / (y_new @ y_new) * np.eye(g.size)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(g.size) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h @ g


def test_two_loop_equals_dense_bfgs_after_wraparound():
    rng = np.random.default_rng(0)
    n, m = 6, 3
    a = rng.normal(size=(n, n))
    a = a @ a.T + np.eye(n)
    pairs = [(s, a @ s + 0.01 * rng.normal(size=n)) for s in rng.normal(size=(5, n))]
    s_buf, y_buf = np.zeros((m, n)), np.zeros((m, n))
    for j, (s, y) in enumerate(pairs):  # ring insertion, as after each accepted step
        s_buf[j % m], y_buf[j % m] = s, y
    hist = LBFGSHistory(jnp.asarray(s_buf), jnp.asarray(y_buf), jnp.asarray(m), jnp.asarray(5 % m))
    g = rng.normal(size=n)
    out = jax.jit(two_loop)(jnp.asarray(g), hist)
    assert rel_err(out, _dense_bfgs(pairs[-m:], g)) < 1e-10
    empty = LBFGSHistory(hist.s, hist.y, jnp.asarray(0), jnp.asarray(0))
    assert rel_err(two_loop(jnp.asarray(g), empty), g) < 1e-15


def _linear(p, x):
    return x @ p["w"] + p["b"]


def test_sqn_minimizes_a_convex_quadratic():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (20, 4)) * jnp.array([1.0, 3.0, 0.3, 1.0])
    y = x @ jax.random.normal(kw, (4,)) + 0.1 * jnp.sin(jnp.arange(20.0))
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    opt = sqn(_linear, loss="squared_error", history=5)
    step = jax.jit(opt.step)
    state, p = opt.init(params), params
    for _ in range(40):
        p, state, info = step(p, state, x, y)
    design = np.concatenate([np.asarray(x), np.ones((20, 1))], axis=1)
    sol = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    assert rel_err(np.append(p["w"], p["b"]), sol) < 1e-6
    assert int(state.method_state.num) == 5
    assert not bool(info.rejected)


def test_sqn_regression_and_pair_skipping(regression_problem):
    model_fn, params, x, y = regression_problem
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    opt = sqn(model_fn, loss="squared_error", history=10)
    step = jax.jit(opt.step)
    state, p = opt.init(params), params
    losses = []
    for _ in range(40):
        p, state, info = step(p, state, x, y)
        losses.append(float(info.loss))
    assert losses[-1] < 0.1 * losses[0], losses
    assert int(state.method_state.num) == 10
    # an impossible curvature threshold: no pair is ever stored, steps are scaled gradients
    never = sqn(model_fn, loss="squared_error", history=10, curvature_eps=1e12)
    st, never_step = never.init(params), jax.jit(never.step)
    q, st, _ = never_step(params, st, x, y)
    q, st, _ = never_step(q, st, x, y)
    assert int(st.method_state.num) == 0
    assert np.all(np.isfinite(flat(q)))
