"""Open registries of experiments, optimizers and data sets used by the ``gaussnewton-experiments`` CLI.

Everything the CLI can run is looked up here by name, so a new experiment, optimizer or data set
joins with ONE call and immediately gets the command line (``gaussnewton-experiments list`` / ``gaussnewton
run``), incremental JSON-lines records with resume, tuning, plots and the Markdown summary.

Experiments
-----------
``register_experiment(name, spec)`` with an :class:`ExperimentSpec`. Its one required piece is
``spec.run``, a callable

    run(cfg: RunConfig) -> Iterable[dict]

that trains ONE (optimizer, seed, hyper-parameters) combination and yields evaluation rows while it
goes (a generator is the natural shape). Each row is a flat dict of JSON-serialisable scalars with
at least

    "step":        int    training steps (or environment steps, see ``spec.x_label``) so far,
    "train_time":  float  seconds of the training loop so far, EXCLUDING compilation (warm up the
                          jitted step first) and EXCLUDING evaluation,
    spec.metric:   float  the primary metric (e.g. "test_rmse", "test_accuracy", "return",
                          "h_error"), evaluated on ``cfg.split`` ("test", or "validation" while
                          tuning; experiments without a validation notion may ignore it),

and optionally "eval_time" (seconds spent evaluating so far), "train_loss" and any other scalars
(step size, damping, ...). The runner writes every row as soon as it is yielded and marks the run
finished when the iterable is exhausted; finished runs are skipped when the command is re-run with
the same configuration (``RunConfig.key``). A run should stop early, cleanly, when
``cfg.time_budget`` (seconds of training time) is exceeded. Supervised experiments
(``gaussnewton_experiments.supervised``) and the RL ones (``gaussnewton_experiments.rl``) both plug
in through this callable with their own training loop.

Optimizers
----------
``register_optimizer(name, factory, defaults=..., grid=...)`` with

    factory(model_fn, loss, **hparams) -> obj with
        obj.init(params) -> state
        obj.step(params, state, x, y, key) -> (params, state, info)

``model_fn(params, x) -> (b, c)``, ``loss`` one of the library's loss names (or a
``gn.ConvexLoss``), ``step`` pure and jit-able, ``key`` a PRNG key (ignore it if unused) and
``info`` a dict (or NamedTuple) of scalar arrays, recorded where cheap (e.g. loss, step_size,
damping). ``defaults`` are the hyper-parameters used without ``--tune``; ``grid`` is the list of
hyper-parameter dicts tried by ``--tune`` (selected on the validation split). A hyper-parameter
named ``batch_size`` is not passed to the factory: it overrides the run's batch size. The methods
of ``gaussnewton`` (EGN variants, SGN, IGND, SQN, dual GN) each join with one call, e.g.::

    register_optimizer("sgn", lambda model_fn, loss, **hp: gn.sgn(model_fn, loss=loss, **hp),
                       defaults={"learning_rate": 1.0}, grid=[{"damping": 1e-4}, ...])

Data sets
---------
``register_dataset(name, loader, task=..., description=...)`` with ``loader(**kwargs) -> Dataset``
(see ``gaussnewton_experiments.datasets.Dataset``: train/test arrays, task, number of classes, target
scaling and provenance). ``task`` ("regression" or "classification") is the loader's declaration of
what its data sets are: supervised experiments take their metric (RMSE or accuracy) from it without
loading the data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ExperimentSpec",
    "OptimizerSpec",
    "DatasetSpec",
    "DATASET_TASKS",
    "RunConfig",
    "register_experiment",
    "register_optimizer",
    "register_dataset",
    "get_experiment",
    "get_optimizer",
    "get_dataset",
    "list_experiments",
    "list_optimizers",
    "list_datasets",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines ONE run: (experiment, optimizer, seed, hyper-parameters, budget).

    ``hparams`` are the optimizer's hyper-parameters (already merged with its defaults);
    ``options`` holds experiment-specific settings (JSON-serialisable). ``key`` identifies the run
    in the records: two configs with the same key are the same run and resume skips it.
    """

    experiment: str
    optimizer: str
    seed: int
    steps: int
    batch_size: int | None = None
    eval_every: int = 50
    time_budget: float | None = None
    split: str = "test"
    hparams: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the config."""
        d = asdict(self)
        d["hparams"] = dict(self.hparams)
        d["options"] = dict(self.options)
        return d

    @property
    def key(self) -> str:
        """Stable identifier of the run (hash of the config's JSON)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ExperimentSpec:
    """What an experiment must provide to run under the CLI (see the module docstring).

    Attributes:
        run: ``run(cfg: RunConfig) -> Iterable[dict]`` trains one configuration and yields rows.
        description: one line shown by ``gaussnewton-experiments list``.
        metric: key of the primary metric in the rows (plots, summary, tuning).
        higher_is_better: direction of ``metric`` (accuracy, return: True; RMSE: False).
        target: metric value whose first crossing defines "time to target" in the summary.
        default_optimizers / default_steps / default_seeds / default_batch_size /
        default_eval_every: what ``gaussnewton-experiments run NAME`` uses without flags.
        default_time_budget: default training-time budget per run (seconds) or None.
        x_label: what a "step" counts (for plots), e.g. "training step", "environment step".
        supports_validation: False when ``cfg.split`` has no meaning (then ``--tune`` selects on
            the same metric, and says so in the record).
        default_hparams: per-optimizer hyper-parameters of THIS experiment, ``{optimizer: {name:
            value}}``, applied over the optimizer's own defaults when not tuning (e.g. the
            winners of a ``--tune`` run; say which in ``description`` or the docs).
        options: default experiment-specific options put into ``RunConfig.options``.
        option_keys: further option names ``run`` understands (overridable with ``--option``
            although they have no default in ``options``); see :meth:`known_options`.
        extra: free-form metadata recorded with the run (data set name, model, ...).
    """

    run: Callable[[RunConfig], Iterable[dict]]
    description: str = ""
    metric: str = "test_rmse"
    higher_is_better: bool = False
    target: float | None = None
    default_optimizers: tuple[str, ...] = ("egn", "adam", "sgd")
    default_steps: int = 1000
    default_seeds: int = 3
    default_batch_size: int | None = None
    default_eval_every: int = 50
    default_time_budget: float | None = None
    x_label: str = "training step"
    supports_validation: bool = True
    default_hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    option_keys: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def known_options(self) -> frozenset[str]:
        """Names accepted in ``RunConfig.options`` overrides: ``options``' keys and
        ``option_keys`` (the runner refuses any other name, listing these)."""
        return frozenset(self.options) | frozenset(self.option_keys)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer the experiments can use (see the module docstring for ``factory``)."""

    factory: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    grid: tuple[Mapping[str, Any], ...] = ()
    description: str = ""

    def build(self, model_fn: Callable, loss: Any, hparams: Mapping[str, Any]) -> Any:
        """Instantiate with ``hparams`` (``batch_size`` removed: it belongs to the run)."""
        kwargs = {k: v for k, v in hparams.items() if k != "batch_size"}
        return self.factory(model_fn, loss, **kwargs)


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: ``loader(**kwargs) -> Dataset``, its task and a one-line description.

    ``task`` is ``"regression"`` or ``"classification"`` (every ``Dataset`` the loader returns has
    this ``task``); supervised experiments derive their metric and its direction from it.
    """

    loader: Callable[..., Any]
    task: str
    description: str = ""


_EXPERIMENTS: dict[str, ExperimentSpec] = {}
_OPTIMIZERS: dict[str, OptimizerSpec] = {}
_DATASETS: dict[str, DatasetSpec] = {}
_BUILTINS_LOADED = False


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
        raise ValueError(
            f"{kind} name must be a non-empty string without spaces or commas, got {name!r}."
        )


def register_experiment(name: str, spec: ExperimentSpec, *, overwrite: bool = False) -> None:
    """Register an experiment under ``name`` (``gaussnewton-experiments run NAME``)."""
    _check_name("experiment", name)
    if not isinstance(spec, ExperimentSpec):
        raise TypeError(f"spec must be an ExperimentSpec, got {type(spec).__name__}.")
    if name in _EXPERIMENTS and not overwrite:
        raise ValueError(f"experiment {name!r} is already registered; pass overwrite=True.")
    _EXPERIMENTS[name] = spec


def register_optimizer(
    name: str,
    factory: Callable[..., Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    grid: Iterable[Mapping[str, Any]] = (),
    description: str = "",
    overwrite: bool = False,
) -> None:
    """Register an optimizer ``factory(model_fn, loss, **hparams)`` under ``name``."""
    _check_name("optimizer", name)
    if not callable(factory):
        raise TypeError(f"factory for optimizer {name!r} must be callable, got {factory!r}.")
    if name in _OPTIMIZERS and not overwrite:
        raise ValueError(f"optimizer {name!r} is already registered; pass overwrite=True.")
    _OPTIMIZERS[name] = OptimizerSpec(
        factory=factory,
        defaults=dict(defaults or {}),
        grid=tuple(dict(g) for g in grid),
        description=description,
    )


DATASET_TASKS = ("regression", "classification")


def register_dataset(
    name: str,
    loader: Callable[..., Any],
    *,
    task: str,
    description: str = "",
    overwrite: bool = False,
) -> None:
    """Register a data set ``loader(**kwargs) -> Dataset`` of kind ``task`` under ``name``.

    Example::

        register_dataset("my_table", load_my_table, task="regression", description="...")
    """
    _check_name("data set", name)
    if task not in DATASET_TASKS:
        raise ValueError(
            f"task of data set {name!r} must be one of {DATASET_TASKS}, got {task!r}; declare "
            "what the loader returns (RMSE is reported for regression, accuracy otherwise)."
        )
    if name in _DATASETS and not overwrite:
        raise ValueError(f"data set {name!r} is already registered; pass overwrite=True.")
    _DATASETS[name] = DatasetSpec(loader=loader, task=task, description=description)


def load_builtins() -> None:
    """Import the modules that register the built-in entries (idempotent).

    Optional groups (e.g. RL, which needs extra packages) are skipped when their imports fail.
    """
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for mod in (
        "gaussnewton_experiments.datasets",
        "gaussnewton_experiments.optimizers",
        "gaussnewton_experiments.supervised",
    ):
        importlib.import_module(mod)
    try:
        importlib.import_module("gaussnewton_experiments.rl")
    except ImportError:  # optional extra (e.g. gymnax) not installed, or no RL package yet
        pass


def _lookup(table: Mapping[str, Any], kind: str, name: str) -> Any:
    load_builtins()
    if name not in table:
        known = ", ".join(sorted(table)) or "(none)"
        raise KeyError(
            f"unknown {kind} {name!r}; known: {known}. See `gaussnewton-experiments list`."
        )
    return table[name]


def get_experiment(name: str) -> ExperimentSpec:
    """The registered :class:`ExperimentSpec` called ``name``."""
    return _lookup(_EXPERIMENTS, "experiment", name)


def get_optimizer(name: str) -> OptimizerSpec:
    """The registered :class:`OptimizerSpec` called ``name``."""
    return _lookup(_OPTIMIZERS, "optimizer", name)


def get_dataset(name: str) -> DatasetSpec:
    """The registered :class:`DatasetSpec` called ``name``."""
    return _lookup(_DATASETS, "data set", name)


def list_experiments() -> dict[str, ExperimentSpec]:
    """All registered experiments, by name."""
    load_builtins()
    return dict(sorted(_EXPERIMENTS.items()))


def list_optimizers() -> dict[str, OptimizerSpec]:
    """All registered optimizers, by name."""
    load_builtins()
    return dict(sorted(_OPTIMIZERS.items()))


def list_datasets() -> dict[str, DatasetSpec]:
    """All registered data sets, by name."""
    load_builtins()
    return dict(sorted(_DATASETS.items()))
