"""Summary table (Markdown + JSON) and plots (PNG) of an experiment's finished runs.

Per optimizer, over seeds (mean +- std): the final metric; the metric at the evaluation with the
best VALIDATION score (``val_metric`` of the row, measured on a validation part held out of the
training data; never a selection on the test set, which would flatter every method; "-" for
experiments without a validation part); the metric at a common wall-clock time (the shortest mean
training time among the optimizers, so methods compare at EQUAL time); time and steps to reach the
experiment's target, training steps per second (compilation and evaluation excluded) and the
evaluation time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "summarize",
    "at_best_validation",
    "summary_markdown",
    "summary_table",
    "plot_runs",
    "write_report",
]


def _metric(row: Mapping[str, Any], metric: str) -> float:
    v = row.get(metric, row.get("metric"))
    return float(v) if v is not None else math.nan


def _at_time(rows: Sequence[Mapping[str, Any]], metric: str, t: float) -> float:
    """Metric of the last evaluation whose training time is <= t."""
    val = math.nan
    for r in rows:
        if r["train_time"] <= t + 1e-12:
            val = _metric(r, metric)
    return val


def at_best_validation(rows: Sequence[Mapping[str, Any]], metric: str, higher: bool) -> float:
    """``metric`` of the evaluation whose ``val_metric`` is best (the first one on ties; non-finite
    validation scores never win); NaN when no row has a finite ``val_metric``.

    Example: rows with ``val_metric`` 0.5, 0.3, 0.4 (lower is better) select the second row's
    test metric, whatever the test metric of the others.
    """
    i = _best_validation_index(rows, higher)
    return math.nan if i is None else _metric(rows[i], metric)


def _best_validation_index(rows: Sequence[Mapping[str, Any]], higher: bool) -> int | None:
    best, index = None, None
    for i, r in enumerate(rows):
        v = r.get("val_metric")
        if v is None or not math.isfinite(float(v)):
            continue
        if best is None or (float(v) > best if higher else float(v) < best):
            best, index = float(v), i
    return index


def _reach(rows, metric, target, higher):
    for r in rows:
        v = _metric(r, metric)
        if math.isfinite(v) and (v >= target if higher else v <= target):
            return r["train_time"], r["step"]
    return None


def _ms(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std())


def summarize(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    metric: str,
    higher_is_better: bool,
    target: float | None,
) -> list[dict[str, Any]]:
    """Per-optimizer statistics from ``{optimizer: [rows of seed 0, rows of seed 1, ...]}``."""
    runs = {o: [r for r in rs if r] for o, rs in runs.items()}
    runs = {o: rs for o, rs in runs.items() if rs}
    if not runs:
        return []
    t_common = min(
        float(np.mean([rs[-1]["train_time"] for rs in seeds])) for seeds in runs.values()
    )
    out = []
    for opt, seeds in runs.items():
        finals = [_metric(rs[-1], metric) for rs in seeds]
        diverged = sum(not math.isfinite(v) for v in finals)
        selected = [at_best_validation(rs, metric, higher_is_better) for rs in seeds]
        at_t = [_at_time(rs, metric, t_common) for rs in seeds]
        times = [rs[-1]["train_time"] for rs in seeds]
        steps = [rs[-1]["step"] for rs in seeds]
        sps = [s / t if t > 0 else math.nan for s, t in zip(steps, times, strict=True)]
        reached = [_reach(rs, metric, target, higher_is_better) for rs in seeds] if target else []
        hit = [r for r in reached if r is not None]
        out.append(
            {
                "optimizer": opt,
                "seeds": len(seeds),
                "diverged": diverged,
                "final": _ms(finals),
                "at_best_val": _ms(selected),
                "at_common_time": _ms(at_t),
                "common_time": t_common,
                "train_time": _ms(times),
                "steps": int(np.max(steps)),
                "steps_per_s": _ms(sps),
                "eval_time": _ms([rs[-1].get("eval_time", math.nan) for rs in seeds]),
                "target": target,
                "reached": f"{len(hit)}/{len(seeds)}" if target is not None else "",
                "time_to_target": _ms([h[0] for h in hit]) if hit else (math.nan, math.nan),
                "steps_to_target": _ms([h[1] for h in hit]) if hit else (math.nan, math.nan),
                "hparams": seeds[0][0].get("_hparams", {}),
            }
        )
    return out


def _fmt(ms: tuple[float, float], digits: int = 4) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "-"
    return f"{m:.{digits}g} ± {s:.2g}"


def _num(x: float, digits: int) -> str:
    """``x`` with ``digits`` significant digits in few characters: no exponent from 1 to 10^6
    (``1.2e+03`` -> ``1234``), a short one otherwise (``1.23e-05`` -> ``1.23e-5``)."""
    text = f"{x:.{digits}g}"
    if "e" in text:
        if 1 <= abs(x) < 1e6:
            return f"{x:.0f}"
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _short(ms: tuple[float, float], digits: int = 3) -> str:
    """Compact ``mean±std`` for the terminal (``0.543±0.01``, std to one significant digit)."""
    m, s = ms
    if not math.isfinite(m):
        return "-"
    return f"{_num(m, digits)}±{_num(s, 1)}"


TERMINAL_WIDTH = 80


def summary_table(summary: Sequence[Mapping[str, Any]], metric: str, higher: bool):
    """The summary as a ``rich.table.Table`` that reads in an 80-column terminal.

    Compact cells (3 significant digits, ``mean±std``), no vertical rules and cells that never wrap;
    the full table (more digits, steps and time to target, train / eval seconds, hyper-parameters)
    is in ``summary.md`` (:func:`summary_markdown`). Columns: optimizer, seeds (diverged), final
    metric, metric at the best validation score (``@best val``), metric at the common wall-clock
    time, time to target (reached/seeds), training steps per second (``it/s``).
    """
    from rich import box
    from rich.table import Table

    arrow = "↑" if higher else "↓"
    t = Table(
        title=f"{metric} {arrow} (mean±std over seeds; all columns: summary.md)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),  # with the blank column rule: 2 spaces between columns
    )
    common = summary[0]["common_time"] if summary else math.nan
    target = summary[0].get("target") if summary else None
    heads = ("optimizer", "seeds", "final", "@best val", f"@{_num(common, 3)} s",
             f"to {_num(target, 3)}" if target is not None else "to target", "it/s")  # fmt: skip
    for i, col in enumerate(heads):
        t.add_column(col, no_wrap=True, justify="left" if i == 0 else "right")
    for r in summary:
        if math.isfinite(r["time_to_target"][0]):
            reach = f"{_num(r['time_to_target'][0], 2)} s {r['reached']}"
        else:
            reach = f"- {r['reached']}" if r["reached"] else "-"
        t.add_row(
            r["optimizer"],
            f"{r['seeds']} ({r['diverged']})",
            _short(r["final"]),
            _short(r["at_best_val"]),
            _short(r["at_common_time"]),
            reach,
            _num(r["steps_per_s"][0], 2) if math.isfinite(r["steps_per_s"][0]) else "-",
        )
    return t


def summary_markdown(summary: Sequence[Mapping[str, Any]], metric: str, higher: bool) -> str:
    """The Markdown table of :func:`summarize`'s output."""
    if not summary:
        return "(no finished runs)\n"
    t = summary[0]["common_time"]
    target = summary[0]["target"]
    arrow = "↑" if higher else "↓"
    head = (
        f"| optimizer | seeds (diverged) | final {metric} {arrow} | {metric} at best validation "
        f"| {metric} @ {t:.3g} s "
        f"| time to {target} (s) | steps to {target} | reached | steps/s | train s | eval s "
        "| hyper-parameters |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in summary:
        hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items())
        lines.append(
            f"| {r['optimizer']} | {r['seeds']} ({r['diverged']}) | {_fmt(r['final'])} "
            f"| {_fmt(r['at_best_val'])} "
            f"| {_fmt(r['at_common_time'])} | {_fmt(r['time_to_target'], 3)} "
            f"| {_fmt(r['steps_to_target'], 3)} | {r['reached']} | {_fmt(r['steps_per_s'], 4)} "
            f"| {_fmt(r['train_time'], 3)} | {_fmt(r['eval_time'], 2)} | {hp} |"
        )
    return head + "\n".join(lines) + "\n"


def _band(ax, x, ys, label, color):
    m, s = ys.mean(0), ys.std(0)
    ax.plot(x, m, label=label, color=color, lw=1.6)
    ax.fill_between(x, m - s, m + s, color=color, alpha=0.2, lw=0)


def plot_runs(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    metric: str,
    path: str | Path,
    *,
    title: str = "",
    x_label: str = "training step",
    higher_is_better: bool = False,
    dpi: int = 110,
) -> Path:
    """PNG with three panels: metric vs training wall-clock, metric vs step, training loss vs step
    (mean +- std over seeds per optimizer). Dots on the metric-vs-step panel mark the evaluation
    each seed's summary selects (best validation score), when the rows have ``val_metric``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_vals, all_losses = [], []
    for i, (opt, seeds) in enumerate(runs.items()):
        seeds = [rs for rs in seeds if rs]
        if not seeds:
            continue
        n = min(len(rs) for rs in seeds)
        col = colors[i % len(colors)]
        ys = np.array([[_metric(r, metric) for r in rs[:n]] for rs in seeds], float)
        ts = np.array([[r["train_time"] for r in rs[:n]] for rs in seeds], float).mean(0)
        st = np.array([r["step"] for r in seeds[0][:n]], float)
        label = f"{opt} (n={len(seeds)})"
        pos = ts > 0  # log time axis: the step-0 evaluation (t = 0) is left out
        _band(axes[0], ts[pos], ys[:, pos], label, col)
        _band(axes[1], st, ys, label, col)
        picks = [(rs[i]["step"], _metric(rs[i], metric)) for rs in seeds
                 if (i := _best_validation_index(rs, higher_is_better)) is not None]  # fmt: skip
        if picks:  # the evaluations the summary selects (best validation score), one per seed
            px, py = np.asarray(picks, float).T
            axes[1].scatter(px, py, color=col, marker="o", s=18, zorder=3, edgecolors="k", lw=0.5)
        all_vals.append(ys[np.isfinite(ys)])
        tl = np.array([[r.get("train_loss", math.nan) for r in rs[1:n]] for rs in seeds], float)
        if tl.size and np.isfinite(tl).any():
            _band(axes[2], st[1:], tl, label, col)
            all_losses.append(tl[np.isfinite(tl) & (tl > 0)])
    if all_vals:
        v = np.concatenate(all_vals)
        if v.size:
            # robust limits: the metric is spiky on data with outliers (one far test point)
            if higher_is_better:
                lo, hi = np.percentile(v, 5), v.max()
                pad = 0.05 * (hi - lo + 1e-12)
                lo, hi = lo - pad, hi + pad
            else:
                lo, hi = 0.97 * v.min(), min(np.percentile(v, 99), 10.0 * v.min())
            for ax in axes[:2]:
                if not higher_is_better and v.min() > 0:
                    ax.set_yscale("log")
                ax.set_ylim(lo, hi)
    if all_losses:
        tl = np.concatenate(all_losses)
        if tl.size:
            axes[2].set_ylim(0.8 * tl.min(), 1.25 * np.percentile(tl, 98))
    axes[0].set_xlabel("training wall-clock (s, log; compilation and evaluation excluded)")
    axes[0].set_xscale("log")
    axes[1].set_xlabel(x_label)
    axes[2].set_xlabel(x_label)
    for ax in axes[:2]:
        ax.set_ylabel(metric)
    axes[2].set_ylabel("training loss (mean over the last steps)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path


def write_report(result, spec, records, *, plots: bool = True) -> None:
    """Fill ``result`` with the summary of its test runs; write summary.md / .json and the PNG."""
    configs = records.configs()
    keys = {k for ks in result.test_keys.values() for k in ks}
    rows = records.rows(keys)
    runs = {}
    for opt, ks in result.test_keys.items():
        seeds = []
        for k in ks:
            rs = rows.get(k, [])
            if rs:
                rs = [dict(r) for r in rs]
                rs[0]["_hparams"] = configs.get(k, {}).get("hparams", {})
                seeds.append(rs)
        runs[opt] = seeds
    summary = summarize(runs, spec.metric, spec.higher_is_better, spec.target)
    result.summary = summary
    result.summary_markdown = summary_markdown(summary, spec.metric, spec.higher_is_better)
    out = Path(result.out)
    (out / "summary.md").write_text(
        f"# {result.experiment}\n\n{spec.description}\n\n{result.summary_markdown}",
        encoding="utf-8",
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "experiment": result.experiment,
                "metric": spec.metric,
                "winners": result.winners,
                "test_keys": result.test_keys,  # the runs of this command (results pages)
                "summary": summary,
                "errors": result.errors,
            },
            indent=1,
            default=str,
        ).replace("NaN", "null"),
        encoding="utf-8",
    )
    if plots and any(runs.values()):
        result.plots.append(
            plot_runs(
                runs,
                spec.metric,
                out / f"{result.experiment}.png",
                title=f"{result.experiment}: {', '.join(o for o, s in runs.items() if s)}",
                x_label=spec.x_label,
                higher_is_better=spec.higher_is_better,
            )
        )
