"""Multi-host EGN: 2 processes x 4 CPU devices over ``jax.distributed`` on the loopback.

The processes run ``tests/_multihost_worker.py``: a global ``"data"`` mesh over the 8 devices, the
batch assembled from each process's half with ``jax.make_array_from_process_local_data``, params
replicated, a few ``jax.jit(gn.egn(...).step)`` steps for squared error and softmax cross-entropy,
each compared in the process with the same steps on one device on the full batch (to 1e-10,
float64). The test passes when both processes exit 0.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_multihost_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240  # generous for a loaded 2-core machine; the run itself takes ~20-40 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_available() -> str | None:
    """``None`` if this jaxlib can build gloo CPU collectives, else the reason."""
    try:
        from jax._src.lib import _jax
    except ImportError as exc:  # pragma: no cover - depends on the jaxlib build
        return f"jaxlib has no _jax extension ({exc})"
    if not hasattr(_jax, "make_gloo_tcp_collectives"):  # pragma: no cover
        return "this jaxlib was built without gloo CPU collectives (make_gloo_tcp_collectives)"
    return None


def test_two_processes_match_one_device():
    reason = _gloo_available()
    if reason is not None:  # pragma: no cover - only on jaxlib builds without gloo
        pytest.skip(reason)
    port = _free_port()
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # the worker sets its device count itself
    # one compute thread per process: two processes share a small machine
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"multi-host workers timed out after {TIMEOUT_S} s:\n" + "\n".join(logs))
    codes = [p.returncode for p in procs]
    log = "\n".join(
        f"--- process {i} (exit {c}) ---\n{o}"
        for i, (c, o) in enumerate(zip(codes, outputs, strict=True))
    )
    assert codes == [0] * NUM_PROCESSES, log
    for i, out in enumerate(outputs):
        assert f"[process {i}] OK" in out, log
        # both losses, every step, were compared
        assert out.count("params rel err") == 2 * 3, log
