"""Experiments of gaussnewton: offline data sets, models, runner, records, plots and the CLI.

A separate distribution, ``gaussnewton-experiments`` (``pip install -e experiments``; RL needs
``pip install -e "experiments[rl]"``), so that ``pip install gaussnewton`` ships the library alone.
It uses the library through its public API only (``import gaussnewton as gn``). Register new
experiments, optimizers and data sets through :mod:`gaussnewton_experiments.registry`; run them with
the ``gaussnewton-experiments`` command (see docs/experiments.md).
"""
