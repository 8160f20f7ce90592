"""Experiments of gaussnewton: offline data sets, models, runner, records, plots and the CLI.

Optional extra: ``pip install gaussnewton[experiments]``. Register new experiments, optimizers and
data sets through :mod:`gaussnewton.experiments.registry`.
"""
