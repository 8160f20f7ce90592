"""The results pages, regenerated from the records by ``gaussnewton-experiments results``.

:data:`SECTIONS` is the plan: each :class:`Section` names a registered experiment, the budget it is
run at (the arguments after ``gaussnewton-experiments run EXPERIMENT``), the page it is reported on
(``results.md`` or ``results_rl.md`` in the docs folder) and whether it has a line in the README.
The command

1. runs every section (:func:`run_sections`) into ``RECORDS/<section name>/`` through the ordinary
   ``run`` command, which RESUMES: finished runs in ``records.jsonl`` are skipped, so a second
   invocation with the same plan trains nothing; ``--no-run`` skips this step;
2. regenerates (:func:`regenerate`) every generated block of the pages and the README from those
   records alone: the summary table of :func:`~gaussnewton_experiments.report.summarize`, a stamp
   with the machine (CPU model, cores, jax version, from the records' session lines), the date of
   the newest finished run and the exact command, and a plot (PNG under ``docs/figures/``, embedded
   by a relative path).

Generated parts are delimited by HTML comments, so hand-written prose around them survives::

    <!-- results:begin california_housing -->
    ... generated ...
    <!-- results:end california_housing -->

A block missing from its page is appended at the end of the page (with its markers); text outside
the markers is never changed. Regeneration is deterministic: the same records give the same bytes
(figures aside, which matplotlib writes without a timestamp).

Example::

    gaussnewton-experiments results                      # run (resume) the plan, then regenerate
    gaussnewton-experiments results --no-run             # regenerate from the records only
    gaussnewton-experiments results --only lqr_bdt1,dqn_acrobot --records results/pages
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaussnewton_experiments.records import Records
from gaussnewton_experiments.report import plot_runs, summarize, summary_markdown

__all__ = [
    "Section",
    "SECTIONS",
    "SectionData",
    "BEGIN",
    "END",
    "read_blocks",
    "replace_block",
    "load_section",
    "render_section",
    "render_readme",
    "run_sections",
    "regenerate",
]

BEGIN = "<!-- results:begin {name} -->"
END = "<!-- results:end {name} -->"
README_BLOCK = "readme"  # the name of the README's block
_BLOCK = re.compile(
    r"<!-- results:begin (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- results:end (?P=name) -->",
    re.S,
)


@dataclass(frozen=True)
class Section:
    """One generated block: experiment ``experiment`` run with ``args``, reported on ``page``.

    Attributes:
        name: the block's marker name and the records sub-folder (``RECORDS/<name>``).
        page: ``"results.md"`` or ``"results_rl.md"`` (relative to the docs folder).
        experiment: a registered experiment (``gaussnewton-experiments list``).
        args: the budget, as ``run`` arguments (e.g. ``("--seeds", "2", "--steps", "1000")``).
        title: one line naming the task (README line and the block's first line).
        readme: whether the README's results block has a line for it.
    """

    name: str
    page: str
    experiment: str
    args: tuple[str, ...] = ()
    title: str = ""
    readme: bool = True

    def command(self, records: str | Path = "results/pages") -> str:
        """The ``run`` command of this section (as :func:`run_sections` calls it)."""
        return " ".join(
            ["gaussnewton-experiments run", self.experiment, *self.args, "--out",
             f"{Path(records) / self.name}"]
        )  # fmt: skip


# The plan behind docs/results.md and docs/results_rl.md: SMALL budgets that the shared 2-core CPU
# of this project runs in about 3 minutes each (the pages state them; scale them up for a claim).
SECTIONS: tuple[Section, ...] = (
    Section("california_housing", "results.md", "california_housing", ("--seeds", "3"),
            "California housing, test RMSE (100k USD), 4 optimizers x 3 seeds x 10 s of training"),
    Section("diamonds", "results.md", "diamonds", ("--seeds", "3"),
            "Diamonds, test RMSE (USD), 1 500 steps x 3 seeds"),
    Section("bikeshare", "results.md", "bikeshare", ("--seeds", "2"),
            "Bike sharing, test RMSE (riders/hour), 1 000 steps x 2 seeds"),
    Section("adult", "results.md", "adult", ("--seeds", "2"),
            "Adult income, test accuracy, 1 000 steps x 2 seeds"),
    Section("reviews", "results.md", "reviews", ("--seeds", "2"),
            "Clothing reviews (IMDB stand-in, TF-IDF + SVD 300 features), test accuracy, "
            "1 000 steps x 2 seeds"),
    Section("lqr_ac1", "results_rl.md", "lqr_ac1",
            ("--optimizers", "egn,adam", "--steps", "1000", "--seeds", "1"),
            "LQR AC1 Q-function, relative error of H, 1 000 steps, 1 seed"),
    Section("lqr_bdt1", "results_rl.md", "lqr_bdt1",
            ("--optimizers", "egn,adam", "--steps", "1500", "--seeds", "1"),
            "LQR BDT1 Q-function (d = 105, parameter-space solve), relative error of H, "
            "1 500 steps, 1 seed"),
    Section("dqn_cartpole", "results_rl.md", "dqn_cartpole",
            ("--seeds", "2", "--steps", "100000", "--eval-every", "20000"),
            "DQN CartPole-v1, greedy return, 100k environment steps x 2 seeds"),
    Section("dqn_acrobot", "results_rl.md", "dqn_acrobot",
            ("--seeds", "2", "--steps", "60000", "--eval-every", "10000"),
            "DQN Acrobot-v1, greedy return, 60k environment steps x 2 seeds"),
    Section("dqn_freeway", "results_rl.md", "dqn_freeway",
            ("--seeds", "1", "--steps", "10000", "--eval-every", "5000"),
            "DQN MinAtar Freeway (CNN Q-network), greedy return, 10k environment steps, 1 seed"),
)  # fmt: skip


# ------------------------------------------------------------------------------------- markers
def read_blocks(text: str) -> dict[str, str]:
    """``{name: body}`` of the generated blocks in ``text`` (body without the marker lines)."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with block ``name``'s body replaced by ``body`` (appended at the end, with its
    markers, when the page has no such block); everything outside the markers is kept.

    Example:
        >>> page = "intro\\n<!-- results:begin a -->\\nold\\n<!-- results:end a -->\\noutro\\n"
        >>> replace_block(page, "a", "new\\n")
        'intro\\n<!-- results:begin a -->\\nnew\\n<!-- results:end a -->\\noutro\\n'
    """
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"block name {name!r}: use letters, digits, '_', '.' or '-'.")
    body = body if body.endswith("\n") else body + "\n"
    block = f"{BEGIN.format(name=name)}\n{body}{END.format(name=name)}"
    begins = text.count(BEGIN.format(name=name))
    if begins > 1:
        raise ValueError(f"block {name!r} appears {begins} times; keep one pair of markers.")
    pattern = re.compile(
        re.escape(BEGIN.format(name=name)) + r"\n.*?" + re.escape(END.format(name=name)), re.S
    )
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if begins:
        raise ValueError(
            f"block {name!r} has a begin marker but no end marker {END.format(name=name)!r}."
        )
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}{block}\n"


# ------------------------------------------------------------------------------------ records
@dataclass
class SectionData:
    """What the records of one section hold (see :func:`load_section`)."""

    section: Section
    metric: str
    higher_is_better: bool
    x_label: str
    runs: dict[str, list[list[dict[str, Any]]]]  # optimizer -> per-seed evaluation rows
    summary: list[dict[str, Any]]
    machine: dict[str, str] = field(default_factory=dict)
    finished: float | None = None  # UNIX time of the newest finished run


def _test_keys(folder: Path, recs: list[dict[str, Any]]) -> dict[str, list[str]] | None:
    """``{optimizer: run keys}`` of the newest command's test runs (summary.json), if recorded."""
    path = folder / "summary.json"
    if not path.exists():
        return None
    try:
        keys = json.loads(path.read_text(encoding="utf-8")).get("test_keys")
    except (OSError, json.JSONDecodeError):
        return None
    return keys if isinstance(keys, dict) else None


def load_section(records_root: str | Path, section: Section) -> SectionData | None:
    """The finished TEST runs of ``section`` under ``records_root / section.name`` (None when it
    has none): those of the newest command (``summary.json``'s ``test_keys``) when recorded, else
    every finished test run, the newest per (optimizer, seed)."""
    from gaussnewton_experiments.registry import get_experiment

    folder = Path(records_root) / section.name
    if not (folder / "records.jsonl").exists():
        return None
    spec = get_experiment(section.experiment)
    records = Records(folder)
    recs = records.read()
    configs = records.configs()
    rows = records.rows()
    keys = _test_keys(folder, recs)
    if keys is None:
        newest: dict[tuple[str, int], str] = {}
        for r in recs:
            if r.get("type") == "done" and r["run"] in rows:
                cfg = r.get("config") or configs.get(r["run"], {})
                if cfg.get("split", "test") == "test":
                    newest[(cfg["optimizer"], int(cfg["seed"]))] = r["run"]
        keys = {}
        for (opt, _seed), k in sorted(newest.items()):
            keys.setdefault(opt, []).append(k)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for opt, ks in keys.items():
        seeds = []
        for k in ks:
            if rows.get(k):
                rs = [{kk: v for kk, v in r.items() if kk != "trace"} for r in rows[k]]
                rs[0]["_hparams"] = configs.get(k, {}).get("hparams", {})
                seeds.append(rs)
        if seeds:
            runs[opt] = seeds
    if not runs:
        return None
    sessions = [r for r in recs if r.get("type") == "session"]
    dones = [r.get("time") for r in recs if r.get("type") == "done" and r.get("time")]
    return SectionData(
        section=section,
        metric=spec.metric,
        higher_is_better=spec.higher_is_better,
        x_label=spec.x_label,
        runs=runs,
        summary=summarize(runs, spec.metric, spec.higher_is_better, spec.target),
        machine=dict(sessions[-1].get("versions", {})) if sessions else {},
        finished=max(dones) if dones else None,
    )


def _date(t: float | None) -> str:
    if t is None:
        return "unknown date"
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_line(machine: Mapping[str, str]) -> str:
    """``"Intel Xeon ..., 2 cores, jax 0.10.2 (cpu)"`` from a records ``versions`` dict."""
    cpu = machine.get("cpu") or machine.get("platform") or "unknown CPU"
    cores = machine.get("cpu_count", "?")
    jax = machine.get("jax", "?")
    dev = machine.get("device", "")
    return f"{cpu}, {cores} cores, jax {jax}" + (f" ({dev})" if dev else "")


# -------------------------------------------------------------------------------------- render
def render_section(
    data: SectionData | None,
    section: Section,
    *,
    records_root: str | Path = "results/pages",
    figure: str | None = None,
) -> str:
    """The Markdown body of ``section``'s block: title, stamp, command, summary table, plot.

    ``figure`` is the plot's path relative to the page (omitted when None)."""
    cmd = section.command(records_root)
    head = f"**{section.title or section.name}.**\n\n```bash\n{cmd}\n```\n\n"
    if data is None:
        return head + "(not run yet: no finished runs in the records; run the command above)\n"
    n_runs = sum(len(s) for s in data.runs.values())
    stamp = (
        f"Machine: {machine_line(data.machine)}; {n_runs} runs, newest finished "
        f"{_date(data.finished)}. Mean ± std over seeds; the test metric at the best VALIDATION "
        'evaluation where the experiment has a validation part ("-" otherwise).\n\n'
    )
    table = summary_markdown(data.summary, data.metric, data.higher_is_better)
    plot = f"\n![{section.name}]({figure})\n" if figure else ""
    return head + stamp + table + plot


def _headline(r: Mapping[str, Any]) -> tuple[str, tuple[float, float]]:
    ms = r["at_best_val"]
    if math.isfinite(ms[0]):
        return "at best validation", ms
    return "final", r["final"]


def _short(ms: tuple[float, float]) -> str:
    m, s = ms
    return "-" if not math.isfinite(m) else f"{m:.4g} ± {s:.2g}"


def render_readme(
    datas: Sequence[tuple[Section, SectionData | None]], *, page_prefix: str = "docs/"
) -> str:
    """The README's results block: one line per section (the headline metric per optimizer)."""
    lines = [
        f"Generated by `make results` from the run records (commands, tables and plots: "
        f"[{page_prefix}results.md]({page_prefix}results.md), "
        f"[{page_prefix}results_rl.md]({page_prefix}results_rl.md)). Small budgets on a shared "
        "CPU: smoke-level evidence, not a benchmark.",
        "",
    ]
    for section, data in datas:
        if not section.readme:
            continue
        if data is None:
            lines.append(f"- {section.title}: not run yet.")
            continue
        kind, _ = _headline(data.summary[0])
        parts = ", ".join(f"{r['optimizer']} {_short(_headline(r)[1])}" for r in data.summary)
        lines.append(
            f"- {section.title} ({_date(data.finished)[:10]}): {data.metric} {kind}: {parts}."
        )
    return (
        "\n".join(
            textwrap.fill(
                ln,
                100,
                subsequent_indent="  " if ln.startswith("- ") else "",
                break_on_hyphens=False,
            )
            if ln
            else ln
            for ln in lines
        )
        + "\n"
    )


# ------------------------------------------------------------------------------------ commands
def select(sections: Sequence[Section], only: Sequence[str] | None) -> list[Section]:
    """The sections named in ``only`` (all when None); an unknown name is a ValueError."""
    if not only:
        return list(sections)
    names = {s.name for s in sections}
    unknown = sorted(set(only) - names)
    if unknown:
        raise ValueError(
            f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}."
        )
    return [s for s in sections if s.name in set(only)]


def run_sections(
    sections: Sequence[Section],
    records_root: str | Path,
    *,
    run: Callable[[list[str]], int] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run (resume) each section through the ``run`` command; ``{name: exit status}``."""
    if run is None:
        from gaussnewton_experiments.cli import main as run
    status = {}
    for s in sections:
        argv = ["run", s.experiment, *s.args, "--out", str(Path(records_root) / s.name),
                "--quiet", "--no-plot"]  # fmt: skip
        log(f"results: {' '.join(argv)}")
        status[s.name] = int(run(argv))
    return status


def regenerate(
    sections: Sequence[Section],
    records_root: str | Path,
    docs: str | Path,
    *,
    readme: str | Path | None = None,
    figures: bool = True,
    all_sections: Sequence[Section] | None = None,
) -> list[Path]:
    """Rewrite the generated blocks of ``sections`` in ``docs/<page>`` (and the README's block,
    over ``all_sections``, default ``sections``) from the records; returns the files written.

    Figures go to ``docs/figures/<name>.png`` (embedded as ``figures/<name>.png``)."""
    docs = Path(docs)
    written: list[Path] = []
    pages: dict[str, str] = {}
    loaded: dict[str, SectionData | None] = {}
    for s in sections:
        data = load_section(records_root, s)
        loaded[s.name] = data
        fig = None
        if figures and data is not None:
            (docs / "figures").mkdir(parents=True, exist_ok=True)
            png = docs / "figures" / f"{s.name}.png"
            plot_runs(data.runs, data.metric, png, title=s.title or s.name,
                      x_label=data.x_label, higher_is_better=data.higher_is_better,
                      dpi=60)  # fmt: skip
            written.append(png)
            fig = f"figures/{s.name}.png"
        page = docs / s.page
        if s.page not in pages:
            pages[s.page] = page.read_text(encoding="utf-8") if page.exists() else ""
        body = render_section(data, s, records_root=records_root, figure=fig)
        pages[s.page] = replace_block(pages[s.page], s.name, body)
    for name, text in pages.items():
        path = docs / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if readme is not None:
        readme = Path(readme)
        every = list(all_sections or sections)
        datas = [(s, loaded[s.name] if s.name in loaded else load_section(records_root, s))
                 for s in every]  # fmt: skip
        text = readme.read_text(encoding="utf-8") if readme.exists() else ""
        readme.write_text(replace_block(text, README_BLOCK, render_readme(datas)), encoding="utf-8")
        written.append(readme)
    return written
