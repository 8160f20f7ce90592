"""Reinforcement learning with Gauss-Newton TD steps (EXPERIMENTS §3).

- :mod:`.lqr`: COMPleib AC1 / BDT1, zero-order hold, discounted DARE, ``H*``, ``H_K``.
- :mod:`.qlearning`: LQR Q-function learning (policy evaluation + improvement) in ``lax.scan``.
- :mod:`.dqn`: DQN on gymnax CartPole-v1 / Acrobot-v1 (gymnax imported lazily, optional extra).
- :mod:`.register`: the CLI experiments ``lqr_ac1``, ``lqr_bdt1``, ``dqn_cartpole``,
  ``dqn_acrobot`` (imported here so that the registry's ``load_builtins`` finds them).
"""

from gaussnewton_experiments.rl import register as register  # noqa: F401  (registers)
