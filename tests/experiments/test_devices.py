"""``gaussnewton-experiments run ... --devices N``: a supervised run data-parallel over N devices.

The data-parallel run (2 forced CPU devices, in a fresh process: the device count must be set
before jax starts) records the same losses as the one-device run of the same configuration, up to
float32 reduction order; both runs are subprocesses (float32, as a user runs them; the test
suite's own process has float64 enabled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gaussnewton_experiments.cli import main
from gaussnewton_experiments.devices import DataParallel
from gaussnewton_experiments.runner import run_experiment

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # generous for a loaded 2-core machine; each run takes ~15-30 s
# float32 runs whose only difference is the order of the sharded sums (the mean loss over the
# batch, the Gram's and the gradient's reductions): a few float32 ulps per step, over 4 steps
RTOL = 1e-5


def _cli(out: Path, devices: int) -> subprocess.Popen:
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(ROOT / "experiments" / "src"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_ENABLE_X64", None)
    argv = ["run", "digits", "--optimizers", "egn", "--steps", "4", "--eval-every", "2",
            "--seeds", "1", "--batch-size", "32", "--out", str(out), "--quiet", "--no-plot",
            "--devices", str(devices)]  # fmt: skip
    cmd = [sys.executable, "-m", "gaussnewton_experiments.cli", *argv]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _records(out: Path) -> list[dict]:
    with open(out / "records.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_devices_record_the_same_losses_as_one(tmp_path):
    outs = {n: tmp_path / f"d{n}" for n in (1, 2)}
    procs = {n: _cli(out, n) for n, out in outs.items()}  # both at once: 2 cores
    logs = {}
    for n, p in procs.items():
        try:
            logs[n], _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"--devices {n} run timed out after {TIMEOUT_S} s")
        assert p.returncode == 0, f"--devices {n} exited {p.returncode}:\n{logs[n]}"
    recs = {n: _records(out) for n, out in outs.items()}
    for n in (1, 2):
        session = next(r for r in recs[n] if r["type"] == "session")
        start = next(r for r in recs[n] if r["type"] == "start")
        assert session["devices"] == n and start["devices"] == n
    evals = {n: [r for r in recs[n] if r["type"] == "eval"] for n in (1, 2)}
    assert [r["step"] for r in evals[1]] == [r["step"] for r in evals[2]] == [0, 2, 4]
    for r1, r2 in zip(evals[1], evals[2], strict=True):
        assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=RTOL)
        assert r2["metric"] == pytest.approx(r1["metric"], abs=1e-9 + 1.0 / 300)  # <= 1 example
        if r1["step"]:
            assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=RTOL)
            for a, b in zip(r1["trace"]["loss"], r2["trace"]["loss"], strict=True):
                assert b == pytest.approx(a, rel=RTOL)
    # the runs trained (the comparison is not between two untouched initializations)
    assert evals[1][-1]["test_loss"] < 0.99 * evals[1][0]["test_loss"]


class _FakeMesh:
    """Just the device count of a mesh (the check needs nothing else)."""

    def __init__(self, n):
        self.devices = np.empty(n, dtype=object)


def test_batch_not_divisible_by_devices_is_refused():
    DataParallel(_FakeMesh(4)).check_batch(32)
    with pytest.raises(ValueError, match="batch_size=30 is not divisible by --devices 4"):
        DataParallel(_FakeMesh(4)).check_batch(30)


def test_runner_refuses_more_devices_than_there_are(tmp_path):
    import jax

    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"--devices {n}: only"):
        run_experiment("digits", devices=n, steps=1, out=tmp_path, plots=False)
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        run_experiment("digits", devices=0, steps=1, out=tmp_path, plots=False)


def test_cli_refuses_more_devices_than_the_started_backend_has(capsys):
    import jax

    jax.devices()  # the test process's backend is up, with 1 CPU device
    have = jax.device_count()
    with pytest.raises(SystemExit) as exc:
        main(["run", "digits", "--devices", str(have + 1), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--devices {have + 1}: jax is already initialized with {have} device(s)" in err
