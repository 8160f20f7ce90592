"""The shared grid: problems x methods of the Gauss-Newton family (docs/METHODS.md §2, §4, §6).

For every applicable (problem, method) pair, with the method's default policies:
- the batch loss decreases over a few steps on a fixed batch;
- ``jax.jit(opt.step)`` traces once over several steps (a Python side effect in ``model_fn``
  counts traces);
- a non-finite batch (NaN in ``x``) leaves ``params`` and the state unchanged (λ may grow) and
  sets ``info.rejected``.
One compilation per pair; float64 (conftest), small MLPs (3-5-5-c), b = 8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat, init_mlp, make_labels, mlp

import gaussnewton as gn
from gaussnewton.dual import dual_gn
from gaussnewton.gram_gauss_newton import gram_gauss_newton
from gaussnewton.ignd import ignd
from gaussnewton.sgn import sgn
from gaussnewton.sqn import sqn

B = 8
STEPS = 6
# (problem name, loss, outputs c)
PROBLEMS = {
    "regression": ("squared_error", 1),
    "softmax3": ("softmax_cross_entropy", 3),
    "binary": ("sigmoid_binary_cross_entropy", 1),
}
METHODS = {
    "egn": lambda fn, loss: gn.egn(fn, loss=loss),
    "egn_cg": lambda fn, loss: gn.egn(fn, loss=loss, solver="cg", max_cg_iters=20),
    "sgn": lambda fn, loss: sgn(fn, loss=loss),
    # Cai et al.: fixed step, constant λ; a full step with tiny λ oscillates on b = 8 < d
    "ggn": lambda fn, loss: gram_gauss_newton(fn, learning_rate=0.5, damping=0.1),
    "dual_gn": lambda fn, loss: dual_gn(fn, loss=loss, damping=1e-2, max_inner_iters=3),
    "ignd": lambda fn, loss: ignd(fn, loss=loss, learning_rate=0.5, damping=1e-3),
    "sqn": lambda fn, loss: sqn(fn, loss=loss, history=5),
}
APPLICABLE = {
    "ggn": {"regression"},
    "ignd": {"regression", "binary"},
}
CASES = [(p, m) for p in PROBLEMS for m in METHODS if p in APPLICABLE.get(m, set(PROBLEMS))]
# the loss after STEPS steps must be at most this fraction of the initial loss
DECREASE = 0.9


@pytest.mark.parametrize(("problem", "method"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_grid(problem, method):
    loss, c = PROBLEMS[problem]
    kp, kx, ky = jax.random.split(jax.random.key(7), 3)
    params = init_mlp(kp, 3, c)
    x = jax.random.normal(kx, (B, 3))
    y = make_labels(ky, loss, B, c)
    traces = []

    def model_fn(p, xx):
        traces.append(1)  # runs only while tracing
        return mlp(p, xx)

    opt = METHODS[method](model_fn, loss)
    state = opt.init(params)
    step = jax.jit(opt.step)
    p = params
    losses = []
    for i in range(STEPS):
        p, state, info = step(p, state, x, y)
        losses.append(float(info.loss))
        assert not bool(info.rejected), (problem, method, i, info)
        if i == 0:
            n_traced = len(traces)
            assert n_traced > 0
    f_final = mlp(p, x)
    final = float(
        jnp.mean(gn.get_loss(loss).value(f_final, gn.get_loss(loss).prepare_labels(f_final, y)))
    )
    assert final <= DECREASE * losses[0], (problem, method, losses, final)
    assert np.all(np.isfinite(losses))

    # non-finite batch: same shapes, so no retrace; nothing moves except possibly λ
    x_bad = x.at[0, 1].set(jnp.nan)
    p_bad, state_bad, info_bad = step(p, state, x_bad, y)
    assert len(traces) == n_traced, f"{method} retraced: {len(traces)} vs {n_traced}"
    assert bool(info_bad.rejected)
    np.testing.assert_array_equal(flat(p_bad), flat(p))
    for name in state._fields:
        if name == "damping":
            assert float(state_bad.damping) >= float(state.damping)
            continue
        a = jax.tree_util.tree_leaves(getattr(state, name))
        b = jax.tree_util.tree_leaves(getattr(state_bad, name))
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{method}: {name}")
