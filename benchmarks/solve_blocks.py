"""Plain EGN step time for several solve block sizes (``linalg.TILE_ROWS``, ``linalg.LEAF_ROWS``).

One process, side by side with Adam: for each ``TILE,LEAF`` pair a fresh ``gn.egn`` plain step
(structured Gram, constant λ, no line search) is built with those module constants, compiled
(first-call time reported) and then all steps are timed in interleaved rounds (median).

Usage:
    python benchmarks/solve_blocks.py --problem ce 288,160 288,80 288,36
    python benchmarks/solve_blocks.py --problem reg 288,160 288,80 288,32
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from bench_gram import adam_reference, init_mlp, mlp_fn, timed

import gaussnewton as gn
from gaussnewton import linalg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=("ce", "reg"), default="ce")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("configs", nargs="+", help="TILE_ROWS,LEAF_ROWS pairs, e.g. 288,80")
    args = ap.parse_args(argv)
    if args.problem == "ce":
        sizes, loss, act = (784, 256, 256, 10), "softmax_cross_entropy", "relu"
    else:
        sizes, loss, act = (8, 256, 256, 1), "squared_error", "tanh"
    b = 128
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    params, f = init_mlp(kp, sizes), mlp_fn(act)
    x = jax.random.normal(kx, (b, sizes[0]))
    if loss == "squared_error":
        y = jax.random.normal(ky, (b, 1))
    else:
        y = jax.random.randint(ky, (b,), 0, sizes[-1])
    adam, adam_step = adam_reference(f, loss)
    adam_state, adam_step = adam.init(params), jax.jit(adam_step)

    steps = {}
    for config in args.configs:
        tile, leaf = (int(v) for v in config.split(","))
        linalg.TILE_ROWS, linalg.LEAF_ROWS = tile, leaf  # read when the step is traced
        opt = gn.egn(f, loss=loss, gram="structured", damping_policy="constant", line_search=None)
        state, step = opt.init(params), jax.jit(opt.step)
        t = time.perf_counter()
        jax.block_until_ready(step(params, state, x, y))
        steps[tile, leaf] = (step, state, time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(adam_step(params, adam_state, x, y))
    adam_first = time.perf_counter() - t
    times = {k: [] for k in steps}
    adam_times = []
    for _ in range(args.rounds):
        adam_times += timed(adam_step, params, adam_state, x, y, reps=10, budget_s=1e9)
        for k, (step, state, _) in steps.items():
            times[k] += timed(step, params, state, x, y, reps=10, budget_s=1e9)
    adam_ms = 1e3 * statistics.median(adam_times)
    print(f"problem {args.problem}: adam {adam_ms:.3f} ms, first call {adam_first:.2f} s")
    print(f"{'tile':>5} {'leaf':>5} {'EGN ms':>8} {'/ Adam':>7} {'first call s':>13}")
    for (tile, leaf), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        print(f"{tile:>5} {leaf:>5} {ms:>8.2f} {ms / adam_ms:>7.2f} {steps[tile, leaf][2]:>13.2f}")


if __name__ == "__main__":
    main()
