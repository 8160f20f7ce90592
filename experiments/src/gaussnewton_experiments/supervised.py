"""Supervised training loop (protocol: docs/experiments.md) and the supervised experiments.

One run = (data set, model, optimizer, hyper-parameters, seed). Protocol:
- per-seed shuffle of the training set each epoch, contiguous batches, last partial batch dropped;
- the training loop runs ``eval_every`` steps per jitted call (a ``lax.scan`` over pre-drawn batch
  indices), compiled AHEAD of time, so the recorded ``train_time`` excludes compilation;
- the full evaluation set (test, or validation while tuning) is evaluated every ``eval_every``
  steps and at step 0, timed separately (``eval_time``);
- regression RMSE is reported in the target's original units (training uses standardised targets);
- per-step optimizer info (loss, step size, damping) is kept in each row's ``trace`` (every
  ``trace_stride``-th step, at most 50 per evaluation; the rejected-step count is exact).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gaussnewton_experiments import devices
from gaussnewton_experiments.datasets import Dataset, load_dataset
from gaussnewton_experiments.models import count_params, make_model
from gaussnewton_experiments.optimizers import loss_value
from gaussnewton_experiments.registry import (
    ExperimentSpec,
    RunConfig,
    get_dataset,
    get_optimizer,
    register_experiment,
)

__all__ = ["run_supervised", "supervised_experiment", "cached_dataset", "loss_for"]

_TRACE_KEYS = ("loss", "step_size", "damping", "rejected")


@functools.lru_cache(maxsize=8)
def _cached(name: str, split: str, kwargs_items: tuple) -> Dataset:
    return load_dataset(name, split=split, **dict(kwargs_items))


def cached_dataset(name: str, split: str = "test", **kwargs: Any) -> Dataset:
    """:func:`load_dataset` memoised per process (runs of one command share the arrays)."""
    return _cached(name, split, tuple(sorted(kwargs.items())))


def loss_for(ds: Dataset) -> str:
    """Library loss name for a data set: squared error, sigmoid BCE (binary) or softmax CE."""
    if ds.task == "regression":
        return "squared_error"
    return "sigmoid_binary_cross_entropy" if ds.num_outputs == 1 else "softmax_cross_entropy"


def _batch_indices(n: int, batch: int, seed: int, start_step: int, num_steps: int) -> np.ndarray:
    """Indices (num_steps, batch) of steps ``start_step ...``: per-epoch permutations seeded by
    (seed, epoch), contiguous slices, last partial batch dropped."""
    per_epoch = n // batch
    out = np.empty((num_steps, batch), np.int32)
    for j in range(num_steps):
        epoch, pos = divmod(start_step + j, per_epoch)
        if j == 0 or pos == 0:
            perm = np.random.default_rng([seed, epoch]).permutation(n)
        out[j] = perm[pos * batch : (pos + 1) * batch]
    return out


def _make_eval(model_fn, ds: Dataset, loss: str, eval_batch: int, part: str = "eval"):
    """``metrics(params) -> dict`` on the evaluation arrays of ``ds.split`` (``part="eval"``: keys
    ``test_*`` / ``val_*`` and ``metric``) or on the validation part (``part="val"``: keys
    ``val_*`` and ``val_metric``), in batches of ``eval_batch`` (last one padded and masked).

    Per-token outputs ``(b, T, V)`` with labels ``(b, T)`` (language models): the loss and the
    accuracy of an example are means over its T tokens, so ``*_loss`` is the mean per-token loss
    and ``*_accuracy`` the token accuracy (every sequence has the same T)."""
    if part == "val":
        x0, y0, prefix, main_key = ds.x_val, ds.y_val, "val", "val_metric"
    else:
        x0, y0 = ds.x_test, ds.y_test
        prefix, main_key = ("test" if ds.split == "test" else "val"), "metric"
    n = int(x0.shape[0])
    nb = math.ceil(n / eval_batch)
    pad = nb * eval_batch - n
    x = np.concatenate([x0, np.repeat(x0[:1], pad, 0)]) if pad else x0
    y = np.concatenate([y0, np.repeat(y0[:1], pad, 0)]) if pad else y0
    xb = jnp.asarray(x.reshape(nb, eval_batch, *x.shape[1:]))
    yb = jnp.asarray(y.reshape(nb, eval_batch, *y.shape[1:]))
    mask = jnp.asarray((np.arange(nb * eval_batch) < n).reshape(nb, eval_batch), jnp.float32)

    @jax.jit
    def evaluate(params):
        def one(args):
            xi, yi, mi = args
            f = model_fn(params, xi)
            f = f[:, None] if f.ndim == 1 else f
            per = jax.vmap(lambda fj, yj: loss_value(loss, fj[None], yj[None]))(f, yi)
            if ds.task == "regression":
                err = jnp.sum(jnp.square(f - yi.reshape(f.shape)), axis=-1)
                correct = jnp.zeros_like(per)
            else:
                err = jnp.zeros_like(per)
                binary = f.ndim == 2 and f.shape[1] == 1
                pred = (f[:, 0] > 0).astype(jnp.int32) if binary else jnp.argmax(f, -1)
                correct = (pred == yi).astype(jnp.float32)
                # per-token outputs (b, T, V), labels (b, T): an example's accuracy is the mean
                # over its tokens (its loss, above, is already the mean over its tokens)
                correct = correct.reshape(correct.shape[0], -1).mean(axis=1)
            return jnp.sum(per * mi), jnp.sum(err * mi), jnp.sum(correct * mi)

        lo, er, co = jax.lax.map(one, (xb, yb, mask))
        return jnp.sum(lo) / n, jnp.sum(er) / n, jnp.sum(co) / n

    def metrics(params) -> dict[str, float]:
        lo, er, co = (float(v) for v in evaluate(params))
        out = {f"{prefix}_loss": lo}
        if ds.task == "regression":
            out[f"{prefix}_rmse"] = math.sqrt(er) * ds.y_std
            out[main_key] = out[f"{prefix}_rmse"]
        else:
            out[f"{prefix}_accuracy"] = co
            out[main_key] = co
        return out

    return metrics


def _cast(dtype: str, params, x, y):
    """Floating parameters, inputs and targets in ``dtype`` (option ``dtype``)."""
    dt = jnp.dtype(dtype)
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"option dtype={dtype!r} needs float64 enabled: jax.config.update('jax_enable_x64', "
            "True) before the run (or JAX_ENABLE_X64=1)."
        )

    def one(a):
        return a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(one, params), one(x), one(y)


def run_supervised(cfg: RunConfig) -> Iterator[dict[str, Any]]:
    """Train one configuration; yield an evaluation row at step 0 and every ``eval_every`` steps.

    ``cfg.options``: ``dataset`` (name), ``model`` ("mlp" | "cnn" | "transformer"), optional
    ``dataset_kwargs``, ``hidden``, ``activation``, ``eval_batch``, ``dtype`` (e.g. ``"float64"``:
    parameters, inputs and targets in that dtype; needs ``jax_enable_x64``). The row's primary metric is stored under both its
    own name (``test_rmse`` / ``test_accuracy``, or ``val_*`` on the validation split) and
    ``metric``. On the test split every row also holds the same metric on the validation part
    (``val_rmse`` / ``val_accuracy`` and ``val_metric``), which the summary uses to select an
    evaluation (the training part never contains the validation part).
    """
    opts = dict(cfg.options)
    ds = cached_dataset(opts["dataset"], cfg.split, **dict(opts.get("dataset_kwargs", {})))
    declared = get_dataset(opts["dataset"]).task
    if ds.task != declared:
        raise ValueError(
            f"data set {opts['dataset']!r} is registered with task={declared!r} but its loader "
            f"returned task={ds.task!r}; fix the register_dataset(..., task=...) declaration."
        )
    loss = loss_for(ds)
    hp = dict(cfg.hparams)
    batch = int(hp.get("batch_size", cfg.batch_size or 128))
    if batch > ds.n_train:
        raise ValueError(f"batch_size={batch} exceeds the {ds.n_train} training examples.")
    dp = devices.current()  # --devices N: batch rows over N devices, the rest replicated
    dp.check_batch(batch)
    key = jax.random.PRNGKey(cfg.seed)
    init_key, step_key = jax.random.split(key)
    model_kw = {}
    if opts.get("model", "mlp") == "mlp":
        model_kw = {
            "hidden": tuple(opts.get("hidden", (32, 64, 32))),
            "activation": opts.get("activation", "relu"),
        }
    model_fn, params = make_model(
        opts.get("model", "mlp"), init_key, ds.x_train.shape[1:], ds.num_outputs, **model_kw
    )
    x_all, y_all = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if opts.get("dtype") is not None:  # e.g. "float64" (needs jax_enable_x64)
        params, x_all, y_all = _cast(opts["dtype"], params, x_all, y_all)
    opt = get_optimizer(cfg.optimizer).build(model_fn, loss, hp)
    state = opt.init(params)
    params, state, x_all, y_all = dp.replicate((params, state, x_all, y_all))
    eval_batch = int(opts.get("eval_batch", 2048))
    evaluate_split = _make_eval(model_fn, ds, loss, eval_batch)
    # test runs are also scored on the validation part (held out of training in every run), so
    # the summary can pick an evaluation by validation score, never by the test score
    evaluate_val = (
        _make_eval(model_fn, ds, loss, eval_batch, part="val")
        if cfg.split == "test" and ds.n_val
        else None
    )

    def evaluate(params):
        out = evaluate_split(params)
        return {**out, **evaluate_val(params)} if evaluate_val is not None else out

    def chunk(params, state, x_all, y_all, idx, start):
        def body(carry, inp):
            p, s = carry
            i, t = inp
            xb, yb = dp.constrain((x_all[i], y_all[i]))
            p, s, info = opt.step(p, s, xb, yb, jax.random.fold_in(step_key, t))
            trace = {k: jnp.asarray(info[k], jnp.float32) for k in _TRACE_KEYS if k in info}
            return (p, s), trace

        steps = start + jnp.arange(idx.shape[0])
        (params, state), trace = jax.lax.scan(body, (params, state), (idx, steps))
        return params, state, trace

    eval_every = max(1, int(cfg.eval_every))
    lengths = {min(eval_every, cfg.steps)}
    if cfg.steps % eval_every:
        lengths.add(cfg.steps % eval_every)
    t0 = time.perf_counter()
    compiled = {
        n: jax.jit(chunk)
        .lower(
            params, state, x_all, y_all, dp.shard(jnp.zeros((n, batch), jnp.int32), 1), jnp.int32(0)
        )
        .compile()
        for n in lengths
    }
    evaluate(params)  # compile the evaluation too
    compile_time = time.perf_counter() - t0

    base = {
        "n_params": count_params(params),
        "batch_size": batch,
        "epoch_steps": ds.n_train // batch,
        "compile_time": compile_time,
    }
    t = time.perf_counter()
    row = {"step": 0, "epoch": 0.0, "train_time": 0.0, **evaluate(params)}
    eval_time = time.perf_counter() - t
    yield {**base, **row, "eval_time": eval_time}

    train_time, step, rejected = 0.0, 0, 0
    while step < cfg.steps:
        n = min(eval_every, cfg.steps - step)
        idx = dp.shard(jnp.asarray(_batch_indices(ds.n_train, batch, cfg.seed, step, n)), 1)
        t = time.perf_counter()
        params, state, trace = compiled[n](params, state, x_all, y_all, idx, jnp.int32(step))
        jax.block_until_ready((params, state, trace))
        params, state = dp.replicate((params, state))  # no-op unless XLA chose other shardings
        train_time += time.perf_counter() - t
        step += n
        trace = {k: [float(f"{x:.5g}") for x in np.asarray(v).tolist()] for k, v in trace.items()}
        rejected += int(sum(trace.get("rejected", [])))
        t = time.perf_counter()
        m = evaluate(params)
        eval_time += time.perf_counter() - t
        losses = [v for v in trace.get("loss", []) if math.isfinite(v)]
        row = {
            "step": step,
            "epoch": step / base["epoch_steps"],
            "train_time": train_time,
            "eval_time": eval_time,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "rejected": rejected,
            **m,
        }
        if cfg.split == "test" and opts.get("trace", True):
            # per-step optimizer info (test runs only), thinned to <= 50 steps per evaluation
            stride = max(1, math.ceil(n / 50))
            row["trace"] = {k: v[stride - 1 :: stride] for k, v in trace.items() if k != "rejected"}
            row["trace_stride"] = stride
        for k in ("step_size", "damping"):
            if k in trace and trace[k]:
                row[k] = trace[k][-1]
        yield row
        if not math.isfinite(m["metric"]):
            return  # diverged: stop this run (recorded as such)
        if cfg.time_budget is not None and train_time >= cfg.time_budget:
            return


# EGN defaults of every supervised experiment (below an experiment's own ``hparams``): adaptive
# variants keep λ >= λ₀ = 0.3 (the library's λ₀ = 1e-3 without a floor collapses on small batches:
# the row-space step then interpolates each batch; docs/results.md), constant-λ variants use λ = 1.
SUPERVISED_EGN_DEFAULTS: dict[str, dict[str, Any]] = {
    "egn": {"damping": 0.3, "damping_min": 0.3},
    "egn-adaptive": {"damping": 0.3, "damping_min": 0.3},
    "egn-momentum": {"damping": 0.3, "damping_min": 0.3},
    "egn-fixed": {"damping": 1.0},
    "egn-ls": {"damping": 1.0},
}


# the ``cfg.options`` names :func:`run_supervised` reads (``--option NAME=VALUE``)
SUPERVISED_OPTIONS = (
    "dataset",
    "model",
    "dataset_kwargs",
    "hidden",
    "activation",
    "eval_batch",
    "trace",
    "dtype",
)


def supervised_experiment(
    dataset: str,
    *,
    model: str = "mlp",
    description: str = "",
    target: float | None = None,
    steps: int = 1000,
    seeds: int = 3,
    batch_size: int = 128,
    eval_every: int = 50,
    optimizers: tuple[str, ...] = ("egn", "adam", "sgd"),
    time_budget: float | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> ExperimentSpec:
    """An :class:`ExperimentSpec` training ``model`` on ``dataset`` with :func:`run_supervised`.

    The metric follows the data set's registered ``task`` (``register_dataset(..., task=...)``):
    ``test_rmse`` (lower is better) for a regression, ``test_accuracy`` (higher) otherwise.
    """
    ds_task = get_dataset(dataset).task
    return ExperimentSpec(
        run=run_supervised,
        description=description,
        metric="test_rmse" if ds_task == "regression" else "test_accuracy",
        higher_is_better=ds_task != "regression",
        target=target,
        default_optimizers=optimizers,
        default_steps=steps,
        default_seeds=seeds,
        default_batch_size=batch_size,
        default_eval_every=eval_every,
        default_time_budget=time_budget,
        default_hparams={
            name: {**SUPERVISED_EGN_DEFAULTS.get(name, {}), **(hparams or {}).get(name, {})}
            for name in {*SUPERVISED_EGN_DEFAULTS, *(hparams or {})}
        },
        options={"dataset": dataset, "model": model, **options},
        option_keys=SUPERVISED_OPTIONS,
        extra={"dataset": dataset, "model": model},
    )


_BUILTIN = {
    "california_housing": supervised_experiment(
        "california_housing",
        description="EGN (fixed step; Armijo + adaptive λ) vs Adam vs SGD, regression MLP, test "
        "RMSE (100k USD) - the main job",
        target=0.6,
        steps=1_000_000,  # an upper bound: each run trains for 10 s (equal wall-clock)
        time_budget=10.0,
        seeds=3,
        eval_every=200,
        optimizers=("egn-fixed", "egn", "adam", "sgd"),
        # winners of `--tune --time-budget 10` (docs/results.md); batch 128 for Adam / SGD
        hparams={
            "egn-fixed": {"learning_rate": 0.3, "damping": 0.1, "batch_size": 32},
            "egn": {"learning_rate": 1.0, "damping": 0.3, "damping_min": 0.3, "batch_size": 32},
            "adam": {"learning_rate": 0.01},
            "sgd": {"learning_rate": 0.05},
        },
    ),
    "diamonds": supervised_experiment(
        "diamonds", description="regression MLP, test RMSE (USD)", target=800.0, steps=1500
    ),
    "bikeshare": supervised_experiment(
        "bikeshare", description="regression MLP, test RMSE (riders/hour)", target=60.0
    ),
    "adult": supervised_experiment(
        "adult", description="binary classification MLP, test accuracy", target=0.85
    ),
    "reviews": supervised_experiment(
        "reviews", description="binary text classification (TF-IDF+SVD 300) MLP", target=0.88
    ),
    "fashion_mnist": supervised_experiment(
        "fashion_mnist",
        description="10-class classification MLP on Fashion-MNIST, test accuracy",
        target=0.85,
        steps=3000,
        eval_every=100,
        # sampled curvature (one Monte-Carlo label per example): row space b instead of 10 b
        hparams={
            name: {"curvature": "sampled", "batch_size": 128}
            for name in ("egn", "egn-fixed", "egn-ls", "egn-adaptive", "egn-momentum")
        },
    ),
    "fashion_mnist_cnn": supervised_experiment(
        "fashion_mnist",
        model="cnn",
        description="small CNN on Fashion-MNIST (slow on CPU with a dense Gram)",
        target=0.85,
        steps=1000,
        eval_every=100,
        batch_size=64,
    ),
    "tiny_lm": supervised_experiment(
        "reviews_chars",
        model="transformer",
        description="next-character LM on the review texts: 1-block causal transformer (d 32, "
        "2 heads), token accuracy; EGN with sampled curvature (m = 1, row space b·T)",
        # token accuracy 0.3: the level Adam reaches in these 300 steps (set after the first run;
        # predicting the most frequent character, a space, scores 0.20)
        target=0.3,
        steps=300,
        seeds=1,
        batch_size=32,
        eval_every=50,
        eval_batch=500,
        optimizers=("egn", "adam", "sgd"),
        # hand-set (not tuned): EGN keeps the supervised defaults (Armijo, λ₀ = λ_min = 0.3)
        hparams={
            "egn": {"curvature": "sampled", "num_samples": 1},
            "adam": {"learning_rate": 3e-3},
            "sgd": {"learning_rate": 0.3},
        },
    ),
    "digits": supervised_experiment(
        "digits", description="10-class MLP on 8x8 digits (fast)", target=0.95, steps=500
    ),
    "digits_cnn": supervised_experiment(
        "digits", model="cnn", description="small CNN on 8x8 digits", target=0.95, steps=300
    ),
    "sine": supervised_experiment(
        "sine",
        description="sin(10 x) regression, MLP, batch 1000",
        target=0.05,
        steps=1000,
        batch_size=1000,
    ),
    "sine_hard": supervised_experiment(
        "sine",
        description="sin(30 x) regression, MLP, batch 1000",
        target=0.1,
        steps=1000,
        batch_size=1000,
        dataset_kwargs={"omega": 30.0},
    ),
}
for _name, _spec in _BUILTIN.items():
    register_experiment(_name, _spec)
