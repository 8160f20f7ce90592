"""Why EGN's training loss on California housing is noisier than Adam's (issue #14, item 3).

Runs the configurations below on ``california_housing`` (the experiment's splits and batch order,
5000 steps, every step's mini-batch loss recorded; ``gaussnewton_experiments.criterion``) and
prints per configuration, over ``--seeds`` seeds: batches whose loss exceeds 3x the median of the
50 before (and the share of them that contain an outlying example, ``max |x_std| > 10``, against
the share of all batches that do), the largest such ratio, the criterion's 5-step spike, rejected
steps, the median training loss of the last 1000 steps, and the final test RMSE.

    PYTHONPATH=src:experiments/src python benchmarks/california_noise.py --seeds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "src"))

# label: (optimizer, hyper-parameters, batch)
CONFIGS = {
    "egn, damping=1e-3 (former default)": ("egn-default", {"damping": 1e-3}, 32),
    "egn, damping=1e-3, b 128": ("egn-default", {"damping": 1e-3}, 128),
    "egn, floor 0.01": ("egn-default", {"damping_min": 0.01}, 32),
    "egn, floor 0.1": ("egn-default", {"damping_min": 0.1}, 32),
    "egn, floor 0.3": ("egn-default", {"damping_min": 0.3}, 32),
    "egn default (λ ≥ L(w))": ("egn-default", {}, 32),
    "egn, floor 1": ("egn-default", {"damping_min": 1.0}, 32),
    "egn default, b 128": ("egn-default", {}, 128),
    "egn default, α_max 0.5": ("egn-default", {"learning_rate": 0.5}, 32),
    "egn, no line search, damping=1e-3": ("egn-adaptive", {"damping": 1e-3}, 32),
    "egn, no line search, floor 0.3": ("egn-adaptive", {"damping": 0.3, "damping_min": 0.3}, 32),
    "egn-fixed lr 0.3, λ 0.1 (tuned)": ("egn-fixed", {"learning_rate": 0.3, "damping": 0.1}, 32),
    "adam 1e-3": ("adam", {"learning_rate": 1e-3}, 32),
    "adam 1e-2 (tuned)": ("adam", {"learning_rate": 1e-2}, 32),
    "adam 1e-2, b 128": ("adam", {"learning_rate": 1e-2}, 128),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--only", default="", help="substring of a configuration ('|' for several)")
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_compilation_cache_dir", "results/.jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from gaussnewton_experiments.criterion import check_experiment, spike_ratios
    from gaussnewton_experiments.supervised import _batch_indices, cached_dataset

    ds = cached_dataset("california_housing", "test")
    outlier = np.abs(ds.x_train).max(axis=1) > 10.0
    print(
        "| configuration | batches > 3x (with an outlier) | batches with an outlier | largest "
        "batch ratio | 5-step spike | rejected | train loss (median, last 1000) | final test "
        "RMSE |\n|---|---|---|---|---|---|---|---|"
    )
    for label, (opt, hp, batch) in CONFIGS.items():
        if args.only and not any(s in label for s in args.only.split("|")):
            continue
        runs = check_experiment(
            "california_housing",
            range(args.seeds),
            steps=args.steps,
            optimizer=opt,
            hparams=hp,
            batch_size=batch,
        )
        over, with_outlier, base, tail = 0, 0, [], []
        for r in runs:
            losses = np.asarray(r["losses"])
            idx = _batch_indices(ds.n_train, batch, r["seed"], 0, len(losses))
            has = outlier[idx].any(axis=1)
            hit = np.where(spike_ratios(losses) > 3.0)[0] + 10  # min_history = 10
            over += len(hit)
            with_outlier += int(has[hit].sum())
            base.append(has.mean())
            tail.append(np.median(losses[-1000:]))
        finals = [r["final"] for r in runs]
        print(
            f"| {label} | {over} ({with_outlier / max(over, 1):.0%}) | {np.mean(base):.0%} "
            f"| {max(r['spike_1'] for r in runs):.0f} | {max(r['spike'] for r in runs):.1f} "
            f"| {sum(r['rejected'] for r in runs)} / {sum(r['steps'] for r in runs)} "
            f"| {np.mean(tail):.3f} | {np.mean(finals):.3f} ± {np.std(finals):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
