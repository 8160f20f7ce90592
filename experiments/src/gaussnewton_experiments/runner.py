"""Run an experiment: tuning, seeds, incremental records with resume, summary and plots.

:func:`run_experiment` is what ``gaussnewton-experiments run`` calls; it works for every registered experiment
(supervised or RL) because it only talks to ``ExperimentSpec.run``.
"""

from __future__ import annotations

import math
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gaussnewton_experiments.records import Records, versions
from gaussnewton_experiments.registry import (
    ExperimentSpec,
    RunConfig,
    get_experiment,
    get_optimizer,
)

__all__ = [
    "run_experiment",
    "ExperimentResult",
    "Reporter",
    "select_winner",
    "check_positive",
    "check_seeds",
]


class Reporter(Protocol):
    """Progress callbacks (the CLI draws a rich progress bar with them)."""

    def plan(self, total: float, unit: str) -> None:
        """``total`` work in ``unit``: "steps", or "s" (training seconds) under a time budget."""

    def start(self, label: str, size: float) -> None:
        """A run of ``size`` units begins."""

    def row(self, label: str, row: Mapping[str, Any]) -> None: ...

    def finish(self, label: str, skipped: bool) -> None: ...

    def log(self, message: str) -> None: ...


class _Silent:
    def plan(self, total, unit):
        pass

    def start(self, label, size):
        pass

    def row(self, label, row):
        pass

    def finish(self, label, skipped):
        pass

    def log(self, message):
        pass


@dataclass
class ExperimentResult:
    """What a call of :func:`run_experiment` produced."""

    experiment: str
    out: Path
    records: Path
    test_keys: dict[str, list[str]] = field(default_factory=dict)  # optimizer -> run keys
    winners: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    summary_markdown: str = ""
    summary: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def _score(rows: Sequence[Mapping[str, Any]], metric: str, higher: bool, last: int = 5) -> float:
    """Tuning score: MEDIAN of the metric over the last ``last`` evaluations (robust to a single
    spike at the final evaluation); non-finite values count as the worst; no rows -> worst."""
    worst = -math.inf if higher else math.inf
    vals = []
    for r in list(rows)[-last:]:
        v = r.get("metric", r.get(metric))
        vals.append(float(v) if v is not None and math.isfinite(float(v)) else worst)
    return float(np.median(vals)) if vals else worst


def check_positive(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_seeds(seeds: int | Sequence[int]) -> list[int]:
    """Seeds 0..K-1 for a count K >= 1, or the given distinct non-negative integer seeds."""
    if isinstance(seeds, int | np.integer) and not isinstance(seeds, bool):
        return list(range(check_positive("seeds", seeds)))
    out = list(seeds)
    bad = [s for s in out if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0]
    if not out or bad:
        raise ValueError(
            f"seeds must be a count >= 1 or a non-empty list of integers >= 0, got {seeds!r}."
        )
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct (a repeated seed is the same run), got {out}.")
    return [int(s) for s in out]


def select_winner(
    candidates: Sequence[Mapping[str, Any]], scores: Sequence[float], higher_is_better: bool
) -> int:
    """Index of the best score (ties: the first candidate)."""
    best = 0
    for i, s in enumerate(scores):
        better = s > scores[best] if higher_is_better else s < scores[best]
        if better:
            best = i
    return best


def _check_devices(spec: ExperimentSpec, name: str, devices: Any) -> int:
    """``devices`` as an int; only supervised experiments run data-parallel."""
    devices = check_positive("devices", devices)
    if devices > 1:
        from gaussnewton_experiments.supervised import run_supervised

        if spec.run is not run_supervised:
            raise ValueError(
                f"devices={devices}: experiment {name!r} is not a supervised experiment; only "
                "those run data-parallel (use devices=1)."
            )
        from gaussnewton_experiments.devices import data_mesh

        data_mesh(devices)  # enough devices? (ValueError naming the fix otherwise)
    return devices


def _rows(spec: ExperimentSpec, cfg: RunConfig, devices: int):
    """``spec.run(cfg)``'s rows, trained on ``devices`` devices."""
    from gaussnewton_experiments.devices import use_devices

    with use_devices(devices):
        yield from spec.run(cfg)


def run_experiment(
    name: str,
    *,
    optimizers: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_every: int | None = None,
    time_budget: float | None = None,
    tune: bool = False,
    tune_steps: int | None = None,
    tune_seed: int = 0,
    hparams: Mapping[str, Mapping[str, Any]] | None = None,
    options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    reporter: Reporter | None = None,
    argv: Sequence[str] | None = None,
    devices: int = 1,
) -> ExperimentResult:
    """Run ``optimizers x seeds`` of experiment ``name`` (tuning each optimizer first if asked).

    Args:
        optimizers: registered optimizer names (default: the experiment's defaults).
        seeds: a count K (seeds 0..K-1) or explicit seeds.
        steps, batch_size, eval_every, time_budget: budget of each test run (defaults from spec;
            the first three must be positive integers, ``time_budget`` >= 0 s, 0: no limit).
        tune: select each optimizer's hyper-parameters from its grid on the validation split
            (``tune_steps`` steps, seed ``tune_seed``), then run the winner on the test split.
        hparams: ``{optimizer: {name: value}}`` overrides (``"*"`` applies to every optimizer);
            they are kept fixed during tuning.
        options: overrides of the experiment's ``options`` (only the names it knows,
            :meth:`ExperimentSpec.known_options`).
        out: output folder (default ``results/<name>``); holds ``records.jsonl``, the plots,
            ``summary.md`` and ``summary.json``.
        devices: run each supervised training data-parallel over this many devices (the batch
            sharded over a 1-D ``"data"`` mesh, the rest replicated; :mod:`.devices`); on CPU
            they must be requested before jax starts (:func:`.devices.request_devices`, the CLI's
            ``--devices``). Every batch size must be divisible by it. Recorded in the ``session``
            and ``start`` records; the run keys do not depend on it.

    Raises:
        ValueError: a budget out of range, bad seeds or an unknown option (before anything runs).
        KeyError: an unknown experiment or optimizer name.

    A run that raises is recorded (``"error"`` record) and listed in ``result.errors``; so is an
    optimizer whose tuning had no candidate with a finite score (it then has no test runs).
    """
    spec: ExperimentSpec = get_experiment(name)
    rep = reporter or _Silent()
    optimizers = list(optimizers or spec.default_optimizers)
    for o in optimizers:
        get_optimizer(o)  # fail early on an unknown name
    seed_list = check_seeds(spec.default_seeds if seeds is None else seeds)
    steps = check_positive("steps", spec.default_steps if steps is None else steps)
    tune_steps = check_positive("tune_steps", steps if tune_steps is None else tune_steps)
    explicit_batch = batch_size is not None
    batch_size = spec.default_batch_size if batch_size is None else batch_size
    if batch_size is not None:
        batch_size = check_positive("batch_size", batch_size)
    eval_every = check_positive(
        "eval_every", spec.default_eval_every if eval_every is None else eval_every
    )
    time_budget = time_budget if time_budget is not None else spec.default_time_budget
    if time_budget is not None and not (isinstance(time_budget, int | float) and time_budget >= 0):
        raise ValueError(
            f"time_budget must be a number of seconds >= 0 (0: no limit), got {time_budget!r}."
        )
    if time_budget is not None and time_budget == 0:
        time_budget = None  # --time-budget 0: no wall-clock limit, steps only
    known = spec.known_options()
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for experiment {name!r}; known: "
            f"{', '.join(sorted(known)) or '(none)'}."
        )
    opts = {**spec.options, **(options or {})}
    hparams = {k: dict(v) for k, v in (hparams or {}).items()}
    devices = _check_devices(spec, name, devices)
    out = Path(out or Path("results") / name)
    records = Records(out)
    records.append(
        {
            "type": "session",
            "experiment": name,
            "argv": list(argv or []),
            "versions": versions(),
            "devices": devices,
        }  # fmt: skip
    )
    result = ExperimentResult(experiment=name, out=out, records=records.path)
    done = records.done()
    if records.corrupt_lines:
        rep.log(
            f"[yellow]warning[/yellow] {records.path}: skipped corrupt line(s) "
            f"{records.corrupt_lines} (cut by a crash?); their runs are redone"
        )

    def exp_hparams(opt: str) -> dict[str, Any]:
        hp = dict(spec.default_hparams.get(opt, {}))
        if explicit_batch:  # an explicit --batch-size beats the experiment's per-optimizer one
            hp.pop("batch_size", None)
        return hp

    def base_hparams(opt: str) -> dict[str, Any]:
        return {
            **get_optimizer(opt).defaults,
            **exp_hparams(opt),
            **hparams.get("*", {}),
            **hparams.get(opt, {}),
        }

    def make_cfg(opt, seed, hp, split, n_steps):
        return RunConfig(
            experiment=name,
            optimizer=opt,
            seed=seed,
            steps=n_steps,
            batch_size=batch_size,
            eval_every=eval_every,
            time_budget=time_budget,
            split=split,
            hparams=hp,
            options=opts,
        )

    tune_split = "validation" if spec.supports_validation else "test"
    grids = {}
    total = 0
    for opt in optimizers:
        grid = [dict(g) for g in get_optimizer(opt).grid] if tune else []
        grids[opt] = grid
        if time_budget is not None:
            total += (len(grid) + len(seed_list)) * time_budget
        else:
            total += len(grid) * tune_steps + len(seed_list) * steps
    rep.plan(total, "s" if time_budget is not None else "steps")

    def size(cfg: RunConfig) -> float:
        return cfg.time_budget if cfg.time_budget is not None else cfg.steps

    def execute(cfg: RunConfig, label: str) -> list[dict[str, Any]] | None:
        key = cfg.key
        if key in done:
            rep.start(label, size(cfg))
            rep.finish(label, skipped=True)
            return records.rows({key}).get(key, [])
        attempt = uuid.uuid4().hex[:8]
        records.append(
            {
                "type": "start",
                "run": key,
                "attempt": attempt,
                "config": cfg.to_dict(),
                "label": label,
                "versions": versions(),
                "devices": devices,
            }  # fmt: skip
        )
        rep.start(label, size(cfg))
        rows, t0 = [], time.perf_counter()
        try:
            for row in _rows(spec, cfg, devices):
                row = dict(row)
                records.append(
                    {
                        "type": "eval",
                        "run": key,
                        "attempt": attempt,
                        "optimizer": cfg.optimizer,
                        "seed": cfg.seed,
                        "split": cfg.split,
                        **row,
                    }  # fmt: skip
                )
                rows.append({k: v for k, v in row.items() if k != "trace"})
                rep.row(label, row)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken optimizer must not stop the others
            msg = f"{label}: {type(exc).__name__}: {exc}"
            records.append(
                {
                    "type": "error",
                    "run": key,
                    "attempt": attempt,
                    "error": msg,
                    "traceback": traceback.format_exc(),
                }  # fmt: skip
            )
            result.errors.append(msg)
            rep.log(f"[red]error[/red] {msg}")
            rep.finish(label, skipped=False)
            return None
        final = rows[-1] if rows else {}
        records.append(
            {
                "type": "done",
                "run": key,
                "attempt": attempt,
                "config": cfg.to_dict(),
                "final": final,
                "seconds": time.perf_counter() - t0,
            }  # fmt: skip
        )
        done[key] = {"run": key}
        rep.finish(label, skipped=False)
        return rows

    if devices > 1:  # fail before anything runs on a batch that does not split evenly
        for opt in optimizers:
            for g in grids[opt] or [{}]:
                b = {**base_hparams(opt), **g}.get("batch_size", batch_size or 128)
                if int(b) % devices:
                    raise ValueError(
                        f"{opt}: batch_size={b} is not divisible by devices={devices}; pass a "
                        f"batch size that is a multiple of {devices} (--batch-size)."
                    )

    for opt in optimizers:
        hp = base_hparams(opt)
        if grids[opt]:
            candidates = [{**get_optimizer(opt).defaults, **exp_hparams(opt),
                           **g, **hparams.get("*", {}), **hparams.get(opt, {})}
                          for g in grids[opt]]  # fmt: skip
            scores, outcomes = [], []
            for i, cand in enumerate(candidates):
                cfg = make_cfg(opt, tune_seed, cand, tune_split, tune_steps)
                rows = execute(cfg, f"tune {opt} [{i + 1}/{len(candidates)}]")
                outcomes.append(rows)
                scores.append(_score(rows or [], spec.metric, spec.higher_is_better))
            if not any(math.isfinite(v) for v in scores):
                failed = sum(r is None for r in outcomes)
                msg = (
                    f"tune {opt}: no candidate ran ({failed} of {len(candidates)} failed, "
                    f"{len(candidates) - failed} without a finite {tune_split} {spec.metric}); "
                    f"{opt} is not run on the test split"
                )
                records.append(
                    {
                        "type": "tune",
                        "optimizer": opt,
                        "split": tune_split,
                        "steps": tune_steps,
                        "seed": tune_seed,
                        "metric": spec.metric,
                        "grid": candidates,
                        "scores": scores,
                        "winner": None,
                        "error": msg,
                    }  # fmt: skip
                )
                result.errors.append(msg)
                rep.log(f"[red]error[/red] {msg}")
                result.test_keys[opt] = []
                continue
            best = select_winner(candidates, scores, spec.higher_is_better)
            hp = candidates[best]
            result.winners[opt] = hp
            records.append(
                {
                    "type": "tune",
                    "optimizer": opt,
                    "split": tune_split,
                    "steps": tune_steps,
                    "seed": tune_seed,
                    "metric": spec.metric,
                    "grid": candidates,
                    "scores": scores,
                    "winner": hp,
                }  # fmt: skip
            )
            rep.log(
                f"tuned {opt}: {hp} ({tune_split} {spec.metric}, median of the last 5 "
                f"evaluations: {scores[best]:.4g})"
            )
        keys = []
        for seed in seed_list:
            cfg = make_cfg(opt, seed, hp, "test", steps)
            if execute(cfg, f"{opt} seed {seed}") is not None:
                keys.append(cfg.key)
        result.test_keys[opt] = keys

    from gaussnewton_experiments.report import write_report

    write_report(result, spec, records, plots=plots)
    return result
