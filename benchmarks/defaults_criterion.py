"""Issue #14's defaults criterion: library-default ``gn.egn`` on the registered tabular sets.

For each experiment (default: california_housing, diamonds, bikeshare, adult, reviews; see
``gaussnewton_experiments.criterion.TABULAR`` for the steps of each) and each seed, one run of
``gn.egn(model_fn, loss=loss)`` (optimizer ``egn-default``: the library's defaults, only the model
and the loss given) through the experiment's own splits and training loop (a validation part held
out of training), evaluated every 50 steps. Reported per run: the final test metric, the test
metric at the best-VALIDATION evaluation, their error ratio (error = RMSE, or 1 - accuracy), the
largest training mini-batch loss over the median of the 50 before it, rejected steps, λ, and
PASS (error ratio <= 2 and spike <= 10) or FAIL.

    PYTHONPATH=src:experiments/src python benchmarks/defaults_criterion.py --out results/defaults
    python benchmarks/defaults_criterion.py --experiments california_housing --seeds 2 \\
        --set damping_min=0.01 --set batch_size=128        # a targeted run
    python benchmarks/defaults_criterion.py --optimizer adam --experiments california_housing
    python benchmarks/defaults_criterion.py --float64      # parameters and data in float64

Writes ``OUT/criterion.json`` (every run, with its per-step training losses) and
``OUT/criterion.md`` (the table, the command, the machine and the date) when ``--out`` is given.
Exit status 0 when every run passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "src"))


def _value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default="", help="comma list (default: the tabular sets)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="override every experiment's steps")
    ap.add_argument("--optimizer", default="egn-default")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="hyper-parameter of the optimizer (e.g. damping_min=0.01, batch_size=128)",
    )
    ap.add_argument("--float64", action="store_true", help="parameters and data in float64")
    ap.add_argument("--out", default="", help="folder for criterion.json / criterion.md")
    ap.add_argument(
        "--jax-cache",
        default="results/.jax_cache",
        help="persistent compilation cache: the seeds of one experiment compile the "
        "same programs ('' = none)",
    )
    args = ap.parse_args(argv)  # fmt: skip

    import jax

    if args.float64:
        jax.config.update("jax_enable_x64", True)
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from gaussnewton_experiments.criterion import TABULAR, check_experiment, markdown_table

    names = [n for n in args.experiments.split(",") if n] or list(TABULAR)
    hp = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep or not k:
            ap.error(f"--set expects NAME=VALUE, got {item!r}")
        hp[k] = _value(v)
    batch = hp.pop("batch_size", None)
    options = {"dtype": "float64"} if args.float64 else {}
    t0 = time.time()
    results = []
    for name in names:
        res = check_experiment(
            name,
            range(args.seeds),
            steps=args.steps or None,
            optimizer=args.optimizer,
            hparams=hp,
            batch_size=batch,
            options=options,
        )
        results.extend(res)
        for r in res:
            print(
                f"{name:20s} seed {r['seed']} final {r['final']:.4g} at-best-val "
                f"{r['at_best_val']:.4g} ratio {r['error_ratio']:.2f} spike {r['spike']:.1f} "
                f"(step {r['spike_step']}; {r['spikes_over_3']} steps > 3x) rejected {r['rejected']} λ min {r['lam_min']:.2g} "
                f"{'PASS' if r['pass'] else 'FAIL'} [{r['wall_s']} s]",
                flush=True,
            )
    table = markdown_table(results)
    passed = sum(r["pass"] for r in results)
    command = "python benchmarks/defaults_criterion.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    stamp = (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {_machine()}, "
        f"{time.time() - t0:.0f} s; {passed}/{len(results)} runs pass"
    )
    print(table)
    print(stamp)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "criterion.json").write_text(
            json.dumps({"command": command, "stamp": stamp, "runs": results}, indent=1)
        )
        (out / "criterion.md").write_text(f"```bash\n{command}\n```\n\n{stamp}\n\n{table}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
