"""Many devices: every method on 8 CPU devices equals one device (docs/many_devices.md).

The checks run in one subprocess (tests/_sharding_checks.py: jax fixes its device count when it
starts, and the rest of the suite keeps one device); each case here reads its result. Cases:
methods x losses x {jit on an Explicit mesh, jit on an Auto mesh, inside ``shard_map`` with
``axis_name`` (check_vma on and off)}, exact and sampled curvature, structured and jacobian Gram,
row-space Cholesky, parameter-space Cholesky and CG. The default run takes every config, loss and
mode at least once (``FAST_MODES``: 18 of the 32 pairs); ``pytest -m slow tests/test_sharding.py``
runs all of them.

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
import pytest  # noqa: E402
from _sharding_checks import CONFIGS, FAST_MODES, cases  # noqa: E402

TOL = 1e-10


def test_fast_modes_cover_every_config_and_mode():
    """The default run keeps every config, every loss and every mode (a subset of the pairs)."""
    assert set(FAST_MODES) == set(CONFIGS)
    assert all(set(FAST_MODES[n]) <= set(modes) for n, (_, modes, _) in CONFIGS.items())
    assert set("".join(FAST_MODES.values())) == set("".join(m for _, m, _ in CONFIGS.values()))


def _run_checks(tmp_path, every):
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "_sharding_checks.py"),
            str(out),
            *(["--all"] if every else []),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(results, expected):
    missing = [case for case in expected if case not in results]
    failed = {
        case: err
        for case, err in results.items()
        if case in expected and (isinstance(err, str) or not err < TOL)
    }
    assert not missing and not failed, f"missing {missing}; failed {failed}"
    gathers = results["gathers"]
    assert gathers["sizes"], "no all-gather at all: the batch was not sharded"
    assert max(gathers["sizes"]) < gathers["gram"], gathers


def test_every_case_equals_one_device_and_the_gram_is_not_gathered(tmp_path):
    """One test (one subprocess, on one xdist worker): every case of the default run within
    ``TOL`` (every config, loss and mode once: ``FAST_MODES``); the exact softmax step on an
    Explicit mesh gathers per-example factors, never the Gram."""
    _check(_run_checks(tmp_path, every=False), cases(every=False))


@pytest.mark.slow
def test_every_mode_of_every_config(tmp_path):
    """All pairs of config x mode (``CONFIGS``), as the default test."""
    _check(_run_checks(tmp_path, every=True), cases(every=True))
