"""CLI and records robustness: argument ranges (exit status 2, no traceback), unknown option names,
a tuning in which every candidate failed, a cut last records line, and the 80-column summary.

Everything runs in-process on a fake experiment (no JAX compilation), so the file takes seconds.
"""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from gaussnewton_experiments import registry as R
from gaussnewton_experiments.cli import main
from gaussnewton_experiments.records import Records
from gaussnewton_experiments.report import (
    at_best_validation,
    summarize,
    summary_markdown,
    summary_table,
)
from gaussnewton_experiments.runner import run_experiment

CALLS: list[tuple[str, int, str]] = []


def _fake_run(cfg: R.RunConfig):
    """metric = lr + 1/(step+1); optimizer ``_cli_crash`` raises after its first row."""
    CALLS.append((cfg.optimizer, cfg.seed, cfg.split))
    lr = float(cfg.hparams.get("learning_rate", 1.0))
    for step in range(0, cfg.steps + 1, cfg.eval_every):
        if step and cfg.optimizer == "_cli_crash":
            raise RuntimeError("simulated crash")
        m = lr + 1.0 / (step + 1) + float(cfg.options.get("offset", 0.0))
        yield {"step": step, "train_time": 0.01 * step, "fake_metric": m}


@pytest.fixture(scope="module", autouse=True)
def fake_entries():
    R.load_builtins()
    spec = R.ExperimentSpec(
        run=_fake_run,
        metric="fake_metric",
        target=0.5,
        default_steps=1_000_000,  # a fallback to this default would hang the test
        default_seeds=1,
        default_optimizers=("_cli_ok",),
        options={"offset": 0.0},
        option_keys=("width",),
    )
    R.register_experiment("_cli_fake", spec, overwrite=True)
    grid = [{"learning_rate": lr} for lr in (1.0, 0.1)]
    for name in ("_cli_ok", "_cli_crash"):
        R.register_optimizer(name, lambda model_fn, loss, **hp: None, grid=grid, overwrite=True)
    yield


def _run(tmp_path, *extra: str) -> list[str]:
    return ["run", "_cli_fake", "--out", str(tmp_path / "out"), "--quiet", "--no-plot", *extra]


# ----------------------------------------------------------------------------- argument ranges


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "0", "positive integer"),
        ("--steps", "-5", "positive integer"),
        ("--batch-size", "0", "positive integer"),
        ("--batch-size", "-1", "positive integer"),
        ("--eval-every", "0", "positive integer"),
        ("--eval-every", "-3", "positive integer"),
        ("--seeds", "0", "positive integer"),
        ("--tune-steps", "0", "positive integer"),
        ("--steps", "ten", "expected a positive integer"),
        ("--time-budget", "-1", "seconds >= 0"),
        ("--time-budget", "nan", "seconds >= 0"),
        ("--seed-list", "a,b", "comma-separated integers"),
        ("--seed-list", "1,-2", "comma-separated integers"),
        ("--seed-list", ",", "comma-separated integers"),
        ("--seed-list", "1,1", "distinct"),
        ("--set", "novalue", "NAME=VALUE"),
        ("--option", "=3", "NAME=VALUE"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_run_nothing(
    tmp_path, capsys, flag, value, message
):
    CALLS.clear()
    with pytest.raises(SystemExit) as exc:
        main(_run(tmp_path, f"{flag}={value}"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and flag.split("-")[-1] in err and "Traceback" not in err
    assert CALLS == [] and not (tmp_path / "out" / "records.jsonl").exists()


def test_zero_and_negative_budgets_are_refused_by_the_runner_too(tmp_path):
    """The API does not fall back to the defaults either (``steps or default`` did)."""
    for kw in ({"steps": 0}, {"batch_size": 0}, {"eval_every": 0}, {"steps": -2}, {"seeds": 0},
               {"seeds": []}, {"seeds": [0, 0]}, {"time_budget": -1.0}):  # fmt: skip
        with pytest.raises(ValueError, match="must be"):
            run_experiment("_cli_fake", out=tmp_path, plots=False, **kw)
    assert not (tmp_path / "records.jsonl").exists()


def test_bad_out_exits_2_without_a_traceback(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for out in (afile, afile / "below"):
        with pytest.raises(SystemExit) as exc:
            main(["run", "_cli_fake", "--out", str(out), "--quiet", "--steps", "2"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err and "Traceback" not in err


def test_unknown_option_is_refused_naming_the_known_ones(tmp_path, capsys):
    CALLS.clear()
    code = main(_run(tmp_path, "--steps", "2", "--option", "widht=3"))
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "widht" in out and "offset" in out and "width" in out
    assert CALLS == [] and not (tmp_path / "out" / "records.jsonl").exists()
    # declared names pass: a default option and an extra option key
    args = ("--steps", "2", "--eval-every", "1", "--option", "offset=1.0", "--option", "width=3")
    assert main(_run(tmp_path, *args)) == 0
    done = next(iter(Records(tmp_path / "out").done().values()))
    assert done["config"]["options"] == {"offset": 1.0, "width": 3}
    assert done["final"]["fake_metric"] == pytest.approx(1.0 + 1.0 / 3 + 1.0)


def test_tuning_fails_loudly_when_no_candidate_ran(tmp_path, capsys):
    CALLS.clear()
    args = ("--optimizers", "_cli_crash,_cli_ok", "--tune", "--steps", "2", "--eval-every", "1")
    assert main(_run(tmp_path, *args)) == 1
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines at 80 columns
    assert "tune _cli_crash: no candidate ran (2 of 2 failed" in out
    # no test run of the optimizer without a winner; the other one is tuned and run as usual
    assert [c for c in CALLS if c[2] == "test"] == [("_cli_ok", 0, "test")]
    tunes = {t["optimizer"]: t for t in Records(tmp_path / "out").tunes()}
    assert (
        tunes["_cli_crash"]["winner"] is None and "no candidate ran" in tunes["_cli_crash"]["error"]
    )
    assert tunes["_cli_ok"]["winner"] == {"learning_rate": 0.1}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["optimizer"] for r in summary["summary"]] == ["_cli_ok"]
    assert any("no candidate ran" in e for e in summary["errors"])


# ----------------------------------------------------------------------------- records


def test_a_cut_last_line_never_swallows_the_next_record(tmp_path):
    recs = Records(tmp_path)
    recs.append({"type": "session", "n": 1})
    with open(recs.path, "a", encoding="utf-8") as f:
        f.write('{"type": "eval", "run": "abc", "st')  # a crash mid-write: no newline
    recs2 = Records(tmp_path)  # opening repairs the file
    assert recs2.repaired and recs.path.read_bytes().endswith(b"\n")
    recs2.append({"type": "session", "n": 2})
    got = recs2.read()
    assert [r["n"] for r in got] == [1, 2]  # the next record is intact
    assert recs2.corrupt_lines == [2]  # the cut line is skipped and reported
    assert not Records(tmp_path).repaired  # a clean file is left alone


def test_resume_after_a_crash_that_cut_the_last_line(tmp_path):
    kw = dict(optimizers=["_cli_ok"], seeds=[0, 1], steps=2, eval_every=1, out=tmp_path)
    run_experiment("_cli_fake", plots=False, **kw)
    path = tmp_path / "records.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-15])  # cut into the last run's "done" line
    CALLS.clear()
    res = run_experiment("_cli_fake", plots=False, **kw)
    assert CALLS == [("_cli_ok", 1, "test")]  # only the run whose "done" line was cut is redone
    assert not res.errors and len(res.test_keys["_cli_ok"]) == 2
    recs = Records(tmp_path)
    types = [r["type"] for r in recs.read()]
    assert types.count("session") == 2 and len(recs.done()) == 2 and len(recs.corrupt_lines) == 1


# ----------------------------------------------------------------------------- 80 columns


def _summary_rows(names, final, best, at_time, tt, sps):
    return [
        {
            "optimizer": n,
            "seeds": 5,
            "diverged": 1,
            "final": final,
            "at_best_val": best,
            "at_common_time": at_time,
            "common_time": 10.0321,
            "target": 800.0,
            "reached": "3/5" if i % 2 else "0/5",
            "time_to_target": tt if i % 2 else (math.nan,) * 2,
            "steps_per_s": sps,
            "train_time": (10.01, 0.01),
            "eval_time": (0.52, 0.01),
            "steps_to_target": (1234.0, 12.0),
            "steps": 12345,
            "hparams": {"learning_rate": 0.3},
        }  # fmt: skip
        for i, n in enumerate(names)
    ]


@pytest.mark.parametrize(
    ("final", "best", "sps"),
    [
        ((0.5432, 0.0123), (0.5123, 0.0101), (8432.1, 12.3)),  # California RMSE (100k USD)
        ((1234.5, 123.4), (812.3, 12.1), (123.4, 1.2)),  # Diamonds RMSE (USD)
        ((0.8765, 0.0012), (0.8801, 0.0009), (12345.6, 3.0)),  # an accuracy
        ((math.nan, math.nan), (1.23e-5, 4.5e-6), (math.nan, math.nan)),  # diverged; tiny
    ],
)
def test_terminal_summary_reads_at_80_columns(final, best, sps):
    names = sorted(R.list_optimizers(), key=len)[-3:] + ["sgd"]  # the longest registered names
    rows = _summary_rows(names, final, best, best, (12.345, 3.0), sps)
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(rows, "test_accuracy", True))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not [line for line in lines if "…" in line], "\n".join(lines)  # nothing truncated
    body = [line for line in lines if line.split() and line.split()[0] in names]
    assert len(body) == len(names)  # one line per optimizer: no cell wrapped
    header = next(line for line in lines if line.startswith("optimizer"))
    assert "final" in header and "it/s" in header  # the header is not cut
    # the Markdown file keeps every column
    md = summary_markdown(rows, "test_accuracy", True)
    for col in ("seeds (diverged)", "steps to 800.0", "steps/s", "train s", "eval s",
                "hyper-parameters"):  # fmt: skip
        assert col in md
    assert "learning_rate=0.3" in md


# ----------------------------------------------------------------------------- honest selection


def test_selection_is_by_validation_never_by_test():
    rows = [
        {"step": 0, "train_time": 0.0, "m": 9.0, "val_metric": 0.5},
        {"step": 1, "train_time": 1.0, "m": 7.0, "val_metric": 0.3},
        {"step": 2, "train_time": 2.0, "m": 1.0, "val_metric": 0.4},  # best TEST value: not it
        {"step": 3, "train_time": 3.0, "m": 5.0, "val_metric": float("nan")},
        {"step": 4, "train_time": 4.0, "m": 3.0, "val_metric": 0.3},  # a tie: the first wins
    ]
    assert at_best_validation(rows, "m", higher=False) == 7.0
    assert at_best_validation(rows, "m", higher=True) == 9.0
    assert math.isnan(at_best_validation([{"m": 1.0}], "m", higher=False))  # no validation: NaN
    seeds = [rows, [{**r, "m": r["m"] + 1.0} for r in rows]]
    (row,) = summarize({"x": seeds}, "m", higher_is_better=False, target=None)
    assert row["at_best_val"] == pytest.approx((7.5, 0.5))  # 7 and 8
    assert row["final"] == pytest.approx((3.5, 0.5)) and "best" not in row


def test_supervised_metric_follows_the_registered_task():
    """The task comes from the loader's declaration, not from a list of names in supervised.py."""
    from gaussnewton_experiments.supervised import supervised_experiment

    R.register_dataset("_cli_cls", lambda split="test": None, task="classification", overwrite=True)
    R.register_dataset("_cli_reg", lambda split="test": None, task="regression", overwrite=True)
    cls, reg = supervised_experiment("_cli_cls"), supervised_experiment("_cli_reg")
    assert (cls.metric, cls.higher_is_better) == ("test_accuracy", True)
    assert (reg.metric, reg.higher_is_better) == ("test_rmse", False)
    for name, spec in R.list_datasets().items():  # every built-in declares its task
        assert spec.task in R.DATASET_TASKS, name
    with pytest.raises(ValueError, match="task of data set '_cli_bad' must be one of"):
        R.register_dataset("_cli_bad", lambda split="test": None, task="ranking")
