"""The ``gaussnewton-experiments`` command: ``list``, ``run EXPERIMENT`` and ``results``.

Bad arguments (a budget <= 0, bad seeds, an unwritable ``--out``, an unknown ``--option`` name)
end with a one-line message and exit status 2, before anything runs; failed runs, or a tuning in
which no candidate ran, end with status 1.

Examples::

    gaussnewton-experiments run california_housing                 # the main job (EGN vs Adam vs SGD)
    gaussnewton-experiments run california_housing --optimizers egn,adam --steps 300 --seeds 1 --out /tmp/ch
    gaussnewton-experiments run diamonds --tune --seeds 3           # tune on validation, report on test
    gaussnewton-experiments run california_housing --set egn.damping=0.01 --set batch_size=64
    gaussnewton-experiments run digits --devices 2  # data-parallel over 2 (forced CPU) devices
    gaussnewton-experiments results                 # run (resume) the results plan, regenerate docs
    gaussnewton-experiments results --no-run        # regenerate docs/results*.md and the README
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "positive_int", "seconds", "seed_list"]


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["egn.damping=0.01", "batch_size=64"]`` -> ``{"egn": {"damping": 0.01}, "*": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        opt, _, key = name.rpartition(".")
        if not sep or not key:
            raise ValueError(f"--set expects NAME=VALUE or OPTIMIZER.NAME=VALUE, got {item!r}.")
        out.setdefault(opt or "*", {})[key] = _value(value)
    return out


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["model='cnn'"]`` -> ``{"model": "cnn"}`` (values are Python literals, else strings)."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--option expects NAME=VALUE, got {item!r}.")
        out[k] = _value(v)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """argparse type: distinct comma-separated integers >= 0, e.g. ``0,3,7``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 0,3,7, got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 0,3,7, got {text!r}"
        )
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def _check_out(out: str) -> str | None:
    """Why ``out`` cannot hold the records (None when it can; the folder is created)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"--out {out!r} is a file, not a folder; pass a folder for records and plots"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out!r}: cannot create the folder ({exc.strerror or exc})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"--out {out!r}: the folder is not writable"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    p = argparse.ArgumentParser(
        prog="gaussnewton-experiments",
        description="Exact Gauss-Newton (EGN) experiments: offline data, EGN vs Adam vs SGD.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list experiments, optimizers and data sets")
    r = sub.add_parser("run", help="run an experiment (see `gaussnewton-experiments list`)")
    r.add_argument("experiment")
    r.add_argument("--optimizers", help="comma-separated optimizer names (default: experiment's)")
    r.add_argument("--steps", type=positive_int, help="training steps per run (>= 1)")
    r.add_argument("--seeds", type=positive_int, help="number of seeds (0..K-1)")
    r.add_argument(
        "--seed-list", type=seed_list, help="explicit comma-separated seeds (overrides --seeds)"
    )
    r.add_argument("--out", help="output folder (default results/<experiment>)")
    r.add_argument("--batch-size", type=positive_int, help="mini-batch size (>= 1)")
    r.add_argument("--eval-every", type=positive_int, help="evaluate every N steps (>= 1)")
    r.add_argument(
        "--time-budget", type=seconds, help="training seconds per run (stops early); 0: none"
    )
    r.add_argument("--tune", action="store_true", help="tune each optimizer on validation first")
    r.add_argument(
        "--tune-steps", type=positive_int, help="steps of each tuning run (default --steps)"
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[OPT.]NAME=VALUE",
        help="hyper-parameter override, e.g. egn.damping=0.01 or learning_rate=0.01 (all)",
    )
    r.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="experiment option override, e.g. model='cnn'",
    )
    r.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="train data-parallel over N devices (the batch sharded, the rest replicated; on CPU "
        "N forced host devices); supervised experiments; batch sizes divisible by N",
    )
    r.add_argument("--no-plot", action="store_true", help="skip the PNG")
    r.add_argument("--quiet", action="store_true", help="no progress bar, only the final table")
    g = sub.add_parser(
        "results",
        help="run (resume) the results plan and regenerate the results pages and README lines",
    )
    g.add_argument(
        "--records", default="results/pages", help="records root, one folder per section"
    )
    g.add_argument("--docs", default="docs", help="folder of results.md / results_rl.md")
    g.add_argument("--readme", default="README.md", help="README with the results block")
    g.add_argument("--no-readme", action="store_true", help="leave the README alone")
    g.add_argument("--only", help="comma-separated section names (default: all)")
    g.add_argument("--no-run", action="store_true", help="render only, from existing records")
    g.add_argument("--no-figures", action="store_true", help="no PNGs under DOCS/figures")
    return p


def _cmd_list() -> int:
    from rich.console import Console
    from rich.table import Table

    from gaussnewton_experiments.registry import list_datasets, list_experiments, list_optimizers

    console = Console()
    t = Table(title="experiments (gaussnewton-experiments run NAME)")
    for col in ("name", "metric", "defaults", "description"):
        t.add_column(col)
    for name, spec in list_experiments().items():
        budget = (
            f"{spec.default_time_budget:g} s"
            if spec.default_time_budget
            else f"{spec.default_steps} steps"
        )
        d = f"{','.join(spec.default_optimizers)}; {budget} x {spec.default_seeds} seeds"
        t.add_row(name, spec.metric, d, spec.description)
    console.print(t)
    t = Table(title="optimizers (--optimizers a,b,c)")
    for col in ("name", "defaults", "grid size", "description"):
        t.add_column(col)
    for name, spec in list_optimizers().items():
        t.add_row(name, str(dict(spec.defaults)), str(len(spec.grid)), spec.description)
    console.print(t)
    t = Table(title="data sets")
    t.add_column("name")
    t.add_column("description")
    for name, spec in list_datasets().items():
        t.add_row(name, spec.description)
    console.print(t)
    return 0


class _RichReporter:
    """Progress bar over all planned training steps, one line per finished run."""

    def __init__(self, console, quiet: bool):
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[metric]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        self.task = None
        self.done_before = 0.0
        self.run_size = 0.0
        self.current = 0.0
        self.unit = "steps"

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def plan(self, total, unit):
        self.unit = unit
        self.task = self.progress.add_task("starting", total=total, metric="")

    def start(self, label, size):
        self.run_size, self.current = size, 0
        self.progress.update(self.task, description=label)

    def row(self, label, row):
        done = float(row.get("train_time", 0.0)) if self.unit == "s" else int(row.get("step", 0))
        self.current = min(done, self.run_size)
        metric = next((f"{k}={row[k]:.4g}" for k in row if k.startswith(("test_", "val_"))
                       and not k.endswith("loss") and row[k] is not None), "")  # fmt: skip
        self.progress.update(self.task, completed=self.done_before + self.current, metric=metric)

    def finish(self, label, skipped):
        self.done_before += self.run_size
        self.progress.update(self.task, completed=self.done_before)
        if not self.quiet:
            self.progress.console.print(f"  {'skipped (done)' if skipped else 'finished'}: {label}")

    def log(self, message):
        self.progress.console.print(message)


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from rich.console import Console

    from gaussnewton_experiments.registry import get_experiment
    from gaussnewton_experiments.report import summary_table
    from gaussnewton_experiments.runner import run_experiment

    console = Console()
    try:
        spec = get_experiment(args.experiment)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        return 2
    seeds: Any = args.seed_list if args.seed_list else args.seeds
    hparams, options = args.hparams, args.options  # an unknown option name: ValueError below
    with _RichReporter(console, args.quiet) as rep:
        try:
            res = run_experiment(
                args.experiment,
                optimizers=[o for o in args.optimizers.split(",") if o]
                if args.optimizers
                else None,
                seeds=seeds,
                steps=args.steps,
                batch_size=args.batch_size,
                eval_every=args.eval_every,
                time_budget=args.time_budget,
                tune=args.tune,
                tune_steps=args.tune_steps,
                hparams=hparams,
                options=options,
                out=args.out,
                plots=not args.no_plot,
                reporter=rep,
                argv=list(argv),
                devices=args.devices,
            )
        except (KeyError, ValueError) as exc:
            console.print(f"[red]error:[/red] {exc.args[0] if exc.args else exc}")
            return 2
    if res.summary:
        spec = get_experiment(args.experiment)
        console.print(summary_table(res.summary, spec.metric, spec.higher_is_better))
    else:
        console.print("(no finished runs)")
    console.print(f"records: {res.records}")
    for p in res.plots:
        console.print(f"plot:    {p}")
    console.print(f"summary: {res.out / 'summary.md'}")
    if res.errors:
        console.print(
            f"[red]{len(res.errors)} error(s)[/red] (see records): " + "; ".join(res.errors)
        )
        return 1
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from gaussnewton_experiments.results import SECTIONS, regenerate, run_sections, select

    try:
        sections = select(SECTIONS, [o for o in (args.only or "").split(",") if o])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = {}
    if not args.no_run:
        failed = {k: v for k, v in run_sections(sections, args.records).items() if v}
    written = regenerate(
        sections,
        args.records,
        args.docs,
        readme=None if args.no_readme else args.readme,
        figures=not args.no_figures,
        all_sections=SECTIONS,
    )
    for path in written:
        print(f"wrote {path}")
    if failed:
        print(f"failed sections (exit status): {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gaussnewton-experiments`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # type and range errors: message + exit status 2
    if args.command == "run":
        try:
            args.hparams, args.options = _parse_sets(args.set), _parse_options(args.option)
        except ValueError as exc:
            parser.error(str(exc))
        if args.out is not None and (why := _check_out(args.out)):
            parser.error(why)
        if args.devices > 1:  # before anything starts jax's backend
            from gaussnewton_experiments.devices import request_devices

            try:
                request_devices(args.devices)
            except RuntimeError as exc:
                parser.error(str(exc))
    from gaussnewton_experiments._blas import limit_blas_threads

    limit_blas_threads()  # LAPACK threads would compete with XLA's (see _blas)
    if args.command == "list":
        return _cmd_list()
    if args.command == "results":
        return _cmd_results(args)
    return _cmd_run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
