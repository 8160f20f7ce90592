"""Per-piece cost of the default EGN step (``gn.egn(model, loss=...)``) on one reference problem.

Each piece is jitted on its own and timed (median, interleaved rounds), with its first-call
(trace + compile + run) time: forward, loss + gradient (forward + VJP), the Gram of the row space,
the damped solve, the direction's VJP, the JVP ``J ∇L`` (Woodbury form), one line-search trial
(a forward pass and the loss), the gain-ratio model ``½ΔᵀHΔ`` (one JVP), the plain step and the
default step. Pieces run in separate XLA programs, so their sum over-counts the fused step.

Usage:
    python benchmarks/profile_step.py [--problem ce|reg] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from bench_gram import init_mlp, mlp_fn, timed

import gaussnewton as gn
from gaussnewton import linalg
from gaussnewton.gram import STRATEGIES, as_2d


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=("ce", "reg"), default="ce")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    if args.problem == "ce":
        sizes, loss, act = (784, 256, 256, 10), "softmax_cross_entropy", "relu"
    else:
        sizes, loss, act = (8, 256, 256, 1), "squared_error", "tanh"
    b = 128
    params, f = init_mlp(kp, sizes), as_2d(mlp_fn(act))
    x = jax.random.normal(kx, (b, sizes[0]))
    if loss == "squared_error":
        y = jax.random.normal(ky, (b, sizes[-1]))
    else:
        y = jax.random.randint(ky, (b,), 0, sizes[-1])
    lo = gn.get_loss(loss)
    yy = lo.prepare_labels(f(params, x), y)
    s = None if lo.identity_curvature else lo.factor(f(params, x), yy)

    def mean_loss(p, x):
        out = f(p, x)
        return jnp.mean(lo.value(out, yy))

    grad = jax.grad(mean_loss)(params, x)

    def projected(p, xs):
        xx, ss = xs
        return f(p, xx) if ss is None else jnp.einsum("bc,bcr->br", f(p, xx), ss)

    gram = jax.jit(lambda p, xs: STRATEGIES["structured"](projected, p, xs, None))
    kmat = gram(params, (x, s))
    n = kmat.shape[0] * kmat.shape[1]
    k2 = kmat.reshape(n, n)
    rhs = jnp.ones((n,), k2.dtype)
    nt = linalg.num_tiles(n)
    edges = [round(i * n / nt) for i in range(nt + 1)]
    sizes_t = [hi - lo_ for lo_, hi in zip(edges[:-1], edges[1:], strict=True)]

    def tiled(k, r):
        def block(i, j):
            return k[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]

        return linalg.solve_tiled_spd(block, sizes_t, 0.1, r)

    cot = jnp.ones_like(f(params, x))
    pieces = {
        "forward": (jax.jit(f), (params, x)),
        "loss + grad (fwd + VJP)": (jax.jit(jax.value_and_grad(mean_loss)), (params, x)),
        "Gram (structured, full)": (gram, (params, (x, s))),
        f"solve, {nt} tiles, native": (jax.jit(tiled), (k2, rhs)),
        "VJP (direction back)": (
            jax.jit(lambda p, x, c: jax.vjp(lambda q: f(q, x), p)[1](c)),
            (params, x, cot),
        ),
        "JVP (J grad / quad model)": (
            jax.jit(lambda p, x, t: jax.jvp(lambda q: f(q, x), (p,), (t,))[1]),
            (params, x, grad),
        ),
        "line-search trial (fwd + loss)": (
            jax.jit(lambda p, x, t: mean_loss(jax.tree_util.tree_map(jnp.add, p, t), x)),
            (params, x, grad),
        ),
    }
    plain = gn.egn(f, loss=loss, damping_policy="constant", line_search=None)
    default = gn.egn(f, loss=loss)
    pieces["plain step"] = (jax.jit(plain.step), (params, plain.init(params), x, y))
    pieces["default step"] = (jax.jit(default.step), (params, default.init(params), x, y))
    # new function objects: jax caches traces per function, and the backend is read at trace time
    default_l = gn.egn(f, loss=loss)
    pieces[f"solve, {nt} tiles, lapack"] = (jax.jit(lambda k, r: tiled(k, r)), (k2, rhs))
    pieces["default step, lapack"] = (
        jax.jit(default_l.step),
        (params, default_l.init(params), x, y),
    )
    first = {}
    for name, (fn, a) in pieces.items():  # the first call traces: the backend is read then
        old = linalg.set_backend("lapack" if name.endswith("lapack") else "native")
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        first[name] = time.perf_counter() - t
        linalg.set_backend(old)
    times = {name: [] for name in pieces}
    for _ in range(4):
        for name, (fn, a) in pieces.items():
            times[name] += timed(fn, *a, reps=max(1, args.steps // 4), budget_s=1e9)
    print(f"problem {args.problem}: {sizes} b={b} {loss}, row space {n}")
    print(f"{'piece':<34} {'ms':>8} {'first call s':>13}")
    for name in pieces:
        print(f"{name:<34} {1e3 * statistics.median(times[name]):>8.2f} {first[name]:>13.2f}")


if __name__ == "__main__":
    main()
