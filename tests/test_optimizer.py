"""The EGN optimizer: exact plain step, momentum formula, Armijo acceptance, compile-once,
non-finite batches, bad configuration, schedules, tx, and a loss-decrease comparison with Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat, init_mlp, mlp

import gaussnewton as gn

PLAIN = dict(damping_policy="constant", line_search=None, momentum=0.0, tx=None)


def test_plain_step_is_params_plus_lr_direction(regression_problem):
    # float64: the step and egn_direction are two compiled programs whose float32 roundings differ
    # by up to ~1e-4 relative on this system (cond(K + bλI) ~ 1e3); in float64 they agree to 1e-12
    model_fn = regression_problem[0]
    params, x, y = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), regression_problem[1:])
    opt = gn.egn(model_fn, loss="squared_error", learning_rate=0.7, damping=1e-2, **PLAIN)
    new, state, info = jax.jit(opt.step)(params, opt.init(params), x, y)
    d, dinfo = jax.jit(
        lambda p: gn.egn_direction(model_fn, p, x, y, loss="squared_error", damping=1e-2)
    )(params)
    expected = jax.tree_util.tree_map(lambda p, di: p + 0.7 * di, params, d)
    np.testing.assert_allclose(flat(new), flat(expected), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(info.loss, dinfo.loss, rtol=1e-12)
    assert int(state.count) == 1 and not bool(info.rejected)
    # evaluated even without line search / adaptive damping: the step guard needs L(w + αd)
    f_new = model_fn(new, x)
    np.testing.assert_allclose(info.loss_after, 0.5 * np.mean((f_new - y) ** 2), rtol=1e-12)


def test_momentum_matches_bias_corrected_formula(regression_problem):
    model_fn, params, x, y = regression_problem
    beta, lr, lam = 0.6, 0.5, 1e-1
    opt = gn.egn(
        model_fn,
        loss="squared_error",
        learning_rate=lr,
        damping=lam,
        damping_policy="constant",
        line_search=None,
        momentum=beta,
    )
    step = jax.jit(opt.step)
    direction = jax.jit(
        lambda p: gn.egn_direction(model_fn, p, x, y, loss="squared_error", damping=lam)[0]
    )
    state, p, p_ref, m = opt.init(params), params, flat(params), 0.0
    for t in range(1, 4):
        m = beta * m + (1 - beta) * flat(direction(p))
        p_ref = p_ref + lr * m / (1 - beta**t)
        p, state, _ = step(p, state, x, y)
        np.testing.assert_allclose(flat(p), p_ref, rtol=1e-4, atol=1e-5)


def test_armijo_accepted_steps_satisfy_the_condition(regression_problem):
    model_fn, params, x, y = regression_problem
    ls = gn.Armijo(c1=0.1, shrink=0.8, max_trials=15, reset="increase")
    opt = gn.egn(
        model_fn,
        loss="squared_error",
        learning_rate=2.0,
        damping=1e-4,
        damping_policy="constant",
        line_search=ls,
    )
    step = jax.jit(opt.step)
    state = opt.init(params)
    for _ in range(6):
        params, state, info = step(params, state, x, y)
        assert bool(info.ls_accepted)
        bound = info.loss + 0.1 * info.step_size * info.directional_derivative
        assert float(info.loss_after) <= float(bound) + 1e-7
        assert float(info.directional_derivative) < 0
        assert 1 <= int(info.ls_trials) <= 15
        assert float(info.step_size) <= 2.0


def test_step_compiles_once(regression_problem):
    model_fn, params, x, y = regression_problem
    traces = []

    def counted(p, xb):
        traces.append(1)
        return model_fn(p, xb)

    opt = gn.egn(counted, loss="squared_error", momentum=0.5, tx=optax.clip_by_global_norm(10.0))
    compiles = []

    @jax.jit
    def step(p, s, xb, yb):
        compiles.append(1)
        return opt.step(p, s, xb, yb)

    state = opt.init(params)
    for i in range(8):
        xb = x + 0.01 * i  # new data every step, same shapes
        params, state, info = step(params, state, xb, y)
    assert len(compiles) == 1
    n_traces = len(traces)
    params, state, info = step(params, state, x, y)
    assert len(traces) == n_traces  # no retracing of the model either


def test_step_called_without_jit_runs_compiled(regression_problem):
    """``opt.step`` on concrete arrays (a user who forgets ``jax.jit``) compiles once and then
    reuses it: the model is traced on the first call only (op-by-op it would run on every call),
    the result is that of ``jax.jit(opt.step)`` (the same program: equal to float32 rounding of
    reassociated reductions, 1e-6), and concrete bad labels still raise the documented error."""
    model_fn, params, x, y = regression_problem
    calls = []

    def counted(p, xb):
        calls.append(1)
        return model_fn(p, xb)

    opt = gn.egn(counted, loss="squared_error")
    state = opt.init(params)
    p1, s1, _ = opt.step(params, state, x, y)
    n_calls = len(calls)
    for i in range(3):
        p1, s1, info = opt.step(p1, s1, x + 0.01 * i, np.asarray(y))  # numpy labels: same trace
    assert len(calls) == n_calls and not bool(info.rejected)
    p2, s2, _ = jax.jit(opt.step)(params, state, x, y)
    p3, _, _ = opt.step(params, state, x, y)
    np.testing.assert_allclose(flat(p3), flat(p2), rtol=1e-6, atol=1e-7)
    ce = gn.egn(lambda p, xb: xb @ p, loss="softmax_cross_entropy")
    w = jnp.zeros((x.shape[1], 3))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        ce.step(w, ce.init(w), x, np.full(x.shape[0], 3))


def test_nonfinite_batch_leaves_params_and_state_unchanged(regression_problem):
    model_fn, params, x, y = regression_problem
    opt = gn.egn(model_fn, loss="squared_error", damping=1e-2, momentum=0.5)
    step = jax.jit(opt.step)
    state = opt.init(params)
    params, state, _ = step(params, state, x, y)
    bad_x = x.at[3, 1].set(jnp.nan)
    new, new_state, info = step(params, state, bad_x, y)
    assert bool(info.rejected)
    np.testing.assert_array_equal(flat(new), flat(params))
    for a, b in zip(
        jax.tree_util.tree_leaves(new_state._replace(damping=0.0)),
        jax.tree_util.tree_leaves(state._replace(damping=0.0)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert float(new_state.damping) == pytest.approx(
        10.0 * float(state.damping)
    )  # λ grows (adaptive: AdaptiveDamping.reject_increase = 10)
    bad_y = y.at[0].set(jnp.inf)
    _, _, info = step(params, state, x, bad_y)
    assert bool(info.rejected)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"loss": "hinge"}, ValueError, "loss='hinge'"),
        ({"damping": -1.0}, ValueError, "damping=-1.0"),
        ({"damping": 0.0, "loss": "softmax_cross_entropy"}, ValueError, "damping=0.0"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"damping_policy": "sometimes"}, ValueError, "damping_policy"),
        ({"line_search": "wolfe"}, ValueError, "line_search='wolfe'"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"gram": "fancy"}, ValueError, "gram='fancy'"),
        ({"curvature": "fisher"}, ValueError, "curvature='fisher'"),
        (
            {"curvature": "sampled", "loss": gn.ConvexLoss(lambda f, y: jnp.sum(f**2))},
            ValueError,
            "sampled",
        ),
        ({"num_samples": 0, "curvature": "sampled"}, ValueError, "num_samples"),
        ({"tx": "adam"}, TypeError, "tx="),
        (
            {"damping": optax.constant_schedule(1.0), "damping_policy": "adaptive"},
            ValueError,
            "adapts",
        ),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, err, match):
    args = {"loss": "squared_error", **kwargs}
    with pytest.raises(err, match=match):
        gn.egn(mlp, **args)


def test_shape_errors_at_first_trace():
    params = init_mlp(jax.random.key(0), 3, 3)
    x = jnp.ones((4, 3))
    opt = gn.egn(mlp, loss="sigmoid_binary_cross_entropy")
    with pytest.raises(ValueError, match="c = 1"):
        jax.eval_shape(opt.step, params, opt.init(params), x, jnp.zeros(4))
    opt = gn.egn(mlp, loss="squared_error")
    with pytest.raises(ValueError, match="do not match"):
        jax.eval_shape(opt.step, params, opt.init(params), x, jnp.zeros((4, 2)))


def test_schedules_and_tx(regression_problem):
    model_fn, params, x, y = regression_problem
    lr = optax.linear_schedule(1.0, 0.5, 4)
    lam = optax.exponential_decay(1.0, 1, 0.5)
    opt = gn.egn(
        model_fn,
        loss="squared_error",
        learning_rate=lr,
        damping=lam,
        damping_policy="constant",
        line_search=None,
        tx=optax.clip_by_global_norm(0.05),
    )
    step = jax.jit(opt.step)
    state = opt.init(params)
    for t in range(3):
        new, state, info = step(params, state, x, y)
        np.testing.assert_allclose(info.damping, 0.5**t, rtol=1e-6)
        np.testing.assert_allclose(info.step_size, lr(t), rtol=1e-6)
        assert np.linalg.norm(flat(new) - flat(params)) <= float(lr(t)) * 0.05 * (1 + 1e-5)
        params = new


def test_sampled_curvature_trains_and_uses_state_key():
    kx, kp = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (24, 4), jnp.float32)
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    params = init_mlp(kp, 4, 3, dtype=jnp.float32)
    opt = gn.egn(
        mlp, loss="softmax_cross_entropy", curvature="sampled", num_samples=1, damping=1e-1
    )
    state = opt.init(params, key=jax.random.key(1))
    step = jax.jit(opt.step)
    losses, keys = [], []
    for _ in range(15):
        keys.append(np.asarray(state.key))
        params, state, info = step(params, state, x, y)
        losses.append(float(info.loss))
    assert not np.array_equal(keys[0], keys[1])
    assert losses[-1] < 0.7 * losses[0]


def test_egn_defaults_beat_tuned_adam_in_steps(regression_problem):
    """EGN with defaults reaches the loss that the best Adam (lr grid) reaches in 300 steps within
    60 steps (a 5x margin in step count; no timing)."""
    model_fn, params, x, y = regression_problem

    def loss_fn(p):
        return 0.5 * jnp.mean((model_fn(p, x) - y) ** 2)

    @jax.jit
    def adam_final(lr):
        tx = optax.adam(lr)

        def body(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=300)
        return loss_fn(p)

    best_adam = min(float(adam_final(lr)) for lr in (3e-3, 1e-2, 3e-2, 1e-1))
    opt = gn.egn(model_fn, loss="squared_error")
    step = jax.jit(opt.step)
    state, p = opt.init(params), params
    for _ in range(60):
        p, state, info = step(p, state, x, y)
    assert float(loss_fn(p)) <= best_adam, (float(loss_fn(p)), best_adam)


def test_tx_follows_optax_sign_convention(regression_problem):
    """``tx`` receives ``−d`` (gradient-like) and its output is subtracted, as in optax: weight decay
    ``add_decayed_weights(wd)`` pulls the weights towards 0 (the update is ``α (d − wd·w)``)."""
    model_fn, params, x, y = regression_problem
    wd, lr = 0.3, 0.5
    plain = gn.egn(model_fn, loss="squared_error", learning_rate=lr, damping=1e-2, **PLAIN)
    decayed = gn.egn(
        model_fn,
        loss="squared_error",
        learning_rate=lr,
        damping=1e-2,
        **{**PLAIN, "tx": optax.add_decayed_weights(wd)},
    )
    p1, _, _ = plain.step(params, plain.init(params), x, y)
    p2, _, _ = decayed.step(params, decayed.init(params), x, y)
    expected = flat(p1) - lr * wd * flat(params)
    np.testing.assert_allclose(flat(p2), expected, rtol=1e-5, atol=1e-6)
