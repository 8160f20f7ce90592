"""egn_preconditioner / precondition: P u = (JᵀQJ/b + λI)⁻¹ u against dense float64 references.

Tolerances: the row-space Woodbury form and the dense d × d solve agree to rounding times the
conditioning of ``H + λI`` (≤ ~1e4 here for λ ≥ 1e-4 on this 6-example MLP), so 1e-8 relative
covers float64 with margin; ``−P∇L`` vs ``egn_direction`` (two row-space formulas for the same
vector, measured ~1e-13 at λ = 1e-3) is held at the 1e-10 of the brief.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_jacobian, flat, init_mlp, make_labels, mlp, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import gaussnewton as gn
from gaussnewton.losses import get_loss
from gaussnewton.preconditioner import precondition

B, D_IN, C = 6, 3, 3
KEY = jax.random.key(7)


def _problem(loss):
    kp, kx, ky, ku = jax.random.split(jax.random.key(0), 4)
    params = init_mlp(kp, D_IN, C, width=4)
    x = jax.random.normal(kx, (B, D_IN))
    y = make_labels(ky, loss, B, C)
    u = jax.tree_util.tree_map(
        lambda a, k: jax.random.normal(k, a.shape, a.dtype),
        params,
        jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params),
            list(jax.random.split(ku, len(jax.tree_util.tree_leaves(params)))),
        ),
    )
    return params, x, y, u


def _factor(loss, f, y, curvature):
    loss = get_loss(loss)
    yy = loss.prepare_labels(f, y)
    if curvature == "sampled":
        return loss.sample_factor(f, yy, KEY, 2)
    return loss.factor(f, yy)


def dense_preconditioned(model_fn, params, x, y, loss, lam, u_flat, curvature="exact"):
    """Reference ``(Jᵀ S Sᵀ J / b + λI)⁻¹ u`` with a dense float64 Jacobian of ``model_fn``."""
    f = model_fn(params, x)
    s = np.asarray(_factor(loss, f, y, curvature), np.float64)  # (b, c, r)
    jac, _ = dense_jacobian(model_fn, params, x)
    jb = np.asarray(jac, np.float64).reshape(B, C, -1)
    a = np.einsum("bcr,bcd->brd", s, jb).reshape(-1, jb.shape[-1])  # A = Sᵀ J
    h = a.T @ a / B
    return np.linalg.solve(h + lam * np.eye(h.shape[0]), np.asarray(u_flat, np.float64))


@functools.partial(jax.jit, static_argnames=("loss", "curvature"))
def _apply(params, u, x, y, lam, *, loss, curvature):
    return precondition(
        mlp, params, u, x, y, loss=loss, damping=lam, curvature=curvature, num_samples=2, key=KEY
    )


CASES = [
    ("squared_error", "exact"),
    ("softmax_cross_entropy", "exact"),
    ("softmax_cross_entropy", "sampled"),
]


@pytest.mark.parametrize("loss,curvature", CASES)
@settings(max_examples=4, deadline=None)
@given(log_lam=st.floats(-4.0, 2.0))
def test_matches_dense_inverse(loss, curvature, log_lam):
    params, x, y, u = _problem(loss)
    lam = 10.0**log_lam
    got = _apply(params, u, x, y, lam, loss=loss, curvature=curvature)  # one compile per case
    ref = dense_preconditioned(mlp, params, x, y, loss, lam, flat(u), curvature)
    assert rel_err(flat(got), ref) < 1e-8


@pytest.mark.parametrize("loss", ["squared_error", "softmax_cross_entropy"])
def test_minus_preconditioned_gradient_is_egn_direction(loss):
    params, x, y, _ = _problem(loss)
    d, info = gn.egn_direction(mlp, params, x, y, loss=loss, damping=1e-3)
    got = _apply(params, info.grad, x, y, 1e-3, loss=loss, curvature="exact")
    assert rel_err(-flat(got), flat(d)) < 1e-10


def test_masked_leaves_use_the_restricted_ggn():
    """A MaskedNode subtree is left out: P_a u_a = (J_aᵀ Q J_a / b + λI)⁻¹ u_a at the full params."""
    loss, lam = "softmax_cross_entropy", 1e-2
    params, x, y, u = _problem(loss)
    u_masked = {"hidden": optax.MaskedNode(), "out": u["out"]}
    got = precondition(mlp, params, u_masked, x, y, loss=loss, damping=lam)
    assert isinstance(got["hidden"], optax.MaskedNode)

    def out_only(p_out, xx):
        return mlp({"hidden": params["hidden"], "out": p_out}, xx)

    ref = dense_preconditioned(out_only, params["out"], x, y, loss, lam, flat(u["out"]))
    assert rel_err(flat(got["out"]), ref) < 1e-8
    # not the a-block of the full inverse: the restriction is a different (cheaper) operator
    full = dense_preconditioned(mlp, params, x, y, loss, lam, flat(u))
    _, unravel = ravel_pytree(params)
    assert rel_err(flat(unravel(full)["out"]), ref) > 1e-3


def test_damping_schedule_follows_the_count():
    loss = "squared_error"
    params, x, y, u = _problem(loss)
    tx = gn.egn_preconditioner(mlp, loss=loss, damping=lambda n: 0.1 * (n + 1.0))
    update = jax.jit(tx.update)
    state = tx.init(params)
    for n in range(2):
        out, state = update(u, state, params, x=x, y=y)
        ref = dense_preconditioned(mlp, params, x, y, loss, 0.1 * (n + 1), flat(u))
        assert rel_err(flat(out), ref) < 1e-8
    assert int(state.count) == 2


def test_update_dtype_follows_the_incoming_update():
    params, x, y, u = _problem("squared_error")
    u32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), u)
    tx = gn.egn_preconditioner(mlp, loss="squared_error")
    out, _ = tx.update(u32, tx.init(params), params, x=x, y=y)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))


def test_errors_name_the_fix():
    params, x, y, u = _problem("softmax_cross_entropy")
    tx = gn.egn_preconditioner(mlp, loss="softmax_cross_entropy")
    state = tx.init(params)
    with pytest.raises(ValueError, match="x=x, y=y"):
        tx.update(u, state, params)
    masked = {"hidden": optax.MaskedNode(), "out": params["out"]}
    with pytest.raises(ValueError, match="full_params=params"):
        tx.update(u, state, masked, x=x, y=y)
    sampled = gn.egn_preconditioner(mlp, loss="softmax_cross_entropy", curvature="sampled")
    with pytest.raises(ValueError, match="key=jax.random.key"):
        sampled.update(u, sampled.init(params), params, x=x, y=y)
    with pytest.raises(ValueError, match="damping"):
        gn.egn_preconditioner(mlp, loss="squared_error", damping=0.0)
    with pytest.raises(ValueError, match="curvature"):
        gn.egn_preconditioner(mlp, loss="squared_error", curvature="diagonal")
    with pytest.raises(ValueError, match="gram"):
        gn.egn_preconditioner(mlp, loss="squared_error", gram="nope")
    with pytest.raises(ValueError, match="num_samples"):
        gn.egn_preconditioner(mlp, loss="squared_error", num_samples=0)


def _one_layer(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


@jax.jit
def _apply_one_layer(p, u, x, y):
    return precondition(_one_layer, p, u, x, y, loss="softmax_cross_entropy", damping=0.1)


@settings(max_examples=3, deadline=None)
@given(b=st.integers(1, 5), c=st.integers(2, 4), d_in=st.integers(1, 3), seed=st.integers(0, 99))
def test_matches_dense_inverse_over_shapes(b, c, d_in, seed):
    """Softmax CE (exact factor, r = c − 1 < c) for varying batch, classes and inputs."""
    kp, kv, kx, ky, ku = jax.random.split(jax.random.key(seed), 5)
    p = {"w": jax.random.normal(kp, (d_in, 3)), "v": jax.random.normal(kv, (3, c))}
    x = jax.random.normal(kx, (b, d_in))
    y = jax.random.randint(ky, (b,), 0, c)
    u_flat = jax.random.normal(ku, (ravel_pytree(p)[0].size,))
    u = ravel_pytree(p)[1](u_flat)
    got = _apply_one_layer(p, u, x, y)
    loss = get_loss("softmax_cross_entropy")
    f = _one_layer(p, x)
    s = np.asarray(loss.factor(f, loss.prepare_labels(f, y)))
    jac = np.asarray(dense_jacobian(_one_layer, p, x)[0]).reshape(b, c, -1)
    a = np.einsum("bcr,bcd->brd", s, jac).reshape(-1, jac.shape[-1])
    ref = np.linalg.solve(a.T @ a / b + 0.1 * np.eye(a.shape[1]), np.asarray(u_flat))
    assert rel_err(flat(got), ref) < 1e-8


def test_float32_stays_close_to_the_float64_reference():
    """float32 params and updates: the Woodbury form loses ~cond·eps32; 2e-3 as in the
    float32 tests of the row-space direction."""
    loss, lam = "softmax_cross_entropy", 1e-2
    params, x, y, u = _problem(loss)
    to32 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
    got = _apply(to32(params), to32(u), x.astype(jnp.float32), y, lam, loss=loss, curvature="exact")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(got))
    ref = dense_preconditioned(mlp, params, x, y, loss, lam, flat(u))
    assert rel_err(flat(got), ref) < 2e-3
