"""Registers the RL experiments with the ``gaussnewton`` CLI (see ``experiments.registry``).

``lqr_ac1`` / ``lqr_bdt1``: metric ``h_error_rel`` = ‖H* − H_t‖_F / ‖H* − H_0‖_F (lower is
better, target 0.05). ``dqn_cartpole`` / ``dqn_acrobot``: metric ``return`` = mean greedy return
over 100 evaluation episodes (higher is better). Experiment-specific settings go through
``RunConfig.options`` (fields of :class:`~.qlearning.QLConfig` / :class:`~.dqn.DQNConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax

from gaussnewton.experiments.registry import (
    ExperimentSpec,
    RunConfig,
    get_optimizer,
    register_experiment,
)

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
    from gaussnewton.experiments.rl.lqr import make_system
    from gaussnewton.experiments.rl.qlearning import DEFAULT_CONFIGS, LQRLearner, QLConfig

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
    from gaussnewton.experiments.rl.dqn import DEFAULT_DQN_CONFIGS, DQNConfig, DQNLearner

    options = dict(cfg.options)
    env_name = options.get("env", "CartPole-v1")
    dcfg = _split_options(options, DQNConfig, DEFAULT_DQN_CONFIGS.get(env_name, DQNConfig()))
    if cfg.batch_size is not None:
        dcfg = dataclasses.replace(dcfg, batch_size=int(cfg.batch_size))
    learner = DQNLearner(env_name, lambda model_fn: _build_optimizer(cfg, model_fn), dcfg)
    yield from learner.iterate(
        jax.random.key(cfg.seed), cfg.steps, cfg.eval_every, time_budget=cfg.time_budget
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
