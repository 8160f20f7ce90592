"""Solver objects (gaussnewton.solvers): the same numerics as the string ``solver=`` form.

- Each solver object gives the direction of its string name (``RowCholesky()`` = ``"cholesky"``,
  ``ParamCholesky()`` = ``"param"``, ``AutoSolver()`` = ``"auto"``, ``RowCG(max_iters, tol)`` =
  ``"cg"`` with ``max_cg_iters`` / ``cg_tol``) to 1e-12 relative in float64: the same code runs,
  so the directions agree to rounding (in fact bit for bit); squared error (``Q = I``), softmax
  (range form) and sampled curvature (Woodbury) cover the three row-space systems.
- The exact solvers agree with the dense float64 LM direction (1e-8: the Gram's condition number
  times float64 rounding on this 6-example MLP).
- ``gn.egn`` and ``gram_gauss_newton`` take the objects; warm-started CG carries the direction.
- Construction is validated; a solver object with the flattened CG options is refused.
Eager ``egn_direction`` calls (no jit), two small jitted optimizers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_lm_direction, flat, init_mlp, make_labels, mlp, rel_err

import gaussnewton as gn
from gaussnewton.gram_gauss_newton import gram_gauss_newton
from gaussnewton.solvers import SOLVER_CLASSES, as_solver

B = 6
CG = {"max_cg_iters": 7, "cg_tol": 1e-9}
PAIRS = [
    ("cholesky", gn.RowCholesky(), {}),
    ("param", gn.ParamCholesky(), {}),
    ("auto", gn.AutoSolver(), {}),
    ("cg", gn.RowCG(max_iters=7, tol=1e-9), CG),
]
CASES = [
    ("squared_error", 2, "exact"),
    ("softmax_cross_entropy", 3, "exact"),
    ("softmax_cross_entropy", 3, "sampled"),
]


def _problem(loss, c):
    kp, kx, ky = jax.random.split(jax.random.key(3), 3)
    return init_mlp(kp, 3, c), jax.random.normal(kx, (B, 3)), make_labels(ky, loss, B, c)


@pytest.mark.parametrize(("loss", "c", "curvature"), CASES)
def test_solver_objects_equal_their_string_form(loss, c, curvature):
    params, x, y = _problem(loss, c)
    kw = dict(loss=loss, damping=1e-2, curvature=curvature, key=jax.random.key(1))
    for name, obj, flat_kw in PAIRS:
        d_str, i_str = gn.egn_direction(mlp, params, x, y, solver=name, **kw, **flat_kw)
        d_obj, i_obj = gn.egn_direction(mlp, params, x, y, solver=obj, **kw)
        assert rel_err(flat(d_obj), flat(d_str)) <= 1e-12, name
        assert float(i_obj.loss) == float(i_str.loss)
        if name != "cg" and curvature == "exact":
            ref, _ = dense_lm_direction(mlp, params, x, y, gn.get_loss(loss), 1e-2)
            assert rel_err(flat(d_obj), ref) <= 1e-8, name


def test_egn_and_ggn_take_solver_objects():
    """Three jitted steps with the object equal those with the string (warm-started CG included:
    the state carries the last direction, as with ``solver="cg"``)."""
    params, x, y = _problem("squared_error", 2)

    def run(opt):
        state, p = opt.init(params), params
        step = jax.jit(opt.step)
        for _ in range(3):
            p, state, info = step(p, state, x, y)
        return p, state

    p_str, s_str = run(gn.egn(mlp, loss="squared_error", solver="cg", max_cg_iters=4))
    p_obj, s_obj = run(gn.egn(mlp, loss="squared_error", solver=gn.RowCG(max_iters=4)))
    np.testing.assert_array_equal(flat(p_obj), flat(p_str))
    assert jax.tree_util.tree_structure(s_obj) == jax.tree_util.tree_structure(s_str)
    assert rel_err(flat(s_obj.method_state), flat(s_str.method_state)) <= 1e-12
    assert float(jnp.max(jnp.abs(flat(s_obj.method_state)))) > 0  # warm start is carried

    cold = gn.egn(mlp, loss="squared_error", solver=gn.RowCG(max_iters=4, warm_start=False))
    assert jax.tree_util.tree_leaves(cold.init(params).method_state) == []

    ggn = gram_gauss_newton(mlp, damping=1e-2, solver=gn.RowCholesky())
    ggn_str = gram_gauss_newton(mlp, damping=1e-2, solver="cholesky")
    np.testing.assert_array_equal(flat(run(ggn)[0]), flat(run(ggn_str)[0]))


def test_string_names_map_to_classes():
    assert set(SOLVER_CLASSES) == {"auto", "cholesky", "param", "cg"}
    for name, cls in SOLVER_CLASSES.items():
        assert isinstance(as_solver(name), cls)
    assert as_solver("cg", max_cg_iters=3, cg_tol=1e-4, cg_warm_start=False) == gn.RowCG(
        3, 1e-4, False
    )
    obj = gn.RowCG(max_iters=2)
    assert as_solver(obj) is obj
    assert hash(gn.RowCholesky()) == hash(gn.RowCholesky())  # frozen: usable as a static arg


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_iters": -1}, ValueError, "max_iters=-1"),
        ({"max_iters": 2.5}, ValueError, "max_iters=2.5"),
        ({"tol": -1.0}, ValueError, "tol=-1.0"),
        ({"tol": float("nan")}, ValueError, "tol=nan"),
        ({"warm_start": 1}, TypeError, "warm_start=1"),
    ],
)
def test_row_cg_validates_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        gn.RowCG(**kwargs)


def test_solver_argument_is_validated():
    with pytest.raises(ValueError, match="solver='qr'"):
        gn.egn(mlp, loss="squared_error", solver="qr")
    with pytest.raises(TypeError, match="not a solver"):
        gn.egn(mlp, loss="squared_error", solver=3)
    with pytest.raises(ValueError, match="max_cg_iters=5 is a sub-option"):
        gn.egn(mlp, loss="squared_error", solver=gn.RowCG(), max_cg_iters=5)
    with pytest.raises(ValueError, match="cg_tol"):
        gn.egn_direction(
            mlp, {}, jnp.ones((2, 3)), jnp.ones(2), loss="squared_error", damping=1.0,
            solver=gn.RowCholesky(), cg_tol=1e-3,
        )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        gn.RowCG().tol = 1.0  # type: ignore[misc]


def test_param_cholesky_refuses_per_token_outputs():
    params = {"w": jnp.ones((3, 2))}
    x, y = jnp.ones((2, 4, 3)), jnp.zeros((2, 4, 2))
    with pytest.raises(ValueError, match="per-token"):
        gn.egn_direction(
            lambda p, xx: xx @ p["w"], params, x, y, loss="squared_error", damping=1e-2,
            solver=gn.ParamCholesky(),
        )  # fmt: skip
