"""Communication of a data-parallel EGN step vs data-parallel Adam, read from the compiled HLO.

The script forces 8 CPU devices (before jax starts), shards the batch over a 1-D ``"data"`` mesh
(``AxisType.Auto``, ``NamedSharding(mesh, P("data"))`` for ``x`` and ``y``; params and optimizer
state replicated) and compiles ``jax.jit(opt.step)`` for

* ``adam``: ``optax.adam`` on the mean loss (value_and_grad + update + apply), the baseline;
* ``egn``: ``gn.egn(model, loss=...)`` with exact curvature (defaults: Armijo, adaptive damping);
* ``egn-sampled``: ``curvature="sampled", num_samples=1``;
* ``egn-cg``: ``solver="cg"`` (matrix-free row-space CG).

Nothing is run: it reads ``jax.jit(step).lower(*args).compile().as_text()`` (the per-device SPMD
program) and, for every collective instruction (all-gather, all-reduce, reduce-scatter,
all-to-all, collective-permute; async ``*-start``/``*-done`` pairs are counted once, at ``-done``),
adds up:

* **result bytes**: the bytes of the instruction's result on ONE device (shapes in the partitioned
  HLO are per device), element count x dtype size, summed over tuple results;
* **wire bytes**: what a ring implementation receives per device for that result, with ``k`` the
  replica-group size: all-gather ``S (k-1)/k``, all-reduce ``2 S (k-1)/k``, reduce-scatter
  ``S (k-1)`` (``S`` is the scattered shard), all-to-all ``S (k-1)/k``, collective-permute ``S``.

Each instruction is counted ONCE per appearance in the program. Instructions inside a ``while``
body (the Armijo line search, CG iterations) run once per iteration; they are reported separately
("in loops", per iteration of every loop), the headline numbers are the straight-line ones plus
one iteration of each loop. ``Gram gather`` flags a step whose all-gathers of square blocks
(results whose two trailing dimensions are equal: the Gram or its tiles) together hold at least a
whole ``(b r)²`` Gram matrix (``r`` = the loss Hessian's rank, ``c - 1`` for softmax
cross-entropy, or ``num_samples`` for sampled curvature): every device then holds the whole Gram
and solves redundantly.

A second table models larger settings (formulas in ``model_rows``; printed with the table).

Usage:
    python benchmarks/bench_sharding.py [--quick] [--devices 8] [--only SUBSTRING]
        [--linalg native|lapack] [--out results.json]

``--linalg`` picks the library's dense-solve backend (:func:`gaussnewton.linalg.set_backend`;
default: the library's default, ``native``); it changes how XLA partitions the solve.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# the device count must be set before jax initializes its backend
_DEVICES = 8
for _i, _a in enumerate(sys.argv):
    if _a == "--devices" and _i + 1 < len(sys.argv):
        _DEVICES = int(sys.argv[_i + 1])
    elif _a.startswith("--devices="):
        _DEVICES = int(_a.split("=", 1)[1])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", _DEVICES)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gaussnewton as gn  # noqa: E402
from gaussnewton import linalg  # noqa: E402

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip


# ---------------------------------------------------------------- HLO parsing


_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<phase>-start|-done)?\("
)
_SHAPE_RE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALL_RE = re.compile(
    r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_RE = re.compile(r"\bwhile\(.*?\bcondition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_WHILE_RE2 = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+),\s*condition=%?([\w.\-]+)")
_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LIST_GROUPS_RE = re.compile(r"replica_groups=\{\{([\d,\s]*)\}")


@dataclass(frozen=True)
class Collective:
    kind: str
    shape: str
    elements: int
    result_bytes: int
    group: int
    in_loop: bool

    @property
    def wire_bytes(self) -> float:
        k, s = self.group, self.result_bytes
        if k <= 1:
            return 0.0
        return {
            "all-gather": s * (k - 1) / k,
            "all-reduce": 2 * s * (k - 1) / k,
            "reduce-scatter": s * (k - 1),
            "all-to-all": s * (k - 1) / k,
            "collective-permute": float(s),
        }[self.kind]


def _shape_size(shape: str) -> tuple[int, int]:
    """``(elements, bytes)`` of an HLO result type, summed over a tuple's members."""
    elems = nbytes = 0
    for dtype, dims in _SHAPE_RE.findall(shape):
        if dtype not in DTYPE_BYTES:  # e.g. a token
            continue
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        elems += n
        nbytes += n * DTYPE_BYTES[dtype]
    return elems, nbytes


def _group_size(line: str, n_devices: int) -> int:
    m = _IOTA_GROUPS_RE.search(line)
    if m:
        return int(m.group(2))
    m = _LIST_GROUPS_RE.search(line)
    if m:
        return len([t for t in m.group(1).split(",") if t.strip()])
    if "source_target_pairs" in line:
        return 2
    return n_devices  # replica_groups={} : all devices


def parse_collectives(hlo: str, n_devices: int) -> list[Collective]:
    """Every collective of a compiled HLO module, with whether it sits inside a ``while`` loop."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMP_RE.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    calls: dict[str, set[str]] = defaultdict(set)
    loop_roots: set[str] = set()
    for name, lines in comps.items():
        for line in lines:
            calls[name].update(_CALL_RE.findall(line))
            for b in _BRANCHES_RE.findall(line):
                calls[name].update(t.strip().lstrip("%") for t in b.split(",") if t.strip())
            for m in (_WHILE_RE.search(line), _WHILE_RE2.search(line)):
                if m:
                    loop_roots.update(m.groups())
    in_loop: set[str] = set()
    stack = list(loop_roots)
    while stack:
        c = stack.pop()
        if c in in_loop:
            continue
        in_loop.add(c)
        stack.extend(calls.get(c, ()))
    out = []
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR_RE.match(line)
            if not m or m.group("phase") == "-start":
                continue
            elems, nbytes = _shape_size(m.group("shape"))
            out.append(
                Collective(
                    m.group("op"),
                    m.group("shape").strip(),
                    elems,
                    nbytes,
                    _group_size(line, n_devices),
                    name in in_loop,
                )
            )
    return out


def _square(shape: str) -> bool:
    """Whether an (array) result's two trailing dimensions are equal: a Gram block."""
    dims = _SHAPE_RE.findall(shape)
    if len(dims) != 1:
        return False
    ds = [int(t) for t in dims[0][1].split(",") if t]
    return len(ds) >= 2 and ds[-1] == ds[-2] > 1


def summarize(colls: list[Collective], gram_elements: int | None) -> dict:
    straight = [c for c in colls if not c.in_loop]
    looped = [c for c in colls if c.in_loop]
    by_kind = {k: sum(c.result_bytes for c in colls if c.kind == k) for k in KINDS}
    gathered = sum(c.elements for c in colls if c.kind == "all-gather")
    blocks = sum(c.elements for c in colls if c.kind == "all-gather" and _square(c.shape))
    largest = sorted(colls, key=lambda c: -c.result_bytes)[:6]
    return {
        "result_bytes_by_kind": by_kind,
        "result_bytes": sum(c.result_bytes for c in colls),
        "wire_bytes": sum(c.wire_bytes for c in colls),
        "result_bytes_straight": sum(c.result_bytes for c in straight),
        "result_bytes_in_loops": sum(c.result_bytes for c in looped),
        "count": len(colls),
        "count_in_loops": len(looped),
        "allgather_elements": gathered,
        "allgather_square_block_elements": blocks,
        "gram_elements": gram_elements,
        "gram_gather": None if gram_elements is None else blocks >= gram_elements,
        "largest": [
            {"kind": c.kind, "shape": c.shape, "bytes": c.result_bytes, "in_loop": c.in_loop}
            for c in largest
        ],
    }


# ---------------------------------------------------------------- problems and optimizers


@dataclass(frozen=True)
class Problem:
    name: str
    sizes: tuple[int, ...]
    batch: int


def problems(quick: bool, only: str | None = None) -> list[Problem]:
    small = Problem("mlp 32-64-10 b=64", (32, 64, 10), 64)
    probs = [small] if quick else [
        small, Problem("mnist mlp 784-1000-1000-10 b=1024", (784, 1000, 1000, 10), 1024)
    ]  # fmt: skip
    return [p for p in probs if only is None or only in p.name]


def init_mlp(key, sizes, dtype=jnp.float32):
    params = []
    pairs = zip(sizes[:-1], sizes[1:], strict=True)
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), pairs, strict=True):
        params.append({"w": jax.random.normal(k, (m, n), dtype) / np.sqrt(m), "b": jnp.zeros(n)})
    return params


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def adam_step_fn(model, tx):
    def step(params, state, x, y):
        def mean_loss(p):
            logits = model(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(mean_loss)(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


OPTIMIZERS = {
    "adam": None,
    "egn": {},
    "egn-sampled": {"curvature": "sampled", "num_samples": 1},
    "egn-cg": {"solver": "cg"},
}


def measure(problem: Problem, mesh, n_devices: int, mesh_context=None) -> dict:
    key = jax.random.PRNGKey(0)
    kp, kx, ky = jax.random.split(key, 3)
    params = init_mlp(kp, problem.sizes)
    b, c = problem.batch, problem.sizes[-1]
    if b % n_devices:
        raise ValueError(f"batch {b} of {problem.name!r} is not divisible by {n_devices} devices")
    x = jax.random.normal(kx, (b, problem.sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (b,), 0, c)
    batch_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    x, y = jax.device_put((x, y), batch_sh)
    params = jax.device_put(params, repl)
    d = sum(leaf.size for leaf in jax.tree.leaves(params))
    rows = {}
    for name, kw in OPTIMIZERS.items():
        t0 = time.perf_counter()
        if kw is None:
            tx = optax.adam(1e-3)
            step, state, gram = adam_step_fn(mlp, tx), tx.init(params), None
        else:
            opt = gn.egn(mlp, loss="softmax_cross_entropy", **kw)
            step, state = opt.step, opt.init(params)
            # rows per example: the loss Hessian's rank (c - 1 for softmax CE), or the samples
            r = kw["num_samples"] if kw.get("curvature") == "sampled" else c - 1
            gram = (b * r) ** 2
        state = jax.device_put(state, repl)
        with contextlib.nullcontext() if mesh_context is None else jax.set_mesh(mesh_context):
            hlo = jax.jit(step).lower(params, state, x, y).compile().as_text()
        rows[name] = summarize(parse_collectives(hlo, n_devices), gram)
        rows[name]["compile_s"] = time.perf_counter() - t0
        print(f"  compiled {name} in {rows[name]['compile_s']:.1f} s", flush=True)
    return {"problem": problem.name, "sizes": problem.sizes, "batch": b, "params": d, "rows": rows}


# ---------------------------------------------------------------- tables


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}" if x < 1e7 else f"{x / 1e6:.0f}"


def print_measured(res: dict, n: int) -> list[str]:
    adam = res["rows"]["adam"]["wire_bytes"]
    lines = [
        f"### {res['problem']} (d = {res['params']:,}, {n} devices, float32)",
        "",
        "| step | all-gather | all-reduce | reduce-scatter | all-to-all | coll.-permute "
        "| result MB | in loops MB | wire MB | x Adam (wire) | Gram gather |",
        "|---|" + "---:|" * 10,
    ]
    for name, row in res["rows"].items():
        k = row["result_bytes_by_kind"]
        gram = "-" if row["gram_gather"] is None else ("yes" if row["gram_gather"] else "no")
        lines.append(
            f"| {name} | "
            + " | ".join(_mb(k[kind]) for kind in KINDS)
            + f" | {_mb(row['result_bytes'])} | {_mb(row['result_bytes_in_loops'])}"
            f" | {_mb(row['wire_bytes'])} | {row['wire_bytes'] / adam:.1f} | {gram} |"
        )
    return lines


def model_rows(b: int = 1024, c: int = 10, layers: int = 3, itemsize: int = 4) -> tuple[list, str]:
    """Modelled wire bytes per device per step (ring collectives, float32)."""
    formulas = (
        "Model (bytes received per device per step, ring collectives, 4-byte floats; "
        f"b = {b}, c = {c}; an MLP of L = {layers} square layers of width w = sqrt(d/L), so "
        "the per-example factors (layer inputs and r output cotangents) are f = L w (1 + r) "
        "floats; r = c - 1 exact softmax CE, r = 1 sampled m=1):\n"
        "  Adam                A = 2 (n-1)/n * 4 d          (one gradient all-reduce)\n"
        "  EGN, Gram gather    G = (n-1)/n * 4 (b r)^2 + 2A (whole Gram onto every device; "
        "gradient and direction all-reduces)\n"
        "  EGN, factor gather  F = (n-1)/n * 4 b f + 2A     (per-example factors gathered, "
        "Gram formed locally)"
    )
    out = []
    for n in (8, 64):
        for d in (1e6, 1e8):
            w = (d / layers) ** 0.5
            adam = 2 * (n - 1) / n * itemsize * d
            row = {"n": n, "d": d, "adam": adam}
            for tag, r in (("exact", c - 1), ("sampled", 1)):
                row[f"gram_{tag}"] = (n - 1) / n * itemsize * (b * r) ** 2 + 2 * adam
                row[f"factor_{tag}"] = (n - 1) / n * itemsize * b * layers * w * (1 + r) + 2 * adam
            out.append(row)
    return out, formulas


def print_model(rows: list, formulas: str) -> list[str]:
    lines = [
        formulas,
        "",
        "| n | d | Adam MB | Gram gather exact (x Adam) | factor gather exact (x Adam) "
        "| Gram gather sampled m=1 (x Adam) | factor gather sampled m=1 (x Adam) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r["adam"]
        cells = [
            f"{_mb(r[k])} ({r[k] / a:.1f}x)"
            for k in ("gram_exact", "factor_exact", "gram_sampled", "factor_sampled")
        ]
        lines.append(f"| {r['n']} | {r['d']:.0e} | {_mb(a)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the small problem")
    ap.add_argument("--devices", type=int, default=8, help="forced CPU devices (read at start)")
    ap.add_argument("--only", help="only the problems whose name contains this")
    ap.add_argument("--linalg", choices=linalg.BACKENDS, help="dense-solve backend of the library")
    ap.add_argument("--out", help="write the measurements as JSON to this file")
    ap.add_argument(
        "--axis-type",
        choices=("explicit", "auto"),
        default="explicit",
        help="mesh axis type (default explicit, jax.make_mesh's default)",
    )
    ap.add_argument(
        "--no-mesh-context",
        action="store_true",
        help="compile without jax.set_mesh (Auto axes only): XLA's partitioner alone decides",
    )
    args = ap.parse_args()
    if args.linalg:
        linalg.set_backend(args.linalg)
    n = jax.device_count()
    if n != args.devices:
        raise SystemExit(f"--devices {args.devices} but jax has {n} devices (set before jax?)")
    axis_type = AxisType.Explicit if args.axis_type == "explicit" else AxisType.Auto
    if args.no_mesh_context and axis_type == AxisType.Explicit:
        ap.error("--no-mesh-context needs --axis-type auto (Explicit axes need the mesh)")
    mesh = jax.make_mesh((n,), ("data",), axis_types=(axis_type,))
    mesh_context = None if args.no_mesh_context else mesh
    print(
        f"jax {jax.__version__}, {n} {jax.devices()[0].platform} devices, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"linalg backend {linalg.get_backend()}"
    )
    results = []
    for prob in problems(args.quick, args.only):
        print(f"{prob.name}:", flush=True)
        results.append(measure(prob, mesh, n, mesh_context))
    lines = []
    for res in results:
        lines += print_measured(res, n) + [""]
    rows, formulas = model_rows()
    lines += print_model(rows, formulas)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "jax": jax.__version__,
                    "devices": n,
                    "linalg": linalg.get_backend(),
                    "measured": results,
                    "model": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
