"""Many devices: every method on 8 CPU devices equals one device (docs/many_devices.md).

The checks run in one subprocess (tests/_sharding_checks.py: jax fixes its device count when it
starts, and the rest of the suite keeps one device); each case here reads its result. Cases:
methods x losses x {jit on an Explicit mesh, jit on an Auto mesh, inside ``shard_map`` with
``axis_name`` (check_vma on and off)}, exact and sampled curvature, structured and jacobian Gram,
row-space Cholesky, parameter-space Cholesky and CG.

Tolerance 1e-10 (float64, two steps): the 8-device step sums the same terms in another order
(per-device partial sums, then an all-reduce), so it differs from one device by rounding only,
about 1e-13 here; a wrong reduction (a missing or doubled ``psum``, a factor of the device count)
is an O(1) error.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _sharding_checks import CONFIGS, MODES  # noqa: E402

CASES = [
    f"{name}-{lname}-{MODES[m]}"
    for name, (_, modes, losses) in CONFIGS.items()
    for lname in losses.split(",")
    for m in modes
]
TOL = 1e-10


def _run_checks(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [sys.executable, str(HERE / "_sharding_checks.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_case_equals_one_device_and_the_gram_is_not_gathered(tmp_path):
    """One test (one subprocess, on one xdist worker): every case of ``CASES`` within ``TOL``;
    the exact softmax step on an Explicit mesh gathers per-example factors, never the Gram."""
    results = _run_checks(tmp_path)
    missing = [case for case in CASES if case not in results]
    failed = {
        case: err
        for case, err in results.items()
        if case in CASES and (isinstance(err, str) or not err < TOL)
    }
    assert not missing and not failed, f"missing {missing}; failed {failed}"
    gathers = results["gathers"]
    assert gathers["sizes"], "no all-gather at all: the batch was not sharded"
    assert max(gathers["sizes"]) < gathers["gram"], gathers
