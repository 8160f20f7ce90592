"""Gram strategies and EGN step cost on the reference MLPs (protocol: benchmarks/README.md).

For each problem it measures, in ONE process and side by side:

* the Gram time ``K = J Jᵀ`` of the model outputs per strategy (jacobian / matvec / structured),
* the EGN step time (``gn.egn(..., gram="structured")``) over the Adam step time (optax.adam),
  both jitted, median of >= 20 steps after warm-up, interleaved in rounds,
* the peak memory of the compiled EGN step from XLA's memory analysis
  (arguments + outputs + temporaries - aliased bytes),
* the DEFAULT step as a user calls it (``gn.egn(model, loss=...)``: Armijo line search, adaptive
  damping, ``gram="auto"``) over Adam, timed after ``WARM`` default steps on fresh batches (where
  λ and α have adapted; the line-search trials of the timed step are reported), and the first-call
  (trace + compile + run) time of both, and the same default step called without ``jax.jit``
  (concrete arrays, as a user who forgets it would: the step compiles itself),
* on small models (``D`` parameters < ``b r`` rows: LQR quadratic features, the sine MLP) the
  plain step with the row-space and with the parameter-space solve
  (:mod:`gaussnewton.param_space`),
* the BLAS libraries loaded and their thread counts (threadpoolctl), before and after,
* the floating-point work of the compiled plain EGN step over Adam's (XLA's cost analysis, which
  counts a while-loop body once): the ratio a step time cannot beat at equal flop rate.

``--readme README.md`` rewrites the README's performance table (the block between
``<!-- results:begin perf -->`` and ``<!-- results:end perf -->``) from the rows of this run,
with the command, the date, the machine and its load.

The process does NO thread set-up (as a user's would) unless ``--limit-blas`` is given.

Usage:
    python benchmarks/bench_gram.py [--quick] [--out results.json] [--steps 20] [--only NAME]
        [--limit-blas] [--skip-gram] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gaussnewton as gn
from gaussnewton import linalg
from gaussnewton.gram import STRATEGIES, as_2d
from gaussnewton.param_space import choose_space, param_space_direction

#: default steps run on the batch before the default step is timed (see run_problem)
WARM = 20


@dataclass(frozen=True)
class Problem:
    name: str
    sizes: tuple[int, ...]
    batch: int
    loss: str
    act: str = "tanh"
    curvature: str = "exact"
    strategies: tuple[str, ...] = ("jacobian", "matvec", "structured")
    model: str = "mlp"  # or "cnn": sizes = (H, W, C_in, ..., classes), see init_cnn


def problems(quick: bool) -> list[Problem]:
    if quick:
        return [
            Problem("reg 8-256-256-1 b=32", (8, 256, 256, 1), 32, "squared_error"),
            Problem("reg 8-256-256-1 b=128", (8, 256, 256, 1), 128, "squared_error"),
        ]
    ce, se = "softmax_cross_entropy", "squared_error"
    return [
        Problem("reg 8-256-256-1 b=32", (8, 256, 256, 1), 32, se),
        Problem("reg 8-256-256-1 b=128", (8, 256, 256, 1), 128, se),
        Problem("reg 8-256-256-1 b=512", (8, 256, 256, 1), 512, se),
        Problem("cls 784-256-256-10 b=128 CE", (784, 256, 256, 10), 128, ce, "relu"),
        Problem(
            "cls 784-1000-1000-10 b=128 CE",
            (784, 1000, 1000, 10),
            128,
            ce,
            "relu",
            "exact",
            ("structured",),
        ),
        Problem(
            "cls 784-256-256-1000 b=128 CE sampled m=1",
            (784, 256, 256, 1000),
            128,
            ce,
            "relu",
            "sampled",
            (),  # the Gram of all 1000 outputs would be (128000)^2 entries: never formed
        ),
        Problem(
            "cnn 28x28 c16-c16-d32-10 b=128 CE sampled m=1",
            (28, 28, 1, 10),
            128,
            ce,
            "relu",
            "sampled",
            ("jacobian", "structured"),
            "cnn",
        ),
        Problem(
            "reg 784-256-256-1000 b=128 SE sampled m=1 (same model)",
            (784, 256, 256, 1000),
            128,
            se,
            "relu",
            "sampled",
            (),
        ),
        Problem(
            "reg 784-256-256-1 b=128 (same trunk)",
            (784, 256, 256, 1),
            128,
            se,
            "relu",
            "exact",
            ("structured",),
        ),
    ]


def mlp_fn(act: str) -> Callable:
    a = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act]

    def f(params, x):
        for layer in params[:-1]:
            x = a(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return f


def init_mlp(key, sizes):
    """LeCun-normal weights, zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros((n,))}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def init_cnn(key, image_and_classes):
    """Conv 16 3x3 -> ReLU -> maxpool 2 -> Conv 16 3x3 -> ReLU -> maxpool 2 -> Dense 32 -> 10."""
    h, w, c, classes = image_and_classes
    k = jax.random.split(key, 4)
    flat = (h // 4) * (w // 4) * 16
    return {
        "c1": {"w": jax.random.normal(k[0], (3, 3, c, 16)) / np.sqrt(9 * c), "b": jnp.zeros(16)},
        "c2": {"w": jax.random.normal(k[1], (3, 3, 16, 16)) / np.sqrt(144), "b": jnp.zeros(16)},
        "d1": {"w": jax.random.normal(k[2], (flat, 32)) / np.sqrt(flat), "b": jnp.zeros(32)},
        "d2": {"w": jax.random.normal(k[3], (32, classes)) / np.sqrt(32), "b": jnp.zeros(classes)},
    }


def cnn_fn(params, x):
    dn = ("NHWC", "HWIO", "NHWC")
    for layer in (params["c1"], params["c2"]):
        x = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME", dimension_numbers=dn)
        x = jax.nn.relu(x + layer["b"])
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["d1"]["w"] + params["d1"]["b"])
    return x @ params["d2"]["w"] + params["d2"]["b"]


def timed(fn: Callable, *args, reps: int, budget_s: float) -> list[float]:
    """Times of ``reps`` calls (fewer once ``budget_s`` is spent, at least 3)."""
    out, spent = [], 0.0
    for i in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t
        out.append(dt)
        spent += dt
        if spent > budget_s and i >= 2:
            break
    return out


def peak_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def flops(compiled) -> float | None:
    """XLA's flop count of a compiled program (a while-loop body is counted once)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    return float(value) if value else None


def first_call_s(fn: Callable, *args) -> float:
    """Seconds of the first call of a fresh ``jax.jit`` function: trace + compile + one run."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def adam_reference(f: Callable, loss: str, lr: float = 1e-3):
    """``(optax.adam(lr), step)``: the Adam step every ratio is taken against (not jitted),
    ``step(params, opt_state, x, y) -> (params, opt_state, loss)`` on the mean of ``loss``."""
    lo, adam = gn.get_loss(loss), optax.adam(lr)

    def step(params, opt_state, x, y):
        def loss_fn(q):
            out = f(q, x)
            return jnp.mean(lo.value(out, lo.prepare_labels(out, y)))

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return adam, step


def random_batch(p: Problem, key) -> tuple[jax.Array, jax.Array]:
    """``(x, y)`` of problem ``p``: normal inputs (uniform images), normal targets or uniform
    labels."""
    kx, ky = jax.random.split(key)
    if p.model == "cnn":
        x = jax.random.uniform(kx, (p.batch, *p.sizes[:-1]))
    else:
        x = jax.random.normal(kx, (p.batch, p.sizes[0]))
    if p.loss == "squared_error":
        return x, jax.random.normal(ky, (p.batch, p.sizes[-1]))
    return x, jax.random.randint(ky, (p.batch,), 0, p.sizes[-1])


def run_problem(p: Problem, steps: int, quick: bool, skip_gram: bool = False) -> dict:
    key = jax.random.PRNGKey(0)
    kp, kd = jax.random.split(key)
    if p.model == "cnn":
        params, f = init_cnn(kp, p.sizes), cnn_fn
    else:
        params, f = init_mlp(kp, p.sizes), mlp_fn(p.act)
    x, y = random_batch(p, kd)
    row = {
        "problem": p.name,
        "params": int(sum(a.size for a in jax.tree_util.tree_leaves(params))),
        "batch": p.batch,
        "outputs": p.sizes[-1],
        "loss": p.loss,
        "curvature": p.curvature,
        "gram_ms": {},
    }

    # Gram of the model outputs per strategy.
    f2 = as_2d(f)
    for s in () if skip_gram else p.strategies:
        g = jax.jit(lambda params, x, s=s: STRATEGIES[s](f2, params, x, None))
        jax.block_until_ready(g(params, x))
        times = timed(g, params, x, reps=5 if quick else 10, budget_s=10.0)
        row["gram_ms"][s] = 1e3 * statistics.median(times)
        print(f"  gram {s:>10}: {row['gram_ms'][s]:9.2f} ms ({len(times)} runs)", flush=True)

    # EGN step (structured Gram, fixed step and damping) vs Adam step, interleaved.
    opt = gn.egn(
        f,
        loss=p.loss,
        gram="structured",
        learning_rate=1.0,
        damping=1e-3,
        damping_policy="constant",
        line_search=None,
        curvature=p.curvature,
        num_samples=1,
    )
    state = (
        opt.init(params, key=jax.random.PRNGKey(1))
        if p.curvature == "sampled"
        else opt.init(params)
    )
    egn_step = jax.jit(opt.step)
    adam, adam_step = adam_reference(f, p.loss)
    adam_state = adam.init(params)
    adam_step = jax.jit(adam_step)

    # The default step as a user calls it, and the first-call (compile) time of it and Adam.
    # These are measured first, on fresh jit functions, so no cache is warm.
    default = gn.egn(f, loss=p.loss, curvature=p.curvature)
    default_state = default.init(params, key=jax.random.PRNGKey(1))
    default_step = jax.jit(default.step)
    row["adam_first_call_s"] = first_call_s(adam_step, params, adam_state, x, y)
    row["egn_default_first_call_s"] = first_call_s(default_step, params, default_state, x, y)
    row["compile_egn_over_adam"] = row["egn_default_first_call_s"] / row["adam_first_call_s"]
    print(
        f"  first call: egn default {row['egn_default_first_call_s']:.1f} s, "
        f"adam {row['adam_first_call_s']:.1f} s ({row['compile_egn_over_adam']:.1f}x)",
        flush=True,
    )

    compiled = egn_step.lower(params, state, x, y).compile()
    adam_compiled = adam_step.lower(params, adam_state, x, y).compile()
    row["egn_step_peak_bytes"] = peak_bytes(compiled)
    row["adam_step_peak_bytes"] = peak_bytes(adam_compiled)
    row["egn_step_flops"], row["adam_step_flops"] = flops(compiled), flops(adam_compiled)
    if row["egn_step_flops"] and row["adam_step_flops"]:
        row["flops_egn_over_adam"] = row["egn_step_flops"] / row["adam_step_flops"]
    for _ in range(3):
        jax.block_until_ready(egn_step(params, state, x, y))
        jax.block_until_ready(adam_step(params, adam_state, x, y))
    # the default step is timed where a run spends its steps, not at the initial point: from the
    # random init the first steps backtrack up to max_trials times while λ and α adapt (the
    # 1000-class sampled step took 15 trials there, 2x its steady cost); WARM steps on fresh
    # batches first (on one batch the model soon interpolates it and backtracking grows again),
    # then the timed calls repeat the step on the benchmark batch from that (params, state)
    default_params = params
    for i in range(WARM):
        xw, yw = random_batch(p, jax.random.fold_in(kd, i + 1))
        default_params, default_state, _ = default_step(default_params, default_state, xw, yw)
    _, _, dinfo = default_step(default_params, default_state, x, y)
    row["egn_default_ls_trials"] = int(dinfo.ls_trials)
    egn_t, adam_t, default_t = [], [], []
    rounds = 4
    per = max(1, -(-steps // rounds))
    for _ in range(rounds):
        egn_t += timed(egn_step, params, state, x, y, reps=per, budget_s=1e9)
        adam_t += timed(adam_step, params, adam_state, x, y, reps=per, budget_s=1e9)
        default_t += timed(
            default_step, default_params, default_state, x, y, reps=per, budget_s=1e9
        )
    row["egn_step_ms"] = 1e3 * statistics.median(egn_t)
    row["adam_step_ms"] = 1e3 * statistics.median(adam_t)
    row["egn_over_adam"] = row["egn_step_ms"] / row["adam_step_ms"]
    row["egn_default_step_ms"] = 1e3 * statistics.median(default_t)
    row["egn_default_over_adam"] = row["egn_default_step_ms"] / row["adam_step_ms"]
    row["steps_timed"] = len(egn_t)
    print(
        f"  default egn step {row['egn_default_step_ms']:.2f} ms "
        f"({row['egn_default_over_adam']:.1f}x Adam; {row['egn_default_ls_trials']} line-search "
        f"trial(s) at the timed state, after {WARM} steps)",
        flush=True,
    )
    # the same default step called as a user who forgets jax.jit would (concrete arrays): it
    # compiles itself once per optimizer and shapes (GaussNewtonOptimizer.step), not op by op
    eager = gn.egn(f, loss=p.loss, curvature=p.curvature)
    row["egn_default_nojit_first_call_s"] = first_call_s(
        eager.step, default_params, default_state, x, y
    )
    for _ in range(3):
        jax.block_until_ready(eager.step(default_params, default_state, x, y))
    nojit_t = timed(eager.step, default_params, default_state, x, y, reps=steps, budget_s=1e9)
    row["egn_default_nojit_step_ms"] = 1e3 * statistics.median(nojit_t)
    print(
        f"  default egn step without jax.jit {row['egn_default_nojit_step_ms']:.2f} ms "
        f"(first call {row['egn_default_nojit_first_call_s']:.1f} s)",
        flush=True,
    )
    print(
        f"  egn step {row['egn_step_ms']:.2f} ms, adam step {row['adam_step_ms']:.3f} ms, "
        f"ratio {row['egn_over_adam']:.1f}, egn peak {row['egn_step_peak_bytes'] / 2**20:.1f} MiB, "
        f"flops ratio {row.get('flops_egn_over_adam', float('nan')):.1f}",
        flush=True,
    )
    return row


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'problem':<42} {'jacobian ms':>12} {'matvec ms':>11} {'struct ms':>10} "
        f"{'jac/str':>8} {'EGN ms':>8} {'Adam ms':>8} {'EGN/Adam':>9} {'peak MiB':>9} "
        f"{'default ms':>10} {'dflt/Adam':>9} {'1st EGN s':>9} {'1st Adam s':>10} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        g = r["gram_ms"]

        def fmt(v, w):
            return f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}"

        ratio = g["jacobian"] / g["structured"] if "jacobian" in g else None
        print(
            f"{r['problem']:<42} {fmt(g.get('jacobian'), 12)} {fmt(g.get('matvec'), 11)} "
            f"{fmt(g.get('structured'), 10)} {fmt(ratio, 8)} {r['egn_step_ms']:>8.2f} "
            f"{r['adam_step_ms']:>8.3f} {r['egn_over_adam']:>9.1f} "
            f"{r['egn_step_peak_bytes'] / 2**20:>9.1f} {r['egn_default_step_ms']:>10.2f} "
            f"{r['egn_default_over_adam']:>9.1f} {r['egn_default_first_call_s']:>9.1f} "
            f"{r['adam_first_call_s']:>10.1f} {r['compile_egn_over_adam']:>6.1f}"
        )


# ------------------------------------------------------------------ parameter-space solve rows
@dataclass(frozen=True)
class SmallProblem:
    name: str
    model: str  # "quad": linear in the z(z+1)/2 quadratic features of z inputs; "sine": MLP
    width: int  # z for "quad"; hidden width for "sine" (three hidden layers)
    batch: int


def small_problems(quick: bool) -> list[SmallProblem]:
    rows = [
        SmallProblem("LQR quad features D=36 b=128", "quad", 8, 128),
        SmallProblem("LQR quad features D=105 b=256", "quad", 14, 256),
    ]
    if quick:
        return rows
    return [
        rows[0],
        SmallProblem("LQR quad features D=36 b=256", "quad", 8, 256),
        SmallProblem("LQR quad features D=105 b=128", "quad", 14, 128),
        rows[1],
        SmallProblem("sine MLP 1-20-20-20-1 D=901 b=1000", "sine", 20, 1000),
    ]


def small_model(p: SmallProblem, key):
    kp, kx = jax.random.split(key)
    if p.model == "quad":
        iu = np.triu_indices(p.width)

        def fn(w, x):
            return ((x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]) @ w

        params = jax.random.normal(kp, (len(iu[0]),)) / np.sqrt(len(iu[0]))
        x = jax.random.normal(kx, (p.batch, p.width))
        y = jnp.sum(x[:, :2] ** 2, axis=1) - x[:, 0] * x[:, -1]
        return fn, params, x, y
    params = init_mlp(kp, (1, p.width, p.width, p.width, 1))
    x = jax.random.uniform(kx, (p.batch, 1), minval=-np.pi, maxval=np.pi)
    fn = mlp_fn("tanh")
    return (lambda q, x: fn(q, x)[:, 0]), params, x, jnp.sin(x[:, 0])


def run_small(p: SmallProblem, steps: int) -> dict:
    """Plain LM step (constant λ, no line search, squared error) with either solve."""
    fn, params, x, y = small_model(p, jax.random.PRNGKey(0))
    lam = 1e-3
    lo = gn.get_loss("squared_error")

    @jax.jit
    def row_step(params, x, y):
        d, _ = gn.egn_direction(fn, params, x, y, loss="squared_error", damping=lam)
        return jax.tree_util.tree_map(jnp.add, params, d)

    @jax.jit
    def param_step(params, x, y):
        f = as_2d(fn)(params, x)
        g = lo.grad(f, lo.prepare_labels(f, y))
        d = param_space_direction(fn, params, x, g, None, lam)
        return jax.tree_util.tree_map(jnp.add, params, d)

    d_params = int(sum(a.size for a in jax.tree_util.tree_leaves(params)))
    out = {"problem": p.name, "params": d_params, "rows": p.batch}
    out["row_first_call_s"] = first_call_s(row_step, params, x, y)
    out["param_first_call_s"] = first_call_s(param_step, params, x, y)
    a, b = row_step(params, x, y), param_step(params, x, y)
    flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(t)])  # noqa: E731
    step_a = flat(a) - flat(params)
    out["rel_diff_float32"] = float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(step_a))
    rt, pt = [], []
    for _ in range(4):
        rt += timed(row_step, params, x, y, reps=max(1, steps // 4), budget_s=1e9)
        pt += timed(param_step, params, x, y, reps=max(1, steps // 4), budget_s=1e9)
    out["row_step_ms"] = 1e3 * statistics.median(rt)
    out["param_step_ms"] = 1e3 * statistics.median(pt)
    out["choose_space"] = choose_space(d_params, p.batch)
    print(
        f"  {p.name}: row {out['row_step_ms']:.2f} ms, param {out['param_step_ms']:.2f} ms, "
        f"choose_space -> {out['choose_space']}, rel diff {out['rel_diff_float32']:.1e}, "
        f"first call row {out['row_first_call_s']:.1f} s / param {out['param_first_call_s']:.1f} s",
        flush=True,
    )
    return out


def blas_info() -> list[dict]:
    """The BLAS libraries loaded in this process and their threads (threadpoolctl, if installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "prefix", "filepath", "version", "num_threads", "architecture")
    return [{k: i.get(k) for k in keys} for i in threadpool_info()]


def command_line(args: list[str]) -> str:
    """The command of this run as the README shows it (``--out FILE`` left out: a local path)."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return " ".join(["python benchmarks/bench_gram.py", *kept])


def machine_line() -> str:
    """CPU model, core count and platform of this machine (for the README's table)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def readme_block(rows: list[dict], meta: dict) -> str:
    """The README's performance table (markdown) from this run's rows."""

    def ms(v):
        return "-" if v is None else (f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms")

    lines = [
        f"`{meta['command']}`, {meta['date']}, {meta['machine']}, jax {meta['jax']}, solve "
        f"backend `{meta['solve_backend']}`, BLAS threads "
        f"{', '.join(str(i['num_threads']) for i in meta['blas_after']) or 'n/a'}, load average "
        f"{meta['load_before']:.1f} before and {meta['load_after']:.1f} after the run "
        "(float32; ratios measured side by side in one process, medians of interleaved steps):",
        "",
        "| problem | Gram: jacobian | Gram: structured | plain EGN / Adam | default EGN / Adam "
        "| first call EGN / Adam | flops EGN / Adam | EGN peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["gram_ms"]
        speedup = ""
        if g.get("jacobian") and g.get("structured"):
            speedup = f" ({g['jacobian'] / g['structured']:.0f}x)"
        flop = r.get("flops_egn_over_adam")
        lines.append(
            f"| {r['problem']} | {ms(g.get('jacobian'))} | {ms(g.get('structured'))}{speedup} "
            f"| {r['egn_over_adam']:.1f} | {r['egn_default_over_adam']:.1f} "
            f"| {r['compile_egn_over_adam']:.1f} | {'-' if flop is None else f'{flop:.1f}'} "
            f"| {r['egn_step_peak_bytes'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


def write_readme(path: str, rows: list[dict], meta: dict) -> None:
    """Replace the ``perf`` block of ``path`` by :func:`readme_block` (harness helper)."""
    try:
        from gaussnewton_experiments.results import replace_block
    except ImportError as e:  # the experiment harness is a separate package (experiments/)
        raise SystemExit(
            "--readme needs the experiment harness (pip install -e experiments, or make install)"
        ) from e
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(replace_block(text, "perf", readme_block(rows, meta)))
    print(f"wrote the performance table of {path}")


def selected(name: str, only: str | None) -> bool:
    return only is None or any(part in name for part in only.split("|"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small problems (smoke run)")
    ap.add_argument("--out", default=None, help="write the rows as JSON to this file")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (>= 20)")
    ap.add_argument(
        "--only",
        default=None,
        help="run only problems whose name contains this ('|' separates alternatives)",
    )
    ap.add_argument(
        "--limit-blas",
        action="store_true",
        help="limit every BLAS to one thread first (threadpoolctl), as the old benchmark did",
    )
    ap.add_argument("--skip-gram", action="store_true", help="skip the Gram-strategy timings")
    ap.add_argument("--skip-small", action="store_true", help="skip the parameter-space rows")
    ap.add_argument(
        "--readme",
        default=None,
        help="rewrite the performance table (block 'perf') of this README from this run",
    )
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.limit_blas:
        import scipy.linalg.cython_lapack  # noqa: F401  (the OpenBLAS jaxlib's LAPACK calls)
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    blas_before = blas_info()
    rows = []
    for p in problems(args.quick):
        if not selected(p.name, args.only):
            continue
        print(p.name, flush=True)
        rows.append(run_problem(p, args.steps, args.quick, args.skip_gram))
    small = []
    for p in [] if args.skip_small else small_problems(args.quick):
        if not selected(p.name, args.only):
            continue
        small.append(run_small(p, args.steps))
    print()
    if rows:
        print_table(rows)
    if small:
        print(f"\n{'problem':<40} {'D':>5} {'rows':>5} {'row ms':>8} {'param ms':>9} {'auto':>6}")
        for r in small:
            print(
                f"{r['problem']:<40} {r['params']:>5} {r['rows']:>5} {r['row_step_ms']:>8.2f} "
                f"{r['param_step_ms']:>9.2f} {r['choose_space']:>6}"
            )
    blas_after = blas_info()
    print(f"\nsolve backend: {linalg.get_backend()}")
    for i in blas_after:
        print(f"BLAS {i['prefix']} {i['version']} {i['architecture']}: {i['num_threads']} threads")
    by_name = {r["problem"]: r for r in rows}
    sampled = by_name.get("cls 784-256-256-1000 b=128 CE sampled m=1")
    same_se = by_name.get("reg 784-256-256-1000 b=128 SE sampled m=1 (same model)")
    scalar = by_name.get("reg 784-256-256-1 b=128 (same trunk)")
    if sampled and same_se:
        ratio = sampled["egn_step_ms"] / same_se["egn_step_ms"]
        print(
            f"\n1000-class sampled CE EGN step / same model, squared error (sampled): {ratio:.2f}"
        )
    if sampled and scalar:
        ratio = sampled["egn_step_ms"] / scalar["egn_step_ms"]
        print(f"1000-class sampled EGN step / same-trunk scalar squared-error step: {ratio:.2f}")
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "blas_threads_limited_to_1": bool(args.limit_blas),
        "solve_backend": linalg.get_backend(),
        "blas_before": blas_before,
        "blas_after": blas_after,
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.platform(),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "command": command_line(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": machine_line(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    meta["machine"] = meta["cpu"]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "small": small}, fh, indent=2)
        print(f"\nwrote {args.out}")
    if args.readme:
        write_readme(args.readme, rows, meta)


if __name__ == "__main__":
    main()
