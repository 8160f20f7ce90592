"""``explain`` on every zoo model equals a snapshot recorded before the rule registry (issue #11).

The snapshot (``explain_snapshot.json`` beside this file) holds, per zoo model, per
``dense_method`` (``"auto"``, ``"factored"``) and per leaf: rule, method, kinds, reason, both flop
estimates and the factored forms (class name and every field). It was written by the engine that
switched on ``kind`` strings (commit "tests/gram: snapshot explain() of the zoo"), so a refactor
of the rules must reproduce every name, reason, cost number and factor layout exactly. Tracing
only (no compilation). Rewrite it only for an intended change of the plans:
``python tests/gram/test_explain_snapshot.py`` (with ``PYTHONPATH=src``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _structured_zoo import ZOO  # noqa: E402

from gaussnewton.gram.structured import explain  # noqa: E402

SNAPSHOT = Path(__file__).with_name("explain_snapshot.json")
METHODS = ("auto", "factored")


def _form(form) -> dict:
    return {"class": type(form).__name__, **dataclasses.asdict(form)}


def plans(name: str, dense_method: str) -> dict:
    """``{leaf: {rule, method, kinds, reason, cost_dense, cost_pergrad, forms}}``, JSON-ready."""
    model_fn, params, x1, x2 = ZOO[name]()
    out = {
        leaf: {
            "rule": p.rule,
            "method": p.method,
            "kinds": list(p.kinds),
            "reason": p.reason,
            "cost_dense": p.cost_dense,
            "cost_pergrad": p.cost_pergrad,
            "forms": [_form(f) for f in p.forms],
        }
        for leaf, p in explain(model_fn, params, x1, x2, dense_method=dense_method).items()
    }
    return json.loads(json.dumps(out))  # tuples -> lists, as stored


def _expected() -> dict:
    return json.loads(SNAPSHOT.read_text())


@pytest.mark.parametrize("dense_method", METHODS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_explain_matches_snapshot(name, dense_method):
    expected = _expected()[name][dense_method]
    got = plans(name, dense_method)
    assert set(got) == set(expected), name
    for leaf in expected:
        assert got[leaf] == expected[leaf], (name, dense_method, leaf)


def test_snapshot_covers_the_zoo_and_every_rule():
    snap = _expected()
    assert set(snap) == set(ZOO)
    rules = {p["rule"] for model in snap.values() for m in model.values() for p in m.values()}
    methods = {p["method"] for model in snap.values() for m in model.values() for p in m.values()}
    assert {"dense", "bias", "scale", "conv", "embedding", "mixed", "fallback"} <= rules
    assert {"factored", "per-example-gradient", "none"} <= methods


if __name__ == "__main__":
    data = {name: {m: plans(name, m) for m in METHODS} for name in sorted(ZOO)}
    SNAPSHOT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
