"""Registers the RL experiments with the ``gaussnewton-experiments`` CLI (see ``gaussnewton_experiments.registry``).

``lqr_ac1`` / ``lqr_bdt1``: metric ``h_error_rel`` = ‖H* − H_t‖_F / ‖H* − H_0‖_F (lower is
better, target 0.05). ``dqn_cartpole`` / ``dqn_acrobot``: metric ``return`` = mean greedy return
over 100 evaluation episodes (higher is better). ``dqn_freeway``: MinAtar Freeway with the
paper's small CNN Q-network (greedy return over 8 episodes of 2 500 steps). Experiment-specific settings go through
``RunConfig.options`` (fields of :class:`~.qlearning.QLConfig` / :class:`~.dqn.DQNConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax

from gaussnewton_experiments.optimizers import egn_factory
from gaussnewton_experiments.registry import (
    ExperimentSpec,
    RunConfig,
    get_optimizer,
    register_experiment,
    register_optimizer,
)
from gaussnewton_experiments.rl.dqn import DQNConfig
from gaussnewton_experiments.rl.qlearning import QLConfig

__all__ = ["run_lqr", "run_dqn"]


def _build_optimizer(cfg: RunConfig, model_fn):
    return get_optimizer(cfg.optimizer).build(model_fn, "squared_error", dict(cfg.hparams))


def _split_options(options, config_cls, defaults):
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - names - {"system", "env"})
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for {config_cls.__name__}; known: {sorted(names)}."
        )
    return dataclasses.replace(defaults, **{k: v for k, v in options.items() if k in names})


def run_lqr(cfg: RunConfig) -> Iterator[dict]:
    """One LQR Q-learning run (optimizer, seed, hyper-parameters) yielding ``h_error`` rows."""
    from gaussnewton_experiments.rl.lqr import make_system
    from gaussnewton_experiments.rl.qlearning import DEFAULT_CONFIGS, LQRLearner

    options = dict(cfg.options)
    system = make_system(options.get("system", "AC1"))
    qcfg = _split_options(options, QLConfig, DEFAULT_CONFIGS.get(system.name, QLConfig()))
    if cfg.batch_size is not None:
        qcfg = dataclasses.replace(qcfg, batch_size=int(cfg.batch_size))
    opt = _build_optimizer(cfg, LQRLearner.model_fn)
    learner = LQRLearner(system, opt, qcfg)
    yield from learner.iterate(
        jax.random.key(cfg.seed), cfg.steps, cfg.eval_every, time_budget=cfg.time_budget
    )


def run_dqn(cfg: RunConfig) -> Iterator[dict]:
    """One DQN run yielding greedy-evaluation ``return`` rows against environment steps."""
    from gaussnewton_experiments.rl.dqn import DEFAULT_DQN_CONFIGS, DQNLearner

    options = dict(cfg.options)
    env_name = options.get("env", "CartPole-v1")
    dcfg = _split_options(options, DQNConfig, DEFAULT_DQN_CONFIGS.get(env_name, DQNConfig()))
    if cfg.batch_size is not None:
        dcfg = dataclasses.replace(dcfg, batch_size=int(cfg.batch_size))
    learner = DQNLearner(env_name, _build_optimizer(cfg, DQNLearner.model_fn), dcfg)
    yield from learner.iterate(
        jax.random.key(cfg.seed), cfg.steps, cfg.eval_every, time_budget=cfg.time_budget
    )


# EGN preset for the DQN TD regression: a fixed, short step with strong constant damping. A full
# Levenberg-Marquardt step (lr 1, small λ) fits each mini-batch of bootstrapped targets exactly and
# makes DQN oscillate; lr 0.1 / λ 1 solved CartPole-v1 (see docs/results_rl.md).
register_optimizer(
    "egn-dqn",
    egn_factory(damping_policy="constant", line_search=None),
    defaults={"learning_rate": 0.1, "damping": 1.0},
    grid=[{"learning_rate": lr, "damping": lam} for lr in (0.3, 0.1, 0.03) for lam in (0.1, 1.0)],
    description="EGN for DQN TD steps: fixed step 0.1, constant damping 1 (no line search)",
)

_LQR_COMMON = dict(
    metric="h_error_rel",
    higher_is_better=False,
    target=0.05,
    default_optimizers=("egn", "adam", "sgd"),
    default_seeds=3,
    default_eval_every=50,
    x_label="training step",
    supports_validation=False,
    option_keys=("system", *(f.name for f in dataclasses.fields(QLConfig))),
)

register_experiment(
    "lqr_ac1",
    ExperimentSpec(
        run=run_lqr,
        description="LQR Q-function learning on COMPleib AC1 (n_x=5, n_u=3): ||H*-H_t||_F",
        default_steps=1000,
        options={"system": "AC1"},
        extra={"system": "AC1", "dt": 0.1, "gamma": 0.99},
        **_LQR_COMMON,
    ),
)
register_experiment(
    "lqr_bdt1",
    ExperimentSpec(
        run=run_lqr,
        description="LQR Q-function learning on COMPleib BDT1 (n_x=11, n_u=3): ||H*-H_t||_F",
        default_steps=1500,
        options={"system": "BDT1"},
        extra={"system": "BDT1", "dt": 0.1, "gamma": 0.99},
        **_LQR_COMMON,
    ),
)

_DQN_COMMON = dict(
    metric="return",
    higher_is_better=True,
    default_optimizers=("egn-dqn", "adam"),
    default_seeds=5,
    x_label="environment step",
    supports_validation=False,
    option_keys=("env", *(f.name for f in dataclasses.fields(DQNConfig))),
)

register_experiment(
    "dqn_cartpole",
    ExperimentSpec(
        run=run_dqn,
        description="DQN on gymnax CartPole-v1 (TD step by EGN or Adam): greedy return",
        target=475.0,
        default_steps=200_000,
        default_eval_every=20_000,
        options={"env": "CartPole-v1"},
        extra={"env": "CartPole-v1", "eval_episodes": 100},
        **_DQN_COMMON,
    ),
)
register_experiment(
    "dqn_acrobot",
    ExperimentSpec(
        run=run_dqn,
        description="DQN on gymnax Acrobot-v1 (TD step by EGN or Adam): greedy return",
        target=-100.0,
        default_steps=100_000,
        default_eval_every=10_000,
        options={"env": "Acrobot-v1"},
        extra={"env": "Acrobot-v1", "eval_episodes": 100},
        **_DQN_COMMON,
    ),
)
register_experiment(
    "dqn_freeway",
    ExperimentSpec(
        run=run_dqn,
        description="DQN on gymnax MinAtar Freeway (CNN Q-network; TD step by EGN or Adam): "
        "greedy return",
        target=10.0,
        default_steps=100_000,
        default_eval_every=10_000,
        options={"env": "Freeway-MinAtar"},
        extra={"env": "Freeway-MinAtar", "eval_episodes": 8, "network": "cnn"},
        **{**_DQN_COMMON, "default_seeds": 2},
    ),
)
