"""DQN on gymnax CartPole-v1 / Acrobot-v1 / MinAtar Freeway with the TD step taken by EGN (or Adam).

Deep Q-learning (Mnih et al.) with a replay buffer, a hard-updated target network and ε-greedy
exploration over ``M`` vectorized environments, all inside one jitted ``lax.scan``. The TD
regression is the contract of :mod:`.common`: the model is the Q-value of the TAKEN action,

    f(w, (s, a)) = Q_w(s)[a]                       (shape (b,), c = 1)
    y = r + γ (1 − terminated) max_a' Q_w̄(s')[a']   (target network w̄, held fixed)

and one optimizer step on ``(1/b) Σ ½ (f_i − y_i)²`` is taken per ``train_every`` acting
iterations (``gn.egn(model_fn, loss="squared_error", ...)`` or an optax wrapper). Truncation at
the time limit is NOT terminal (the target bootstraps from the final observation).

Q-networks: a ReLU MLP (``network="mlp"``, the classic-control tasks) or, for the MinAtar image
observations (``H x W x C`` = 10 x 10 x 7 for Freeway), the small CNN of the MinAtar baselines that
the EGN paper uses (``network="cnn"``): Conv 16 filters 3 x 3 (stride 1, no padding) → ReLU →
Dense ``hidden[0]`` (64) → ReLU → Dense ``num_actions``. Observations are stored flat; the CNN
reshapes them (square images: ``H = W``).

gymnax (>= 1.0.1, whose ``step`` returns ``(obs, state, reward, terminated, truncated, info)``)
is imported lazily: only this module needs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gaussnewton_experiments.rl.common import info_scalars

__all__ = [
    "DQNConfig",
    "DQNLearner",
    "DEFAULT_DQN_CONFIGS",
    "NETWORKS",
    "mlp_init",
    "cnn_init",
    "q_all",
    "q_taken",
]

NETWORKS = ("mlp", "cnn")


@dataclass(frozen=True)
class DQNConfig:
    """DQN settings (documented choices, see ``docs/results_rl.md``).

    Attributes:
        num_envs: parallel environments ``M`` (env steps per acting iteration).
        buffer_size: replay capacity in transitions.
        batch_size: transitions per regression step.
        gamma: discount.
        hidden: widths of the ReLU MLP ``obs -> hidden -> num_actions``.
        eps_start, eps_end, eps_decay_steps: linear ε schedule over environment steps.
        learning_starts: environment steps of pure acting before the first update.
        train_every: acting iterations between regression steps.
        target_every: regression steps between hard target-network copies.
        double_dqn: use ``Q_w̄(s')[argmax_a Q_w(s')[a]]`` in the target instead of the max.
        eval_episodes: greedy episodes (vectorized) per evaluation.
        network: ``"mlp"`` or ``"cnn"`` (image observations; see the module docstring).
        conv_channels: filters of the CNN's 3 x 3 convolution.
    """

    num_envs: int = 8
    buffer_size: int = 10000
    batch_size: int = 128
    gamma: float = 0.99
    hidden: tuple[int, ...] = (64, 64)
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 20000
    learning_starts: int = 1000
    train_every: int = 1
    target_every: int = 100
    double_dqn: bool = False
    eval_episodes: int = 100
    network: str = "mlp"
    conv_channels: int = 16

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(
                f"DQNConfig.network={self.network!r}: use 'mlp' (vector observations) or 'cnn' "
                "(image observations such as MinAtar's)."
            )
        if self.network == "cnn" and len(self.hidden) != 1:
            raise ValueError(
                f"DQNConfig.hidden={self.hidden!r}: the CNN has ONE dense hidden layer, e.g. (64,)."
            )
        for name in ("num_envs", "buffer_size", "batch_size", "train_every", "target_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DQNConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"DQNConfig.gamma must be in (0, 1], got {self.gamma}.")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))


DEFAULT_DQN_CONFIGS = {
    "CartPole-v1": DQNConfig(),
    "Acrobot-v1": DQNConfig(eps_decay_steps=30000, target_every=200),
    # episodes last 2 500 steps (the time limit): few greedy evaluation episodes
    "Freeway-MinAtar": DQNConfig(
        network="cnn",
        hidden=(64,),
        buffer_size=20000,
        eps_decay_steps=10000,
        learning_starts=1000,
        target_every=250,
        eval_episodes=8,
    ),
}


def mlp_init(key: jax.Array, sizes: tuple[int, ...], dtype=jnp.float32) -> dict:
    """LeCun-normal weights, zero biases, for layer widths ``sizes`` (input first)."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(k, (n_in, n_out), dtype) / np.sqrt(n_in)
        params[f"b{i}"] = jnp.zeros((n_out,), dtype)
    return params


def cnn_init(
    key: jax.Array,
    obs_shape: tuple[int, int, int],
    channels: int,
    hidden: int,
    num_actions: int,
    dtype=jnp.float32,
) -> dict:
    """LeCun-normal weights of the CNN (conv 3 x 3 → dense ``hidden`` → ``num_actions``)."""
    h, w, c = obs_shape
    k1, k2, k3 = jax.random.split(key, 3)
    flat = (h - 2) * (w - 2) * channels
    return {
        "conv_w": jax.random.normal(k1, (3, 3, c, channels), dtype) / float(np.sqrt(9 * c)),
        "conv_b": jnp.zeros((channels,), dtype),
        "w0": jax.random.normal(k2, (flat, hidden), dtype) / float(np.sqrt(flat)),
        "b0": jnp.zeros((hidden,), dtype),
        "w1": jax.random.normal(k3, (hidden, num_actions), dtype) / float(np.sqrt(hidden)),
        "b1": jnp.zeros((num_actions,), dtype),
    }


def _q_cnn(params: dict, obs: jnp.ndarray) -> jnp.ndarray:
    """``Q_w(s)`` of the CNN for flat observations ``(b, H·W·C)`` (square images)."""
    kh, kw, c, ch = params["conv_w"].shape
    n_pix = obs.shape[-1] // c
    side = int(round(np.sqrt(n_pix)))
    if side * side * c != obs.shape[-1] or (side - kh + 1) ** 2 * ch != params["w0"].shape[0]:
        raise ValueError(
            f"CNN Q-network: observations of size {obs.shape[-1]} are not square H x H x {c} "
            f"images matching the dense layer ({params['w0'].shape[0]} inputs)."
        )
    x = obs.reshape(obs.shape[0], side, side, c).astype(params["conv_w"].dtype)
    x = jax.lax.conv_general_dilated(
        x, params["conv_w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = jax.nn.relu(x + params["conv_b"]).reshape(obs.shape[0], -1)
    x = jax.nn.relu(x @ params["w0"] + params["b0"])
    return x @ params["w1"] + params["b1"]


def q_all(params: dict, obs: jnp.ndarray) -> jnp.ndarray:
    """All action values ``Q_w(s)``, ``(b, num_actions)``: the CNN when ``params`` has a
    ``"conv_w"`` entry (:func:`cnn_init`), else the ReLU MLP (:func:`mlp_init`)."""
    if "conv_w" in params:
        return _q_cnn(params, obs)
    n = len(params) // 2
    h = obs
    for i in range(n):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def q_taken(params: dict, x: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
    """``model_fn`` of the TD regression: ``Q_w(s)[a]`` for ``x = (obs (b, d), action (b,))``."""
    obs, action = x
    q = q_all(params, obs)
    return jnp.take_along_axis(q, action[:, None].astype(jnp.int32), axis=1)[:, 0]


class DQNState(NamedTuple):
    params: Any
    target: Any
    opt_state: Any
    env_state: Any
    obs: jnp.ndarray
    buf_obs: jnp.ndarray
    buf_act: jnp.ndarray
    buf_rew: jnp.ndarray
    buf_next: jnp.ndarray
    buf_term: jnp.ndarray
    ptr: jnp.ndarray
    count: jnp.ndarray
    ep_return: jnp.ndarray  # (M,) running returns
    done_return_sum: jnp.ndarray  # sum of returns of episodes finished since last reset
    done_count: jnp.ndarray
    env_steps: jnp.ndarray
    updates: jnp.ndarray
    loss_sum: jnp.ndarray
    key: jax.Array


def _make_env(name: str):
    try:
        import gymnax
    except ImportError as e:  # optional extra
        raise ImportError(
            f"DQN on {name!r} needs gymnax (>= 1.0.1; it also imports `six`): "
            "pip install 'gaussnewton-experiments[rl]' (or: pip install gymnax six)."
        ) from e
    env, env_params = gymnax.make(name)
    return env, env_params


class DQNLearner:
    """DQN on one gymnax environment with a pluggable regression optimizer.

    Args:
        env_name: gymnax id, e.g. "CartPole-v1" or "Acrobot-v1".
        optimizer: object with ``init(w)`` / ``step(w, state, (obs, action), y, key)``
            minimizing the squared TD error of :func:`q_taken`.
        config: :class:`DQNConfig`.
    """

    model_fn = staticmethod(q_taken)

    def __init__(self, env_name: str, optimizer: Any, config: DQNConfig | None = None) -> None:
        self.env_name = env_name
        self.env, self.env_params = _make_env(env_name)
        self.optimizer = optimizer
        self.config = config or DEFAULT_DQN_CONFIGS.get(env_name, DQNConfig())
        obs_shape = self.env.observation_space(self.env_params).shape
        self.obs_shape = tuple(int(n) for n in obs_shape)
        self.obs_dim = int(np.prod(obs_shape))
        if self.config.network == "cnn" and len(self.obs_shape) != 3:
            raise ValueError(
                f"DQNConfig.network='cnn' needs image observations (H, W, C); {env_name!r} has "
                f"shape {self.obs_shape}: use network='mlp'."
            )
        self.num_actions = int(self.env.action_space(self.env_params).n)
        self.max_steps = int(self.env_params.max_steps_in_episode)
        self._run_cache: dict[int, Any] = {}
        self._eval_fn = None

    # -- environment helpers --------------------------------------------------------------
    def _reset(self, key: jax.Array, n: int):
        keys = jax.random.split(key, n)
        obs, state = jax.vmap(self.env.reset, in_axes=(0, None))(keys, self.env_params)
        return obs.reshape(n, -1).astype(jnp.float32), state

    def _step(self, key: jax.Array, state: Any, action: jnp.ndarray):
        n = action.shape[0]
        keys = jax.random.split(key, n)
        out = jax.vmap(self.env.step, in_axes=(0, 0, 0, None))(keys, state, action, self.env_params)
        if len(out) != 6:
            raise RuntimeError(
                "gymnax >= 1.0.1 is required (step must return obs, state, reward, terminated, "
                f"truncated, info); got a {len(out)}-tuple. Upgrade: pip install -U gymnax."
            )
        obs, state, reward, terminated, truncated, info = out
        final = info["final_observation"].reshape(n, -1).astype(jnp.float32)
        return obs.reshape(n, -1).astype(jnp.float32), state, reward, terminated, truncated, final

    def epsilon(self, env_steps: jnp.ndarray) -> jnp.ndarray:
        """Linear ε schedule over environment steps."""
        cfg = self.config
        frac = jnp.clip(env_steps / max(cfg.eps_decay_steps, 1), 0.0, 1.0)
        return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)

    # -- learning ---------------------------------------------------------------------------
    def td_targets(self, params, target, reward, next_obs, terminated) -> jnp.ndarray:
        """``y = r + γ (1 − terminated) Q_w̄(s')[a*]`` (``a*`` greedy for w̄, or for w if double)."""
        q_next_t = q_all(target, next_obs)
        if self.config.double_dqn:
            a_star = jnp.argmax(q_all(params, next_obs), axis=1)
            q_next = jnp.take_along_axis(q_next_t, a_star[:, None], axis=1)[:, 0]
        else:
            q_next = jnp.max(q_next_t, axis=1)
        y = reward + self.config.gamma * (1.0 - terminated.astype(reward.dtype)) * q_next
        return jax.lax.stop_gradient(y)

    def _update(self, s: DQNState, key: jax.Array) -> DQNState:
        cfg = self.config
        k_idx, k_opt = jax.random.split(key)
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, s.count)
        obs, act = s.buf_obs[idx], s.buf_act[idx]
        y = self.td_targets(s.params, s.target, s.buf_rew[idx], s.buf_next[idx], s.buf_term[idx])
        params, opt_state, info = self.optimizer.step(s.params, s.opt_state, (obs, act), y, k_opt)
        info = info_scalars(info)
        loss = info.get("loss", 0.5 * jnp.mean((q_taken(s.params, (obs, act)) - y) ** 2))
        updates = s.updates + 1
        copy = updates % cfg.target_every == 0
        target = jax.tree.map(lambda t, p: jnp.where(copy, p, t), s.target, params)
        return s._replace(
            params=params,
            opt_state=opt_state,
            target=target,
            updates=updates,
            loss_sum=s.loss_sum + loss.astype(jnp.float32),
        )

    def _iteration(self, s: DQNState, it: jnp.ndarray) -> tuple[DQNState, None]:
        cfg = self.config
        m = cfg.num_envs
        key, k_eps, k_rand, k_env, k_upd = jax.random.split(s.key, 5)
        eps = self.epsilon(s.env_steps)
        greedy = jnp.argmax(q_all(s.params, s.obs), axis=1)
        rand = jax.random.randint(k_rand, (m,), 0, self.num_actions)
        action = jnp.where(jax.random.uniform(k_eps, (m,)) < eps, rand, greedy)
        obs, env_state, reward, term, trunc, final = self._step(k_env, s.env_state, action)
        idx = (s.ptr + jnp.arange(m)) % cfg.buffer_size
        reward = reward.astype(jnp.float32)
        ep_return = s.ep_return + reward
        done = jnp.logical_or(term, trunc)
        s = s._replace(
            key=key,
            obs=obs,
            env_state=env_state,
            buf_obs=s.buf_obs.at[idx].set(s.obs),
            buf_act=s.buf_act.at[idx].set(action.astype(jnp.int32)),
            buf_rew=s.buf_rew.at[idx].set(reward),
            buf_next=s.buf_next.at[idx].set(final),
            buf_term=s.buf_term.at[idx].set(term.astype(jnp.float32)),
            ptr=(s.ptr + m) % cfg.buffer_size,
            count=jnp.minimum(s.count + m, cfg.buffer_size),
            ep_return=jnp.where(done, 0.0, ep_return),
            done_return_sum=s.done_return_sum + jnp.sum(jnp.where(done, ep_return, 0.0)),
            done_count=s.done_count + jnp.sum(done).astype(jnp.int32),
            env_steps=s.env_steps + m,
        )
        train = (s.env_steps >= cfg.learning_starts) & (s.count >= cfg.batch_size)
        train = train & (it % cfg.train_every == 0)
        s = jax.lax.cond(train, self._update, lambda s_, k: s_, s, k_upd)
        return s, None

    # -- public driver ----------------------------------------------------------------------
    def init(self, key: jax.Array) -> DQNState:
        cfg = self.config
        k_net, k_env, key = jax.random.split(key, 3)
        if cfg.network == "cnn":
            params = cnn_init(
                k_net, self.obs_shape, cfg.conv_channels, cfg.hidden[0], self.num_actions
            )
        else:
            params = mlp_init(k_net, (self.obs_dim, *cfg.hidden, self.num_actions))
        obs, env_state = self._reset(k_env, cfg.num_envs)
        z = jnp.zeros
        return DQNState(
            params=params,
            target=params,
            opt_state=self.optimizer.init(params),
            env_state=env_state,
            obs=obs,
            buf_obs=z((cfg.buffer_size, self.obs_dim), jnp.float32),
            buf_act=z((cfg.buffer_size,), jnp.int32),
            buf_rew=z((cfg.buffer_size,), jnp.float32),
            buf_next=z((cfg.buffer_size, self.obs_dim), jnp.float32),
            buf_term=z((cfg.buffer_size,), jnp.float32),
            ptr=z((), jnp.int32),
            count=z((), jnp.int32),
            ep_return=z((cfg.num_envs,), jnp.float32),
            done_return_sum=z((), jnp.float32),
            done_count=z((), jnp.int32),
            env_steps=z((), jnp.int32),
            updates=z((), jnp.int32),
            loss_sum=z((), jnp.float32),
            key=key,
        )

    def run(self, state: DQNState, iterations: int) -> DQNState:
        """``iterations`` acting iterations (``num_envs`` env steps each), one jitted scan."""
        fn = self._run_cache.get(iterations)
        if fn is None:

            def chunk(s):
                base = s.env_steps // self.config.num_envs
                s, _ = jax.lax.scan(self._iteration, s, base + jnp.arange(iterations))
                return s

            fn = jax.jit(chunk)
            self._run_cache[iterations] = fn
        return fn(state)

    def evaluate(self, params: Any, key: jax.Array) -> jnp.ndarray:
        """Greedy returns of ``eval_episodes`` episodes run side by side (each to its end)."""
        if self._eval_fn is None:
            n = self.config.eval_episodes

            def ev(params, key):
                k_reset, key = jax.random.split(key)
                obs, state = self._reset(k_reset, n)

                def body(carry, k):
                    obs, state, ret, alive = carry
                    action = jnp.argmax(q_all(params, obs), axis=1)
                    obs, state, r, term, trunc, _ = self._step(k, state, action)
                    ret = ret + jnp.where(alive, r.astype(jnp.float32), 0.0)
                    alive = alive & ~(term | trunc)
                    return (obs, state, ret, alive), None

                init = (obs, state, jnp.zeros((n,), jnp.float32), jnp.ones((n,), bool))
                keys = jax.random.split(key, self.max_steps)
                (_, _, ret, _), _ = jax.lax.scan(body, init, keys)
                return ret

            self._eval_fn = jax.jit(ev)
        return self._eval_fn(params, key)

    def iterate(
        self, key: jax.Array, env_steps: int, eval_every: int, time_budget: float | None = None
    ) -> Iterator[dict]:
        """Train for ``env_steps`` environment steps; every ``eval_every`` env steps yield a row.

        Rows: ``step`` (env steps), ``train_time`` (seconds, compilation excluded), ``eval_time``,
        ``return`` (mean greedy return over ``eval_episodes``), ``return_std``,
        ``train_return`` (mean of training episodes finished since the previous row),
        ``train_loss`` (mean TD loss of the updates since the previous row), ``updates``.
        """
        cfg = self.config
        if env_steps < cfg.num_envs or eval_every < cfg.num_envs:
            raise ValueError(
                f"env_steps ({env_steps}) and eval_every ({eval_every}) must be >= num_envs "
                f"({cfg.num_envs}); they count environment steps."
            )
        k_init, k_eval = jax.random.split(key)
        state = self.init(k_init)
        iters = max(eval_every // cfg.num_envs, 1)
        total_iters = max(env_steps // cfg.num_envs, 1)
        t0 = time.perf_counter()
        jax.block_until_ready(self.evaluate(state.params, k_eval))
        returns = np.asarray(self.evaluate(state.params, k_eval))
        eval_time = time.perf_counter() - t0  # includes compiling the evaluation once
        yield {
            "step": 0,
            "train_time": 0.0,
            "eval_time": eval_time,
            "return": float(returns.mean()),
            "return_std": float(returns.std()),
            "updates": 0,
        }
        jax.block_until_ready(self.run(state, min(iters, total_iters)))  # compile
        train_time, done_iters, e = 0.0, 0, 0
        while done_iters < total_iters:
            n = min(iters, total_iters - done_iters)
            if n != iters:
                jax.block_until_ready(self.run(state, n))
            prev = state
            t0 = time.perf_counter()
            state = jax.block_until_ready(self.run(state, n))
            train_time += time.perf_counter() - t0
            done_iters += n
            e += 1
            t1 = time.perf_counter()
            returns = np.asarray(self.evaluate(state.params, jax.random.fold_in(k_eval, e)))
            eval_time += time.perf_counter() - t1
            n_done = int(state.done_count - prev.done_count)
            n_upd = int(state.updates - prev.updates)
            row = {
                "step": int(state.env_steps),
                "train_time": train_time,
                "eval_time": eval_time,
                "return": float(returns.mean()),
                "return_std": float(returns.std()),
                "train_return": float(state.done_return_sum - prev.done_return_sum) / n_done
                if n_done
                else float("nan"),
                "train_loss": float(state.loss_sum - prev.loss_sum) / n_upd
                if n_upd
                else float("nan"),
                "updates": int(state.updates),
                "epsilon": float(self.epsilon(state.env_steps)),
            }
            yield row
            if not np.isfinite(row["return"]) or not all(
                bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params)
            ):
                row["diverged"] = True
                return
            if time_budget is not None and train_time > time_budget:
                return
