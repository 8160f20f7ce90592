"""Where the first-step time of the default EGN step goes: Python trace, lowering, XLA compile.

Usage:
    python benchmarks/compile_breakdown.py [--problem ce|reg] [--backend native|lapack]
        [--leaf ROWS] [--only-default]
"""

from __future__ import annotations

import argparse
import time

import jax
from bench_gram import adam_reference, init_mlp, mlp_fn

import gaussnewton as gn
from gaussnewton import linalg


def breakdown(fn, *args) -> dict:
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    text = lowered.as_text()
    return {
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "compile_s": t3 - t2,
        "while_loops": text.count("stablehlo.while"),
        "custom_calls": text.count("stablehlo.custom_call"),
        "hlo_lines": text.count("\n"),
        "_compiled": compiled,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=("ce", "reg"), default="ce")
    ap.add_argument("--backend", choices=linalg.BACKENDS, default="native")
    ap.add_argument("--leaf", type=int, default=None, help="linalg.LEAF_ROWS for this run")
    ap.add_argument("--only-default", action="store_true", help="Adam and the default step only")
    args = ap.parse_args(argv)
    linalg.set_backend(args.backend)
    if args.leaf:
        linalg.LEAF_ROWS = args.leaf
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    if args.problem == "ce":
        sizes, loss, act = (784, 256, 256, 10), "softmax_cross_entropy", "relu"
        y = jax.random.randint(ky, (128,), 0, 10)
    else:
        sizes, loss, act = (8, 256, 256, 1), "squared_error", "tanh"
        y = jax.random.normal(ky, (128, 1))
    params, f = init_mlp(kp, sizes), mlp_fn(act)
    x = jax.random.normal(kx, (128, sizes[0]))
    adam, adam_step = adam_reference(f, loss)

    rows = {"adam": breakdown(adam_step, params, adam.init(params), x, y)}
    cfgs = {
        "egn plain": dict(damping_policy="constant", line_search=None),
        "egn adaptive, no line search": dict(line_search=None),
        "egn armijo, constant damping": dict(damping_policy="constant"),
        "egn default": {},
    }
    if args.only_default:
        cfgs = {"egn default": {}}
    for name, kw in cfgs.items():
        opt = gn.egn(f, loss=loss, **kw)
        rows[name] = breakdown(opt.step, params, opt.init(params), x, y)
    print(f"problem {args.problem}, backend {args.backend}, leaf rows {linalg.LEAF_ROWS}")
    print(f"{'step':<30} {'trace s':>8} {'lower s':>8} {'compile s':>10} {'while':>6} {'lines':>7}")
    for name, r in rows.items():
        print(
            f"{name:<30} {r['trace_s']:>8.2f} {r['lower_s']:>8.2f} {r['compile_s']:>10.2f} "
            f"{r['while_loops']:>6} {r['hlo_lines']:>7}"
        )


if __name__ == "__main__":
    main()
