"""Long float32 EGN runs with adaptive damping: which λ floor (and reject jump) keeps them stable.

Measures, for each ``AdaptiveDamping`` setting, a run of ``--steps`` default ``gn.egn`` steps
(``solver="auto"``, Armijo line search, adaptive λ from ``λ₀ = 1e-3``) in float32:

* ``regression``: tanh MLP 8-32-32-1 on california_housing (standardised), squared error,
  mini-batches of b = 64 drawn with replacement from the training split (``--batch fixed``: one
  fixed batch, the interpolation regime where λ falls to its floor fastest);
* ``classification``: tanh MLP 64-32-32-10 on sklearn digits (8x8 flattened), softmax CE, b = 64.

Reported per setting: the fraction of rejected steps (non-finite direction / loss), the smallest
and the last λ, the running minimum of the mini-batch loss (a 50-step moving average) and its
last value (mean of the last 50 steps), and the full-training-set loss at the end. The whole run
is one ``lax.scan`` (one compilation per setting).

    python benchmarks/damping_floor.py                       # both problems, all settings
    python benchmarks/damping_floor.py --problem regression --steps 3000 --batch fixed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "src"))

import gaussnewton as gn  # noqa: E402


def mlp(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def init(key, sizes, dtype=jnp.float32):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), dtype) / np.sqrt(m),
            "b": jnp.zeros(n, dtype),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def load(problem: str):
    from gaussnewton_experiments import datasets

    if problem == "regression":
        ds = datasets.load_california_housing()
        x, y = ds.x_train.astype(np.float32), ds.y_train.astype(np.float32).reshape(-1)
        return x, y, "squared_error", [x.shape[1], 32, 32, 1]
    ds = datasets.load_digits()
    x = ds.x_train.reshape(ds.x_train.shape[0], -1).astype(np.float32)
    return x, ds.y_train.astype(np.int32), "softmax_cross_entropy", [x.shape[1], 32, 32, 10]


def run(problem, policy, steps, batch, seed=0, b=64, dtype=jnp.float32):
    x, y, loss, sizes = load(problem)
    x, y = jnp.asarray(x, dtype), jnp.asarray(y) if y.dtype == np.int32 else jnp.asarray(y, dtype)
    fn = (lambda p, xx: mlp(p, xx)[:, 0]) if loss == "squared_error" else mlp
    params = init(jax.random.key(seed), sizes, dtype)
    opt = gn.egn(fn, loss=loss, damping_policy=policy)
    state = opt.init(params)
    n = x.shape[0]
    if batch == "fixed":
        idx = jnp.broadcast_to(jnp.arange(b), (steps, b))
    else:
        idx = jax.random.randint(jax.random.key(seed + 1), (steps, b), 0, n)

    def body(carry, i):
        p, s = carry
        p, s, info = opt.step(p, s, x[i], y[i])
        return (p, s), (info.loss, info.damping, info.rejected)

    @jax.jit
    def go(params, state):
        (p, _), hist = jax.lax.scan(body, (params, state), idx)
        return p, hist

    t0 = time.perf_counter()
    p, (losses, lams, rejected) = jax.block_until_ready(go(params, state))
    seconds = time.perf_counter() - t0
    out = np.asarray(fn(p, x))
    if loss == "squared_error":
        full = float(np.mean((out - np.asarray(y)) ** 2) / 2)
    else:
        z = out - out.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        full = float(-np.mean(logp[np.arange(len(y)), np.asarray(y)]))
    losses = np.asarray(losses, np.float64)
    ma = np.convolve(losses, np.ones(50) / 50, mode="valid")
    return {
        "problem": problem,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
        "policy": dataclasses.asdict(policy),
        "steps": steps,
        "rejected_fraction": float(np.mean(np.asarray(rejected))),
        "rejected_last_1000": float(np.mean(np.asarray(rejected)[-1000:])),
        "lam_min": float(np.min(lams)),
        "lam_last": float(lams[-1]),
        "loss_ma_min": float(ma.min()),
        "loss_ma_last": float(ma[-1]),
        "full_train_loss": full,
        "seconds": round(seconds, 1),
    }


SETTINGS = {
    "library default": {},
    "old (min 1e-8, reject x1.5)": dict(min=1e-8, reject_increase=1.5),
    "min 1e-8, reject x10": dict(min=1e-8, reject_increase=10.0),
    "min 1e-6, reject x1.5": dict(min=1e-6, reject_increase=1.5),
    "min 1e-6, reject x10": dict(min=1e-6, reject_increase=10.0),
    "min 1e-5, reject x10": dict(min=1e-5, reject_increase=10.0),
    "min 1e-4, reject x10": dict(min=1e-4, reject_increase=10.0),
    "min 1e-3 (= λ₀), reject x10": dict(min=1e-3, reject_increase=10.0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=["regression", "classification", "both"], default="both")
    ap.add_argument("--batch", choices=["random", "fixed"], default="random")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--only", default="", help="substring of a setting name ('|' for several)")
    ap.add_argument("--float64", action="store_true", help="the same runs in float64")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.float64 else jnp.float32
    problems = ["regression", "classification"] if args.problem == "both" else [args.problem]
    rows = []
    for problem in problems:
        for name, kw in SETTINGS.items():
            if args.only and not any(s in name for s in args.only.split("|")):
                continue
            fields = {f.name for f in dataclasses.fields(gn.AdaptiveDamping)}
            if kw and "eps_floor" in fields:
                kw = {"eps_floor": 0.0, **kw}  # the λ_min of the row, not the dtype floor
            kw = {k: v for k, v in kw.items() if k in fields}
            row = run(problem, gn.AdaptiveDamping(**kw), args.steps, args.batch, dtype=dtype)
            row["setting"] = name
            rows.append(row)
            print(
                f"{problem:14s} {args.batch:6s} {name:28s} rejected {row['rejected_fraction']:6.1%}"
                f" (last 1000: {row['rejected_last_1000']:6.1%})  λ min {row['lam_min']:.1e}"
                f" last {row['lam_last']:.1e}  loss(ma50) min {row['loss_ma_min']:.4f}"
                f" last {row['loss_ma_last']:.4f}  train {row['full_train_loss']:.4f}"
                f"  [{row['seconds']} s]",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
