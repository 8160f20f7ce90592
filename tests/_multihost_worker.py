"""One process of the 2-process x 4-CPU-device EGN test (launched by tests/test_multihost.py).

Usage: ``python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT``.

Each process joins ``jax.distributed`` on the loopback (CPU collectives over gloo), builds the
global batch from a shared seed, keeps its contiguous share of the rows as process-local data and
assembles global arrays with ``jax.make_array_from_process_local_data`` over a 1-D ``"data"`` mesh
of all ``NUM_PROCESSES * 4`` devices (params replicated). It runs a few ``jax.jit(opt.step)`` EGN
steps (squared error and softmax cross-entropy, exact curvature, float64) and compares them with the
same steps on one local device on the full batch, computed in the same process. Exit status 0 means
every step's params and loss agreed to ``TOL``; anything else prints the mismatch and exits 1.
"""

from __future__ import annotations

import os
import sys
import time

LOCAL_DEVICES = 4
# relative agreement of params and loss between the sharded and the one-device steps: both run
# the same float64 algorithm; only the reduction order of the sharded sums differs (~1e-15 seen)
TOL = 1e-10
STEPS = 3


def main(process_id: int, num_processes: int, port: int) -> int:
    t0 = time.perf_counter()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # compile time dominates this test (4 small programs per process); LLVM's -O0 cuts it by about
    # a third and leaves float64 results unchanged far below TOL
    os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import gaussnewton as gn

    print(f"[process {process_id}] initialized in {time.perf_counter() - t0:.1f} s", flush=True)

    n_dev = jax.device_count()
    assert n_dev == num_processes * LOCAL_DEVICES, (n_dev, jax.devices())
    assert jax.local_device_count() == LOCAL_DEVICES
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Auto,))
    batch_sh = NamedSharding(mesh, P("data"))
    repl_sh = NamedSharding(mesh, P())
    one_dev = jax.local_devices()[0]

    b, d_in, width, c = 4 * n_dev, 3, 6, 3  # 4 examples per device
    rng = np.random.default_rng(0)  # the same seed in every process: the same global batch
    x_full = rng.standard_normal((b, d_in))
    targets = {
        "squared_error": rng.standard_normal((b, c)),
        "softmax_cross_entropy": rng.integers(0, c, size=(b,)).astype(np.int32),
    }
    params0 = {
        "w1": rng.standard_normal((d_in, width)) / np.sqrt(d_in),
        "b1": 0.1 * rng.standard_normal(width),
        "w2": rng.standard_normal((width, c)) / np.sqrt(width),
        "b2": np.zeros(c),
    }

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    rows = b // num_processes
    local = slice(process_id * rows, (process_id + 1) * rows)
    failures = []
    for loss, y_full in targets.items():
        opt = gn.egn(model, loss=loss, learning_rate=1.0, damping=1e-2)
        step = jax.jit(opt.step)  # one function; the two placements are two compilations

        # multi-host: each process contributes its rows of the global batch
        x_g = jax.make_array_from_process_local_data(batch_sh, x_full[local], (b, d_in))
        y_g = jax.make_array_from_process_local_data(batch_sh, y_full[local], y_full.shape)
        assert not x_g.is_fully_addressable  # truly split over the processes
        p_g = jax.device_put(params0, repl_sh)
        s_g = jax.device_put(opt.init(params0), repl_sh)

        # reference: one device of this process, the full batch
        x_1, y_1 = jax.device_put((x_full, y_full), one_dev)
        p_1 = jax.device_put(params0, one_dev)
        s_1 = jax.device_put(opt.init(params0), one_dev)

        t1 = time.perf_counter()
        for k in range(STEPS):
            p_g, s_g, info_g = step(p_g, s_g, x_g, y_g)
            p_1, s_1, info_1 = step(p_1, s_1, x_1, y_1)
            # params are replicated: every process can read them without a cross-host gather
            pg = np.concatenate([np.ravel(a) for a in jax.tree.leaves(jax.device_get(p_g))])
            p1 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(jax.device_get(p_1))])
            err = np.linalg.norm(pg - p1) / np.linalg.norm(p1)
            loss_g, loss_1 = float(info_g.loss), float(info_1.loss)
            lerr = abs(loss_g - loss_1) / abs(loss_1)
            print(
                f"[process {process_id}] {loss} step {k}: loss {loss_g:.12g} vs {loss_1:.12g}, "
                f"params rel err {err:.2e}, loss rel err {lerr:.2e}",
                flush=True,
            )
            if not (err <= TOL and lerr <= TOL):
                failures.append((loss, k, err, lerr))
        print(f"[process {process_id}] {loss}: {time.perf_counter() - t1:.1f} s", flush=True)
        # the comparison is only meaningful if the steps moved the params
        p0 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(params0)])
        moved = np.linalg.norm(p1 - p0) / np.linalg.norm(p0)
        if not (np.all(np.isfinite(p1)) and moved > 1e-3):
            failures.append((loss, "params did not move", moved, None))
    jax.distributed.shutdown()
    if failures:
        print(f"[process {process_id}] FAILED: {failures}", flush=True)
        return 1
    print(f"[process {process_id}] OK", flush=True)
    return 0


if __name__ == "__main__":
    pid, nproc, port_ = (int(a) for a in sys.argv[1:4])
    sys.exit(main(pid, nproc, port_))
