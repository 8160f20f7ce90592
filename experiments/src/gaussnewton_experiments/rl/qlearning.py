"""Q-function learning on LQR with Gauss-Newton TD steps (policy evaluation + improvement).

Model: ``q_θ(x, u) = zᵀ H_θ z`` with ``z = [x; u]`` and ``θ`` the upper triangle of the symmetric
``H_θ`` (:func:`~gaussnewton_experiments.rl.lqr.q_value`, ``model_fn(θ, z) -> (b,)``).

One training step (all inside ``lax.scan`` under ``jit``):

1. act: ``M`` parallel episodes take ``u = K x + σ ε`` (``ε ~ N(0, I)``), observe the cost
   ``c = xᵀQx + uᵀRu`` and ``x' = A x + B u``; transitions ``(z, c, x')`` go to a circular replay
   buffer (pure arrays); an episode resets to ``x ~ N(0, I)`` every ``T`` steps;
2. fit: sample ``b`` transitions, build the TD target with the parameters held fixed,
   ``y = c + γ q_θ(x', K x')``, and take ONE step of the regression optimizer on
   ``(1/b) Σ ½ (q_θ(z_i) − y_i)²`` (any object with the ``init/step`` contract, e.g. ``gn.egn``);
3. improve: every ``N`` steps, ``K ← −H_uu⁻¹ H_ux`` (kept only if ``H_uu`` is positive definite).

Because ``q`` is linear in ``θ``, an exact Gauss-Newton step with small ``λ`` solves each
fixed-target regression on the batch: this is fitted Q-iteration, whose error contracts by about
``γ ρ(A + BK)²`` per step, while first-order methods need many steps per regression.

Metric: ``‖H* − H_θ‖_F`` (and relative to its initial value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gaussnewton_experiments.rl.common import info_scalars
from gaussnewton_experiments.rl.lqr import (
    LQRSystem,
    gain_from_h,
    num_features,
    optimal_h,
    q_value,
    stabilizing_gain,
    triu_to_sym,
)

__all__ = ["QLConfig", "QLState", "LQRLearner", "DEFAULT_CONFIGS"]


@dataclass(frozen=True)
class QLConfig:
    """Settings of LQR Q-learning (documented choices, see ``docs/results_rl.md``).

    Attributes:
        batch_size: transitions per regression step ``b``.
        num_envs: parallel episodes ``M`` (transitions added per step).
        episode_len: reset period ``T`` of each episode.
        noise_std: exploration noise ``σ`` on the action.
        buffer_size: replay capacity (oldest transitions overwritten).
        warmup_steps: acting steps (``M`` transitions each) with the initial gain before training.
        improve_every: policy-improvement period ``N`` in training steps (0: evaluation only).
        init_gain_r_scale: the initial stabilizing gain is the LQR gain with ``R · r_scale``.
    """

    batch_size: int = 256
    num_envs: int = 16
    episode_len: int = 50
    noise_std: float = 1.0
    buffer_size: int = 16384
    warmup_steps: int = 32
    improve_every: int = 50
    init_gain_r_scale: float = 100.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_envs", "episode_len", "buffer_size", "warmup_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QLConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.improve_every < 0:
            raise ValueError(
                f"QLConfig.improve_every must be >= 0 (0 = never), got {self.improve_every}."
            )
        if self.buffer_size < self.num_envs:
            raise ValueError(
                f"QLConfig.buffer_size ({self.buffer_size}) must be >= num_envs ({self.num_envs})."
            )


DEFAULT_CONFIGS = {
    "AC1": QLConfig(episode_len=50, improve_every=50),
    "BDT1": QLConfig(episode_len=100, improve_every=100),
}


class QLState(NamedTuple):
    """Carry of the training scan (a pytree of arrays)."""

    params: jnp.ndarray  # θ, upper triangle of H
    opt_state: Any
    gain: jnp.ndarray  # (n_u, n_x) current policy K
    x: jnp.ndarray  # (M, n_x) current states
    t: jnp.ndarray  # time in the current episodes
    buf_z: jnp.ndarray  # (S, n_z)
    buf_c: jnp.ndarray  # (S,)
    buf_xn: jnp.ndarray  # (S, n_x)
    ptr: jnp.ndarray
    count: jnp.ndarray
    key: jax.Array
    step: jnp.ndarray


class LQRLearner:
    """Q-function learning on one LQR system with a pluggable regression optimizer.

    Args:
        system: the discounted LQR problem.
        optimizer: object with ``init(θ)`` / ``step(θ, state, z, y, key)`` (squared error).
        config: :class:`QLConfig`.
        init_gain: starting policy (default: :func:`stabilizing_gain`).

    Use :meth:`init` then :meth:`run` (a jitted scan of ``n`` steps, one compilation per ``n``).
    """

    def __init__(
        self,
        system: LQRSystem,
        optimizer: Any,
        config: QLConfig | None = None,
        init_gain: np.ndarray | None = None,
    ) -> None:
        self.system = system
        self.optimizer = optimizer
        self.config = config or DEFAULT_CONFIGS.get(system.name, QLConfig())
        dtype = jnp.result_type(float)
        self.dtype = dtype
        h_star, k_star, _ = optimal_h(system)
        self.h_star_np = h_star
        self.k_star_np = k_star
        self.h_star = jnp.asarray(h_star, dtype)
        self.A = jnp.asarray(system.A, dtype)
        self.B = jnp.asarray(system.B, dtype)
        self.Q = jnp.asarray(system.Q, dtype)
        self.R = jnp.asarray(system.R, dtype)
        if init_gain is None:
            init_gain = stabilizing_gain(system, r_scale=self.config.init_gain_r_scale)
        init_gain = np.asarray(init_gain, dtype=np.float64)
        if init_gain.shape != (system.n_u, system.n_x):
            raise ValueError(
                f"init_gain must have shape {(system.n_u, system.n_x)}, got {init_gain.shape}."
            )
        self.init_gain = jnp.asarray(init_gain, dtype)
        self._run_cache: dict[int, Callable] = {}

    # -- pieces ---------------------------------------------------------------------------
    @staticmethod
    def model_fn(theta: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
        """``q_θ(z) = zᵀ H_θ z`` for a batch ``z`` of shape ``(b, n_z)``; returns ``(b,)``."""
        return q_value(theta, z)

    def h_matrix(self, theta: jnp.ndarray) -> jnp.ndarray:
        """Symmetric ``H_θ`` from the parameters."""
        return triu_to_sym(theta, self.system.n_z)

    def h_error(self, theta: jnp.ndarray) -> jnp.ndarray:
        """``‖H* − H_θ‖_F``."""
        return jnp.linalg.norm(self.h_star - self.h_matrix(theta))

    def _act(self, state: QLState, key: jax.Array) -> QLState:
        cfg = self.config
        k_noise, k_reset = jax.random.split(key)
        x = state.x
        u = x @ state.gain.T + cfg.noise_std * jax.random.normal(
            k_noise, (cfg.num_envs, self.system.n_u), self.dtype
        )
        cost = jnp.einsum("bi,ij,bj->b", x, self.Q, x) + jnp.einsum("bi,ij,bj->b", u, self.R, u)
        x_next = x @ self.A.T + u @ self.B.T
        idx = (state.ptr + jnp.arange(cfg.num_envs)) % cfg.buffer_size
        buf_z = state.buf_z.at[idx].set(jnp.concatenate([x, u], axis=1))
        buf_c = state.buf_c.at[idx].set(cost)
        buf_xn = state.buf_xn.at[idx].set(x_next)
        t = state.t + 1
        reset = t >= cfg.episode_len
        x_reset = jax.random.normal(k_reset, x.shape, self.dtype)
        x = jnp.where(reset, x_reset, x_next)
        return state._replace(
            x=x,
            t=jnp.where(reset, 0, t),
            buf_z=buf_z,
            buf_c=buf_c,
            buf_xn=buf_xn,
            ptr=(state.ptr + cfg.num_envs) % cfg.buffer_size,
            count=jnp.minimum(state.count + cfg.num_envs, cfg.buffer_size),
        )

    def td_targets(
        self, theta: jnp.ndarray, gain: jnp.ndarray, cost: jnp.ndarray, x_next: jnp.ndarray
    ) -> jnp.ndarray:
        """Fixed TD target ``y = c + γ q_θ(x', K x')`` (no gradient flows through it)."""
        u_next = x_next @ gain.T
        q_next = q_value(theta, jnp.concatenate([x_next, u_next], axis=1))
        return jax.lax.stop_gradient(cost + self.system.gamma * q_next)

    def _improve(self, state: QLState) -> QLState:
        n_x = self.system.n_x
        h = self.h_matrix(state.params)
        chol = jnp.linalg.cholesky(h[n_x:, n_x:])
        new_gain = gain_from_h(h, n_x)
        ok = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.isfinite(new_gain))
        return state._replace(gain=jnp.where(ok, new_gain, state.gain))

    def _train_step(self, state: QLState, _: Any) -> tuple[QLState, dict]:
        cfg = self.config
        key, k_act, k_batch, k_opt = jax.random.split(state.key, 4)
        state = self._act(state._replace(key=key), k_act)
        idx = jax.random.randint(k_batch, (cfg.batch_size,), 0, state.count)
        z, c, xn = state.buf_z[idx], state.buf_c[idx], state.buf_xn[idx]
        y = self.td_targets(state.params, state.gain, c, xn)
        params, opt_state, info = self.optimizer.step(state.params, state.opt_state, z, y, k_opt)
        step = state.step + 1
        state = state._replace(params=params, opt_state=opt_state, step=step)
        if cfg.improve_every > 0:
            state = jax.lax.cond(step % cfg.improve_every == 0, self._improve, lambda s: s, state)
        metrics = {"h_error": self.h_error(params), **info_scalars(info)}
        return state, metrics

    # -- public driver --------------------------------------------------------------------
    def init(self, key: jax.Array, theta0: jnp.ndarray | None = None) -> QLState:
        """Initial carry: ``θ0`` (default zeros), the initial gain, a buffer pre-filled by
        ``warmup_steps`` acting steps of the initial (noisy) policy."""
        sys, cfg = self.system, self.config
        if theta0 is None:
            theta0 = jnp.zeros((num_features(sys.n_z),), self.dtype)
        k_x, key = jax.random.split(key)
        state = QLState(
            params=theta0,
            opt_state=self.optimizer.init(theta0),
            gain=self.init_gain,
            x=jax.random.normal(k_x, (cfg.num_envs, sys.n_x), self.dtype),
            t=jnp.zeros((), jnp.int32),
            buf_z=jnp.zeros((cfg.buffer_size, sys.n_z), self.dtype),
            buf_c=jnp.zeros((cfg.buffer_size,), self.dtype),
            buf_xn=jnp.zeros((cfg.buffer_size, sys.n_x), self.dtype),
            ptr=jnp.zeros((), jnp.int32),
            count=jnp.zeros((), jnp.int32),
            key=key,
            step=jnp.zeros((), jnp.int32),
        )

        def warm(s, k):
            return self._act(s, k), None

        keys = jax.random.split(jax.random.fold_in(key, 1), cfg.warmup_steps)
        state, _ = jax.jit(lambda s, ks: jax.lax.scan(warm, s, ks))(state, keys)
        return state

    def run(self, state: QLState, num_steps: int) -> tuple[QLState, dict]:
        """``num_steps`` training steps in one jitted ``lax.scan``; per-step metrics stacked."""
        fn = self._run_cache.get(num_steps)
        if fn is None:
            fn = jax.jit(lambda s: jax.lax.scan(self._train_step, s, None, length=num_steps))
            self._run_cache[num_steps] = fn
        return fn(state)

    def iterate(
        self, key: jax.Array, num_steps: int, eval_every: int, time_budget: float | None = None
    ) -> Iterator[dict]:
        """Train ``num_steps`` steps and yield a row every ``eval_every`` steps (and at step 0).

        Rows: ``step``, ``train_time`` (seconds, compilation excluded: the chunk function is
        compiled on a copy of the state before the clock starts), ``h_error``, ``h_error_rel``
        (relative to step 0), ``gain_error`` ``‖K* − K‖_F``, and ``train_loss`` when the
        optimizer reports ``loss``.
        """
        import time

        if eval_every < 1 or num_steps < 1:
            raise ValueError(
                f"num_steps and eval_every must be >= 1, got {num_steps} and {eval_every}."
            )
        state = self.init(key)
        e0 = float(self.h_error(state.params))
        k_star = jnp.asarray(self.k_star_np, self.dtype)
        yield {
            "step": 0,
            "train_time": 0.0,
            "h_error": e0,
            "h_error_rel": 1.0,
            "gain_error": float(jnp.linalg.norm(k_star - state.gain)),
        }
        chunk = min(eval_every, num_steps)
        jax.block_until_ready(self.run(state, chunk))  # compile (result discarded)
        train_time, done = 0.0, 0
        while done < num_steps:
            n = min(chunk, num_steps - done)
            if n != chunk:
                jax.block_until_ready(self.run(state, n))
            t0 = time.perf_counter()
            state, metrics = self.run(state, n)
            jax.block_until_ready(state)
            train_time += time.perf_counter() - t0
            done += n
            h_err = float(metrics["h_error"][-1])
            row = {
                "step": done,
                "train_time": train_time,
                "h_error": h_err,
                "h_error_rel": h_err / e0 if e0 > 0 else float("nan"),
                "gain_error": float(jnp.linalg.norm(k_star - state.gain)),
            }
            if "loss" in metrics:
                row["train_loss"] = float(jnp.mean(metrics["loss"]))
            for name in ("damping", "step_size"):
                if name in metrics:
                    row[name] = float(metrics[name][-1])
            if not np.isfinite(h_err):
                row["diverged"] = True
                yield row
                return
            yield row
            if time_budget is not None and train_time > time_budget:
                return


def config_dict(cfg: QLConfig) -> dict:
    """JSON-serialisable dict of a :class:`QLConfig`."""
    return asdict(cfg)
