"""LQR references (ZOH, discounted DARE, H*, H_K) and EGN policy evaluation, in float64."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gaussnewton as gn  # noqa: E402
from gaussnewton_experiments.rl import lqr  # noqa: E402
from gaussnewton_experiments.rl.qlearning import LQRLearner, QLConfig  # noqa: E402

TINY = lqr.LQRSystem(
    name="tiny",
    A=np.array([[0.6, 0.2], [0.0, 0.4]]),
    B=np.array([[0.0], [1.0]]),
    Q=np.eye(2),
    R=np.eye(1),
    gamma=0.9,
)


@pytest.mark.parametrize("name, norm", [("AC1", 128.4), ("BDT1", 242.9)])
def test_dare_satisfies_discounted_riccati(name, norm):
    sys = lqr.make_system(name)
    p = lqr.dare(sys)
    g, a, b, q, r = sys.gamma, sys.A, sys.B, sys.Q, sys.R
    rhs = (
        q + g * a.T @ p @ a - g**2 * a.T @ p @ b @ np.linalg.solve(r + g * b.T @ p @ b, b.T @ p @ a)
    )
    assert np.linalg.norm(p - rhs) <= 1e-9 * np.linalg.norm(p)
    h, k, _ = lqr.optimal_h(sys)
    assert abs(np.linalg.norm(h) - norm) < 0.05  # EXPERIMENTS §3.1 reference values
    # K* is greedy for H*, and H* is the Q-function of K* (policy-evaluation fixed point).
    np.testing.assert_allclose(lqr.h_of_gain(sys, k), h, rtol=1e-8, atol=1e-8 * np.abs(h).max())
    assert lqr.spectral_radius(a + b @ lqr.stabilizing_gain(sys)) < 1.0


def test_zoh_matches_closed_form_for_invertible_a():
    a_c = np.array([[-1.0, 0.5], [0.2, -2.0]])
    b_c = np.array([[1.0], [0.5]])
    from scipy.linalg import expm

    a, b = lqr.zoh(a_c, b_c, 0.1)
    np.testing.assert_allclose(a, expm(0.1 * a_c), rtol=1e-12)
    np.testing.assert_allclose(b, np.linalg.solve(a_c, (a - np.eye(2)) @ b_c), rtol=1e-10)


def test_h_star_matches_rollout_cost_to_go():
    """q*(x, u) = c(x, u) + Σ_{t≥1} γ^t c(x_t, K* x_t): simulate from random (x, u)."""
    h, k, _ = lqr.optimal_h(TINY)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 3))
    x, u = z[:, :2], z[:, 2:]
    total = np.sum(x * x, 1) + np.sum(u * u, 1)
    x = x @ TINY.A.T + u @ TINY.B.T
    disc = 1.0
    for _ in range(400):  # 0.9^400 ~ 5e-19: truncation far below the tolerance
        disc *= TINY.gamma
        u = x @ k.T
        total += disc * (np.sum(x * x, 1) + np.sum(u * u, 1))
        x = x @ TINY.A.T + u @ TINY.B.T
    q = np.einsum("bi,ij,bj->b", z, h, z)
    np.testing.assert_allclose(q, total, rtol=1e-10)
    # and the JAX model of the learner evaluates the same quadratic form
    theta = lqr.sym_to_triu(jnp.asarray(h))
    np.testing.assert_allclose(lqr.q_value(theta, jnp.asarray(z)), q, rtol=1e-12)


def test_egn_policy_evaluation_recovers_h_k():
    """Fixed gain, exact (float64, deterministic) transitions: EGN finds H_K in a few steps."""
    gain = np.array([[-0.1, -0.2]])
    h_k = lqr.h_of_gain(TINY, gain)
    opt = gn.egn(
        LQRLearner.model_fn,
        loss="squared_error",
        learning_rate=1.0,
        damping=1e-10,
        damping_policy="constant",
        line_search=None,
    )
    cfg = QLConfig(
        batch_size=32, num_envs=8, episode_len=20, buffer_size=512, warmup_steps=8, improve_every=0
    )
    learner = LQRLearner(TINY, opt, cfg, init_gain=gain)
    state = learner.init(jax.random.key(0))
    state, metrics = learner.run(state, 20)
    err = np.linalg.norm(np.asarray(learner.h_matrix(state.params)) - h_k) / np.linalg.norm(h_k)
    assert err < 1e-6, err
    assert np.all(np.isfinite(np.asarray(metrics["h_error"])))
    np.testing.assert_array_equal(np.asarray(state.gain), gain)  # no improvement happened


def test_egn_policy_iteration_reaches_h_star():
    opt = gn.egn(
        LQRLearner.model_fn,
        loss="squared_error",
        learning_rate=1.0,
        damping=1e-10,
        damping_policy="constant",
        line_search=None,
    )
    cfg = QLConfig(
        batch_size=32, num_envs=8, episode_len=20, buffer_size=512, warmup_steps=8, improve_every=10
    )
    learner = LQRLearner(TINY, opt, cfg, init_gain=np.array([[-0.1, -0.2]]))
    state = learner.init(jax.random.key(1))
    e0 = float(learner.h_error(state.params))
    state, _ = learner.run(state, 60)
    assert float(learner.h_error(state.params)) < 1e-6 * e0
    np.testing.assert_allclose(np.asarray(state.gain), learner.k_star_np, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown LQR system"):
        lqr.make_system("AC99")
    with pytest.raises(ValueError, match="does not stabilize"):
        lqr.h_of_gain(TINY, np.array([[0.0, 5.0]]))
    with pytest.raises(ValueError, match="improve_every"):
        QLConfig(improve_every=-1)


def test_registered_lqr_experiment_yields_rows():
    from gaussnewton_experiments.registry import RunConfig, get_experiment

    spec = get_experiment("lqr_ac1")
    cfg = RunConfig(
        experiment="lqr_ac1",
        optimizer="adam",
        seed=0,
        steps=20,
        eval_every=10,
        hparams={"learning_rate": 0.01},
        options={**spec.options, "batch_size": 16, "buffer_size": 256},
    )
    rows = list(spec.run(cfg))
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert rows[0][spec.metric] == 1.0
    assert all(np.isfinite(r[spec.metric]) and r["train_time"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="unknown options"):
        list(spec.run(RunConfig("lqr_ac1", "adam", 0, 10, options={"bogus": 1})))


def test_bdt1_egn_auto_solver_is_the_parameter_space_solve():
    """BDT1 (n_z = 14, D = 105 upper-triangle parameters) at the experiment's batch 256: the
    default ``gn.egn(solver="auto")`` builds the 105 x 105 parameter-space matrix and no
    256 x 256 row-space Gram, like ``solver="param"`` (the row-space ``"cholesky"`` is the
    opposite). Traced only: nothing is compiled."""
    from gaussnewton.param_space import choose_space
    from gaussnewton_experiments.rl.qlearning import DEFAULT_CONFIGS

    b = DEFAULT_CONFIGS["BDT1"].batch_size
    assert (b, choose_space(105, b)) == (256, "param")
    theta = jnp.zeros((105,), jnp.float32)
    z = jnp.ones((b, 14), jnp.float32)
    y = jnp.ones((b,), jnp.float32)

    def shapes(solver):
        opt = gn.egn(LQRLearner.model_fn, loss="squared_error", solver=solver)
        text = str(jax.make_jaxpr(lambda t: opt.step(t, opt.init(t), z, y))(theta))
        return "f32[105,105]" in text, "f32[256,256]" in text

    assert shapes("auto") == shapes("param") == (True, False)
    assert shapes("cholesky") == (False, True)
