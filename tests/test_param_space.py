"""Parameter-space LM direction against the dense float64 reference and the row-space solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_lm_direction, flat, init_mlp, make_labels, mlp, rel_err
from hypothesis import given
from hypothesis import strategies as st

import gaussnewton as gn
from gaussnewton.param_space import choose_space, param_space_direction, space_costs

B, LAM = 40, 1e-2

_param = jax.jit(param_space_direction, static_argnums=0)
_row = jax.jit(
    gn.egn_direction, static_argnums=0, static_argnames=("loss", "curvature", "num_samples")
)


@pytest.mark.parametrize(
    "loss, c, curvature",
    [
        ("squared_error", 2, "exact"),
        ("softmax_cross_entropy", 3, "exact"),
        ("softmax_cross_entropy", 3, "sampled"),
        ("sigmoid_binary_cross_entropy", 1, "exact"),
    ],
)
def test_matches_dense_and_row_space(loss, c, curvature):
    """float64: the D x D solve (D = 48..68 < b c = 40..120) equals the dense reference
    −(JᵀQJ/b + λI)⁻¹∇L and gn.egn_direction to 1e-8 (cond(H + λI) <= ~1e3 at λ = 1e-2, so the
    rounding differences of the two solves are ~1e-12). Sampled: the same key gives the same S in
    both, and the reference uses Q = S Sᵀ."""
    kp, kx, ky, ks = jax.random.split(jax.random.key(c), 4)
    params = init_mlp(kp, 3, c)
    x = jax.random.normal(kx, (B, 3), jnp.float64)
    y = make_labels(ky, loss, B, c)
    lo = gn.get_loss(loss)
    f = mlp(params, x)
    yy = lo.prepare_labels(f, y)
    g = lo.grad(f, yy)
    if curvature == "sampled":
        s = lo.sample_factor(f, yy, ks, 2)
    else:
        s = None if lo.identity_curvature else lo.factor(f, yy)
    d_param = _param(mlp, params, x, g, s, LAM, None)
    d_row, info = _row(
        mlp, params, x, y, loss=loss, damping=LAM, curvature=curvature, num_samples=2, key=ks
    )
    q = None if s is None else np.einsum("bcr,bdr->bcd", s, s)
    ref, grad_ref = dense_lm_direction(mlp, params, x, y, loss, LAM, q_override=q)
    assert rel_err(flat(d_param), ref) < 1e-8
    assert rel_err(flat(d_param), flat(d_row)) < 1e-8
    assert rel_err(flat(info.grad), grad_ref) < 1e-12
    d_given = _param(mlp, params, x, g, s, LAM, info.grad)  # ∇L passed in: the same direction
    assert rel_err(flat(d_given), ref) < 1e-8
    assert jax.tree_util.tree_structure(d_param) == jax.tree_util.tree_structure(params)


def _mlp_scalar(p, x):
    return mlp(p, x)[:, 0]


def test_float32_and_scalar_outputs():
    """(b,) outputs are taken as (b, 1); float32 parameters give a float32 direction within
    float32 rounding of the float64 one."""
    kp, kx = jax.random.split(jax.random.key(5))
    params = init_mlp(kp, 3, 1, dtype=jnp.float32)
    x = jax.random.normal(kx, (B, 3), jnp.float32)
    g = _mlp_scalar(params, x) - 1.0
    d32 = _param(_mlp_scalar, params, x, g, None, 0.1, None)
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    d64 = _param(_mlp_scalar, p64, x.astype(jnp.float64), g.astype(jnp.float64), None, 0.1, None)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(d32))
    assert rel_err(flat(d32), flat(d64)) < 1e-4


@given(d=st.integers(1, 5000), n=st.integers(1, 5000))
def test_choose_space_follows_the_cost_model(d, n):
    """'param' exactly when its modelled flops are lower: always for D <= n/2, never for D >= n
    (t = D/n: row t + 1/3 against param 2t² + t³/3); the memory here is far below the cap."""
    costs = space_costs(d, n)
    expect = "param" if costs["param"][0] < costs["row"][0] else "row"
    assert choose_space(d, n) == expect
    if 2 * d <= n:
        assert expect == "param"
    if d >= n:
        assert expect == "row"


def test_choose_space_examples_and_errors():
    assert choose_space(36, 128) == choose_space(105, 256) == "param"  # LQR quadratic features
    assert choose_space(901, 1000) == "row"  # the sine MLP at b = 1000: row measured 2x faster
    assert choose_space(901, 1000, gram_flops=2 * 1000**2 * 901) == "param"  # a formed-J Gram
    assert choose_space(235146, 1152) == "row"  # the 784-256-256-10 MLP
    assert choose_space(100, 10**6, max_entries=1e6) == "row"  # J would not fit
    with pytest.raises(ValueError, match="num_rows=0 must be an integer >= 1"):
        choose_space(10, 0)


IU = np.triu_indices(5)


def _quadratic_q(p, z):
    """LQR-style Q-function ``zᵀHz`` linear in the upper triangle of a symmetric ``H`` (D = 15)."""
    hm = jnp.zeros((5, 5), p["upper"].dtype).at[IU].set(p["upper"])
    hm = hm + hm.T - jnp.diag(jnp.diag(hm))
    return jnp.einsum("bi,ij,bj->b", z, hm, z)


def test_solver_auto_takes_the_parameter_space_and_equals_the_row_space():
    """D = 15 parameters, b = 64 rows: ``solver="auto"`` picks the D x D parameter-space Cholesky
    and its direction equals the row-space one (float64, 1e-8)."""
    params = {"upper": jax.random.normal(jax.random.key(0), (15,))}
    z = jax.random.normal(jax.random.key(1), (64, 5))
    y = jax.random.normal(jax.random.key(2), (64,))
    assert choose_space(15, 64) == "param"
    kw = dict(loss="squared_error", damping=1e-4)

    @jax.jit
    def directions(p):
        return [
            gn.egn_direction(_quadratic_q, p, z, y, solver=s, **kw)[0]
            for s in ("auto", "param", "cholesky")
        ]

    d_auto, d_param, d_row = directions(params)
    assert rel_err(flat(d_auto), flat(d_row)) < 1e-8
    np.testing.assert_array_equal(flat(d_auto), flat(d_param))  # auto took the parameter space
