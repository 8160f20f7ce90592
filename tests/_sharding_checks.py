"""The multi-device checks of tests/test_sharding.py, run in their own process on 8 CPU devices.

``python tests/_sharding_checks.py OUT.json [--all]`` forces 8 host devices (before jax starts), and for
each case runs two steps of a method on one device (the reference: plain ``jax.jit``, the whole
batch) and the same two steps on 8 devices, one of:

* ``explicit`` / ``auto``: ``jax.jit(opt.step)`` under ``jax.set_mesh`` of a 1-D ``data`` mesh with
  Explicit / Auto axes, ``x`` and ``y`` sharded over the batch, params and state replicated;
* ``shard_map`` / ``shard_map_novma``: ``opt.step`` with ``axis_name="data"`` inside the user's
  ``jax.shard_map`` (``check_vma`` on / off);
* ``egn_batchnorm``: a batch-coupled model (its own ``model_fn``), exact on the whole batch;
* ``fsdp``: jit on a 4 x 2 mesh (Auto axes), the batch over ``data`` and the weight matrices
  sharded over ``model`` (FSDP-style parameters).

It writes ``{case: max |params_8 − params_1|}`` (or the error message) and, for the exact
softmax EGN step on the Explicit mesh, the all-gathers of the compiled HLO (the Gram must not be
one of them). float64, a 3-16-c tanh MLP, b = 32 (4 examples per device).
"""

from __future__ import annotations

import json
import os
import re
import sys

# 8 host devices; the least XLA optimization (these programs are compiled once and run twice)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
# LAPACK's Cholesky compiles in a fraction of the native blocked one's time; the solve kernel is
# tested in tests/test_linalg.py, here it is what is gathered and reduced over the devices
os.environ.setdefault("GAUSSNEWTON_LINALG", "lapack")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)

import gaussnewton as gn  # noqa: E402
from gaussnewton.dual import dual_gn  # noqa: E402
from gaussnewton.gram_gauss_newton import gram_gauss_newton  # noqa: E402
from gaussnewton.ignd import ignd  # noqa: E402
from gaussnewton.sgn import sgn  # noqa: E402
from gaussnewton.sqn import sqn  # noqa: E402

B = 32
STEPS = 2
LOSSES = {  # name: (loss, outputs c)
    "se": ("squared_error", 2),
    "ce": ("softmax_cross_entropy", 4),
    "bce": ("sigmoid_binary_cross_entropy", 1),
}
# a well-conditioned system for CG: a 1e-13 residual then pins the iterate to rounding
CG = dict(solver="cg", cg_tol=1e-13, damping=1.0, damping_policy="constant")
CONFIGS = {  # name: (constructor(model, loss, axis_name), modes, losses)
    "egn": (lambda m, l, a: gn.egn(m, loss=l, axis_name=a), "EAMNF", "ce"),
    "egn_cholesky": (
        lambda m, l, a: gn.egn(m, loss=l, solver="cholesky", axis_name=a),
        "EM",
        "se,bce",
    ),
    "egn_param": (lambda m, l, a: gn.egn(m, loss=l, solver="param", axis_name=a), "EM", "ce"),
    "egn_cg": (lambda m, l, a: gn.egn(m, loss=l, axis_name=a, **CG), "EM", "ce"),
    "egn_sampled": (
        lambda m, l, a: gn.egn(m, loss=l, curvature="sampled", num_samples=2, axis_name=a),
        "EM",
        "ce",
    ),
    "egn_jacobian": (
        lambda m, l, a: gn.egn(m, loss=l, solver="cholesky", gram="jacobian", axis_name=a),
        "EM",
        "se",
    ),
    "egn_momentum_tx": (
        lambda m, l, a: gn.egn(
            m, loss=l, momentum=0.9, tx=optax.clip_by_global_norm(1.0), axis_name=a
        ),
        "EM",
        "ce",
    ),
    # a batch-coupled model (train-mode batch norm): the whole-batch Gram on a mesh
    "egn_batchnorm": (lambda m, l, a: gn.egn(bn_mlp, loss=l, axis_name=a), "E", "ce"),
    "ggn": (lambda m, l, a: gram_gauss_newton(m, damping=0.1, axis_name=a), "M", "se"),
    "sgn": (lambda m, l, a: sgn(m, loss=l, axis_name=a), "EM", "ce"),
    "dual_gn": (
        lambda m, l, a: dual_gn(m, loss=l, damping=1e-2, max_inner_iters=3, axis_name=a),
        "EM",
        "ce",
    ),
    "ignd": (lambda m, l, a: ignd(m, loss=l, learning_rate=0.5, axis_name=a), "EM", "bce"),
    "sqn": (lambda m, l, a: sqn(m, loss=l, history=3, axis_name=a), "EM", "se"),
}
MODES = {"E": "explicit", "A": "auto", "M": "shard_map", "N": "shard_map_novma", "F": "fsdp"}
# the modes of the default (fast) run: every config, loss and mode at least once; ``--all`` (the
# slow test) runs every mode of CONFIGS
FAST_MODES = {
    "egn": "EAMNF",
    "egn_cholesky": "M",
    "egn_param": "E",
    "egn_cg": "M",
    "egn_sampled": "E",
    "egn_jacobian": "M",
    "egn_momentum_tx": "E",
    "egn_batchnorm": "E",
    "ggn": "M",
    "sgn": "E",
    "dual_gn": "M",
    "ignd": "E",
    "sqn": "M",
}


def cases(every: bool) -> list[str]:
    """The case names of one run: ``{config}-{loss}-{mode}``."""
    return [
        f"{name}-{lname}-{MODES[m]}"
        for name, (_, modes, losses) in CONFIGS.items()
        for lname in losses.split(",")
        for m in (modes if every else FAST_MODES[name])
    ]


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def bn_mlp(p, x):
    """Batch statistics couple the examples (train-mode batch norm without a scale)."""
    h = x @ p["w1"] + p["b1"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    return jnp.tanh(h) @ p["w2"] + p["b2"]


def init(c):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (3, 16)) * 0.5,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, c)) * 0.5,
        "b2": jnp.zeros(c),
    }


def data(loss, c):
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (B, 3))
    if loss == "squared_error":
        return x, jax.random.normal(ky, (B, c))
    if loss == "softmax_cross_entropy":
        return x, jax.random.randint(ky, (B,), 0, c)
    return x, jax.random.bernoulli(ky, 0.5, (B,)).astype(jnp.float64)


def run(step, params, state, x, y):
    for _ in range(STEPS):
        params, state, _ = step(params, state, x, y)
    return params


def max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def all_gathers(hlo: str) -> list[int]:
    """Element counts of the results of the all-gathers in an HLO module's text."""
    sizes = []
    for line in hlo.splitlines():
        if "all-gather" not in line or "=" not in line:
            continue
        m = re.search(r"=\s*\(?\s*[a-z]+[0-9]*\[([0-9,]*)\]", line)
        if m:
            dims = [int(d) for d in m.group(1).split(",") if d]
            n = 1
            for d in dims:
                n *= d
            sizes.append(n)
    return sizes


def main(out_path: str, every: bool = False) -> None:
    assert jax.device_count() == 8, jax.devices()
    results: dict = {}
    meshes = {
        t: jax.make_mesh((8,), ("data",), axis_types=(t,))
        for t in (AxisType.Explicit, AxisType.Auto)
    }
    grid = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    for name, (make, modes, losses) in CONFIGS.items():
        modes = modes if every else FAST_MODES[name]
        for lname in losses.split(","):
            loss, c = LOSSES[lname]
            params, (x, y) = init(c), data(loss, c)
            opt = make(mlp, loss, None)
            state = opt.init(params, key=jax.random.key(3))
            ref = run(jax.jit(opt.step), params, state, x, y)
            for mode in (MODES[m] for m in modes):
                case = f"{name}-{lname}-{mode}"
                try:
                    mesh = meshes[AxisType.Auto if mode == "auto" else AxisType.Explicit]
                    shard = NamedSharding(mesh, P("data"))
                    xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
                    if mode == "fsdp":
                        xs, ys = jax.device_put((x, y), NamedSharding(grid, P("data")))
                        specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model")}
                        ps = {
                            k: jax.device_put(v, NamedSharding(grid, specs.get(k, P())))
                            for k, v in params.items()
                        }
                        with jax.set_mesh(grid):
                            got = run(jax.jit(opt.step), ps, state, xs, ys)
                    elif mode.startswith("shard_map"):
                        opt_m = make(mlp, loss, "data")
                        step = jax.jit(
                            jax.shard_map(
                                opt_m.step,
                                mesh=mesh,
                                in_specs=(P(), P(), P("data"), P("data")),
                                out_specs=(P(), P(), P()),
                                check_vma=mode == "shard_map",
                            )
                        )
                        got = run(step, params, state, xs, ys)
                    else:
                        with jax.set_mesh(mesh):
                            step = jax.jit(opt.step)
                            got = run(step, params, state, xs, ys)
                            if case == "egn-ce-explicit":
                                hlo = step.lower(params, state, xs, ys).compile().as_text()
                                results["gathers"] = {
                                    "sizes": all_gathers(hlo),
                                    "gram": (B * (c - 1)) ** 2,
                                }
                    results[case] = max_diff(got, ref)
                except Exception as e:  # reported per case by the test
                    results[case] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(case, results[case], flush=True)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], every="--all" in sys.argv[2:])
