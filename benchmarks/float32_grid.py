"""The float32 direction-error grid of tests/test_float32.py, printed (docs/METHODS.md float32).

Relative error ``‖d₃₂ − d₆₄‖ / ‖d₆₄‖`` of ``gn.egn_direction`` in float32 against the dense
float64 reference, MLP 5-16-16-c, b = 16, for each input case and loss, at
λ = 1e-8, 1e-6, 1e-4, 1e-2, 1, 1e2, 1e4 (columns).

    PYTHONPATH=src python benchmarks/float32_grid.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from conftest import dense_lm_direction, mlp, rel_err  # noqa: E402
from test_float32 import CASES, LAMS, grid_problem  # noqa: E402

import gaussnewton as gn  # noqa: E402


def main():
    print(f"{'inputs':10s} {'loss':30s} {'c':>4s} " + " ".join(f"{lam:7.0e}" for lam in LAMS))
    for case in ["well", "ill", "saturated"]:
        for loss, c in CASES:
            (params, x, y), (p32, x32, y32) = grid_problem(loss, c, case)

            @jax.jit
            def direction(lam, p32=p32, x32=x32, y32=y32, loss=loss):
                d, _ = gn.egn_direction(mlp, p32, x32, y32, loss=loss, damping=lam)
                return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(d)])

            errs = [
                rel_err(
                    direction(jnp.float32(lam)), dense_lm_direction(mlp, params, x, y, loss, lam)[0]
                )
                for lam in LAMS
            ]
            print(
                f"{case:10s} {loss:30s} {c:4d} " + " ".join(f"{e:7.1e}" for e in errs), flush=True
            )


if __name__ == "__main__":
    main()
