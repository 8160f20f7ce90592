"""DQN smoke test (tiny budget) and the TD-target / model contract of the DQN regression."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip(
    "gymnax", reason="DQN needs the optional extra gymnax (gaussnewton-experiments[rl])"
)

import gaussnewton as gn  # noqa: E402
from gaussnewton_experiments.rl.dqn import DQNConfig, DQNLearner, q_all, q_taken  # noqa: E402

TINY = DQNConfig(
    num_envs=4,
    buffer_size=256,
    batch_size=16,
    hidden=(8,),
    eps_decay_steps=200,
    learning_starts=64,
    target_every=5,
    eval_episodes=3,
)


@pytest.fixture(scope="module")
def learner():
    opt = gn.egn(
        DQNLearner.model_fn,
        loss="squared_error",
        learning_rate=0.3,
        damping=1.0,
        damping_policy="constant",
        line_search=None,
    )
    return DQNLearner("CartPole-v1", opt, TINY)


def test_dqn_smoke_rows_and_updates(learner):
    rows = list(learner.iterate(jax.random.key(0), 400, 200))
    assert [r["step"] for r in rows] == [0, 200, 400]
    assert rows[-1]["updates"] == (400 - 64) // 4 + 1  # one update per iteration after start
    for r in rows:
        assert np.isfinite(r["return"]) and 1.0 <= r["return"] <= 500.0
        assert r["train_time"] >= 0.0
    assert np.isfinite(rows[-1]["train_loss"])
    assert rows[-1]["epsilon"] == pytest.approx(TINY.eps_end)


def test_td_targets_and_taken_action_model(learner):
    params = {
        "w0": jnp.arange(8.0).reshape(4, 2) / 10,
        "b0": jnp.array([0.1, -0.2]),
    }  # a linear Q network: Q(s) = s W + b, 2 actions
    target = jax.tree.map(lambda p: 2 * p, params)
    obs = jnp.array([[1.0, 0.0, -1.0, 0.5], [0.2, 0.3, 0.0, -0.4]])
    q = obs @ params["w0"] + params["b0"]
    np.testing.assert_allclose(q_all(params, obs), q, rtol=1e-6)
    np.testing.assert_allclose(q_taken(params, (obs, jnp.array([1, 0]))), [q[0, 1], q[1, 0]])
    reward = jnp.array([1.0, 1.0])
    term = jnp.array([0.0, 1.0])
    y = learner.td_targets(params, target, reward, obs, term)
    qt = obs @ target["w0"] + target["b0"]
    np.testing.assert_allclose(y, [1.0 + 0.99 * qt[0].max(), 1.0], rtol=1e-6)
    dbl = DQNLearner.__new__(DQNLearner)
    dbl.config = dataclasses.replace(TINY, double_dqn=True)
    y2 = dbl.td_targets(params, target, reward, obs, term)
    np.testing.assert_allclose(y2[0], 1.0 + 0.99 * qt[0, jnp.argmax(q[0])], rtol=1e-6)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="gamma"):
        DQNConfig(gamma=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DQNConfig(batch_size=0)


def test_cnn_q_network_is_the_papers_and_matches_a_dense_reference():
    """Conv 16 3x3 (VALID) → ReLU → Dense 64 → ReLU → actions on 10x10x7 images, against numpy."""
    from gaussnewton_experiments.rl.dqn import cnn_init

    params = cnn_init(jax.random.key(1), (10, 10, 7), 16, 64, 3)
    assert params["conv_w"].shape == (3, 3, 7, 16) and params["w0"].shape == (8 * 8 * 16, 64)
    obs = jax.random.bernoulli(jax.random.key(2), 0.2, (2, 10, 10, 7)).astype(jnp.float32)
    q = np.asarray(q_all(params, obs.reshape(2, -1)))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(obs, np.float64)
    conv = np.zeros((2, 8, 8, 16))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("bhwc,cf->bhwf", x[:, i : i + 8, j : j + 8], p["conv_w"][i, j])
    h = np.maximum(conv + p["conv_b"], 0).reshape(2, -1)
    h = np.maximum(h @ p["w0"] + p["b0"], 0)
    np.testing.assert_allclose(q, h @ p["w1"] + p["b1"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="network"):
        DQNConfig(network="rnn")


@pytest.mark.slow  # 30-80 s of gymnax compilation; the CNN Q-network is checked against a
# dense reference above and the DQN loop by the CartPole smoke test, both in the default run
def test_dqn_freeway_minatar_smoke():
    """A few steps of EGN-DQN on MinAtar Freeway with the CNN (gymnax ships MinAtar, offline).

    Run in 32-bit mode, as the CLI runs it: gymnax's Freeway mixes int32 and int64 under the
    suite's ``jax_enable_x64`` and fails to trace."""
    with jax.enable_x64(False):
        _freeway_smoke()


def _freeway_smoke():
    cfg = DQNConfig(
        num_envs=2,
        buffer_size=64,
        batch_size=8,
        hidden=(64,),
        network="cnn",
        learning_starts=16,
        target_every=4,
        eval_episodes=1,
    )
    opt = gn.egn(
        DQNLearner.model_fn, loss="squared_error", learning_rate=0.1, damping=1.0,
        damping_policy="constant", line_search=None,
    )  # fmt: skip
    learner = DQNLearner("Freeway-MinAtar", opt, cfg)
    assert learner.obs_shape == (10, 10, 7) and learner.num_actions == 3
    assert learner.max_steps == 2500
    # greedy evaluation scans a whole episode: a 40-step time limit keeps the test short
    learner.env_params = learner.env_params.replace(max_steps_in_episode=40)
    learner.max_steps = 40
    rows = list(learner.iterate(jax.random.key(0), 32, 32))
    assert [r["step"] for r in rows] == [0, 32]
    assert rows[-1]["updates"] == (32 - 16) // 2 + 1
    assert np.isfinite(rows[-1]["train_loss"]) and rows[-1]["return"] >= 0.0
