"""Runner, records / resume, tuning, report and the CLI (tiny budgets, in-process)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussnewton_experiments import registry as R
from gaussnewton_experiments.cli import main
from gaussnewton_experiments.datasets import load_california_housing
from gaussnewton_experiments.models import count_params, make_model
from gaussnewton_experiments.records import Records
from gaussnewton_experiments.report import at_best_validation
from gaussnewton_experiments.runner import run_experiment
from gaussnewton_experiments.supervised import _batch_indices, _make_eval

CALLS: list[tuple[str, int, float]] = []
FAIL_ONCE: set[tuple[str, int]] = set()


def _fake_run(cfg: R.RunConfig):
    """Deterministic fake training: metric = (lr - 0.1)^2 + 1/step; may crash mid-run once."""
    lr = float(cfg.hparams.get("learning_rate", 1.0))
    CALLS.append((cfg.optimizer, cfg.seed, lr))
    for step in range(0, cfg.steps + 1, cfg.eval_every):
        if step and (cfg.optimizer, cfg.seed) in FAIL_ONCE:
            FAIL_ONCE.discard((cfg.optimizer, cfg.seed))
            raise RuntimeError("simulated crash")
        m = (lr - 0.1) ** 2 + 1.0 / (step + 1) + 0.01 * cfg.seed
        yield {"step": step, "train_time": 0.01 * step, "loss_metric": m, "train_loss": m}


@pytest.fixture(scope="module", autouse=True)
def fake_entries():
    R.load_builtins()
    R.register_experiment(
        "_fake",
        R.ExperimentSpec(run=_fake_run, metric="loss_metric", target=0.5, default_steps=4),
        overwrite=True,
    )
    for name in ("_opt_a", "_opt_b"):
        R.register_optimizer(
            name,
            lambda model_fn, loss, **hp: None,
            defaults={"learning_rate": 1.0},
            grid=[{"learning_rate": lr} for lr in (1.0, 0.1, 0.01)],
            overwrite=True,
        )
    yield


def test_resume_skips_finished_runs_and_redoes_interrupted_ones(tmp_path):
    CALLS.clear()
    FAIL_ONCE.add(("_opt_b", 1))
    kw = dict(optimizers=["_opt_a", "_opt_b"], seeds=2, steps=4, eval_every=1, out=tmp_path)
    res = run_experiment("_fake", **kw)
    assert len(res.errors) == 1 and "simulated crash" in res.errors[0]
    assert len(CALLS) == 4
    assert res.test_keys["_opt_b"] and len(res.test_keys["_opt_b"]) == 1  # the crashed one is out
    recs = Records(tmp_path)
    assert len(recs.done()) == 3
    CALLS.clear()
    res2 = run_experiment("_fake", **kw)
    assert CALLS == [("_opt_b", 1, 1.0)]  # only the unfinished run is redone
    assert not res2.errors and len(recs.done()) == 4
    rows = recs.rows()
    assert all(len(r) == 5 for r in rows.values())  # the crashed attempt's rows are ignored
    CALLS.clear()
    run_experiment("_fake", **kw)
    assert CALLS == []
    # a different budget is a different run
    run_experiment("_fake", **{**kw, "steps": 2, "optimizers": ["_opt_a"], "seeds": 1})
    assert CALLS == [("_opt_a", 0, 1.0)]


def test_tuning_picks_the_best_validation_candidate_and_records_it(tmp_path):
    CALLS.clear()
    res = run_experiment(
        "_fake", optimizers=["_opt_a"], seeds=2, steps=2, eval_every=1, tune=True, out=tmp_path
    )
    assert res.winners["_opt_a"]["learning_rate"] == 0.1
    tune = Records(tmp_path).tunes()[-1]
    assert [g["learning_rate"] for g in tune["grid"]] == [1.0, 0.1, 0.01]
    assert tune["split"] == "validation" and tune["winner"]["learning_rate"] == 0.1
    assert CALLS[3:] == [("_opt_a", 0, 0.1), ("_opt_a", 1, 0.1)]  # winner on test, all seeds
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = summary["summary"][0]
    assert row["final"][0] == pytest.approx(1.0 / 3 + 0.005, rel=1e-9)
    assert row["reached"] == "2/2" and (tmp_path / "_fake.png").stat().st_size > 10_000
    md = (tmp_path / "summary.md").read_text()
    assert "| _opt_a | 2 (0) |" in md and "learning_rate=0.1" in md


def test_batches_are_per_seed_permutations_with_the_partial_batch_dropped():
    idx = _batch_indices(10, 3, seed=5, start_step=0, num_steps=6)
    epoch0, epoch1 = idx[:3].ravel(), idx[3:].ravel()
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # 3 batches of 3, one example dropped
    perm0 = np.random.default_rng([5, 0]).permutation(10)
    np.testing.assert_array_equal(epoch0, perm0[:9])
    later = _batch_indices(10, 3, seed=5, start_step=4, num_steps=2)
    np.testing.assert_array_equal(later, idx[4:6])  # resumable from any step
    assert not np.array_equal(_batch_indices(10, 3, 6, 0, 3), idx[:3])


def test_models_shapes_and_lecun_init():
    key = jax.random.PRNGKey(0)
    fn, p = make_model("mlp", key, (8,), 1)
    assert [layer["w"].shape for layer in p] == [(8, 32), (32, 64), (64, 32), (32, 1)]
    assert fn(p, jnp.ones((5, 8))).shape == (5, 1) and count_params(p) == 4513
    assert all(float(jnp.abs(layer["b"]).max()) == 0.0 for layer in p)
    cnn, pc = make_model("cnn", key, (28, 28, 1), 10)
    assert jax.jit(cnn)(pc, jnp.ones((2, 28, 28, 1))).shape == (2, 10)
    w = pc["dense"][0]["w"]
    assert w.shape == (7 * 7 * 16, 32) and w.dtype == jnp.float32
    # LeCun normal: std 1/sqrt(fan_in) (25088 draws: the estimate is good to ~0.5%)
    assert float(jnp.std(w)) == pytest.approx(1.0 / math.sqrt(7 * 7 * 16), rel=0.03)
    assert float(jnp.abs(w).max()) <= 2.0 / math.sqrt(7 * 7 * 16) / 0.87962566 + 1e-6  # truncated
    from gaussnewton_experiments.models import _maxpool2

    z = jax.random.normal(key, (2, 7, 6, 3))
    ref = jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(np.asarray(_maxpool2(z)), np.asarray(ref))
    with pytest.raises(ValueError, match="model must be"):
        make_model("rnn", key, (3,), 1)


def test_evaluation_rmse_is_in_original_units():
    ds = load_california_housing()
    fn, p = make_model("mlp", jax.random.PRNGKey(1), (8,), 1)
    m = _make_eval(fn, ds, "squared_error", eval_batch=1000)(p)  # 2064 rows: padding path
    pred = np.asarray(fn(p, jnp.asarray(ds.x_test)), np.float64)[:, 0] * ds.y_std + ds.y_mean
    truth = ds.y_test[:, 0].astype(np.float64) * ds.y_std + ds.y_mean
    assert m["test_rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), rel=1e-4)
    # the validation part (held out of x_train) is scored the same way, under val_* keys
    mv = _make_eval(fn, ds, "squared_error", eval_batch=1000, part="val")(p)
    pv = np.asarray(fn(p, jnp.asarray(ds.x_val)), np.float64)[:, 0]
    rmse_v = np.sqrt(np.mean((pv - ds.y_val[:, 0].astype(np.float64)) ** 2)) * ds.y_std
    assert mv["val_rmse"] == pytest.approx(rmse_v, rel=1e-4) and mv["val_metric"] == mv["val_rmse"]


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("california_housing", "fashion_mnist", "egn-ls", "adam", "sine"):
        assert name in out


def test_cli_unknown_experiment_fails_cleanly(capsys):
    assert main(["run", "no_such_experiment", "--quiet"]) == 2
    assert "unknown experiment" in capsys.readouterr().out


def test_cli_smoke_california_egn_adam_and_resume(tmp_path):
    out = tmp_path / "ch"
    argv = ["run", "california_housing", "--optimizers", "egn,adam", "--steps", "20",
            "--eval-every", "10", "--seeds", "1", "--batch-size", "32", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    recs = Records(out)
    done = recs.done()
    assert {d["config"]["optimizer"] for d in done.values()} == {"egn", "adam"}
    for d in done.values():
        assert math.isfinite(d["final"]["test_rmse"]) and d["final"]["step"] == 20
        assert d["config"]["batch_size"] == 32 and "batch_size" not in d["config"]["hparams"]
    rows = next(iter(recs.rows().values()))
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert all(r["train_time"] >= 0 and "eval_time" in r for r in rows)
    assert len(rows[-1]["trace"]["loss"]) == 10  # per-step info kept
    assert (out / "california_housing.png").exists() and (out / "summary.md").exists()
    # every test row is also scored on the validation part; the summary selects by it
    assert all(math.isfinite(r["val_rmse"]) and r["val_metric"] == r["val_rmse"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    egn_rows = next(rs for k, rs in recs.rows().items() if done[k]["config"]["optimizer"] == "egn")
    egn = next(r for r in summary if r["optimizer"] == "egn")
    assert egn["at_best_val"][0] == pytest.approx(
        at_best_validation(egn_rows, "test_rmse", higher=False), rel=1e-12
    )
    n_lines = len(recs.read())
    assert main(argv) == 0  # resume: nothing to redo
    new = recs.read()[n_lines:]
    assert not [r for r in new if r["type"] in ("start", "eval")]


def test_cli_classification_digits(tmp_path):
    argv = ["run", "digits", "--optimizers", "sgd", "--steps", "10", "--eval-every", "5",
            "--seeds", "1", "--out", str(tmp_path), "--quiet", "--set", "sgd.learning_rate=0.5",
            "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    done = next(iter(Records(tmp_path).done().values()))
    assert done["config"]["hparams"] == {"learning_rate": 0.5}
    assert 0.0 <= done["final"]["test_accuracy"] <= 1.0
    assert not (tmp_path / "digits.png").exists()


def test_family_optimizers_build_through_the_registry():
    fn, p = make_model("mlp", jax.random.PRNGKey(0), (3,), 1)
    for name in ("sgn", "sqn", "ignd", "dual-gn", "ggn", "egn-fixed", "egn-momentum"):
        spec = R.get_optimizer(name)
        opt = spec.build(fn, "squared_error", spec.defaults)
        assert callable(opt.init) and callable(opt.step), name


def test_a_method_whose_state_holds_params_runs(tmp_path):
    """SQN keeps the previous parameters in its state (no buffer donation may alias them)."""
    res = run_experiment(
        "sine", optimizers=["sqn"], seeds=[0], steps=4, eval_every=2, batch_size=16,
        out=tmp_path, plots=False,
    )  # fmt: skip
    assert not res.errors, res.errors
    final = next(iter(Records(tmp_path).done().values()))["final"]
    assert final["step"] == 4 and math.isfinite(final["test_rmse"])
