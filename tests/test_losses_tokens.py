"""Per-token losses (outputs (b, *tok, c)) and per-token weights against dense float64 autodiff.

The reference is written independently of the library: the per-example loss
``l_i(f_i) = Σ_t s_it l(f_it, y_it)`` (``s_it = b w_it / Σw``, or ``1/T`` without weights) as a
function of the FLATTENED outputs ``f_i.reshape(-1)``; its ``jax.grad`` and ``jax.hessian``
(a ``Tc × Tc`` matrix, block-diagonal with the per-token blocks) are compared to the closed forms.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gaussnewton as gn
from gaussnewton.losses import (
    WeightedLabels,
    expand,
    num_outputs,
    num_tokens,
    project,
    token_shape,
)

NAMES = ["squared_error", "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "convex"]


def _pseudo_huber(ft, yt):
    return jnp.sum(jnp.sqrt(1 + (ft - yt) ** 2) - 1)


CONVEX = gn.ConvexLoss(_pseudo_huber, name="pseudo_huber")


def _reference_token_loss(name, rows):
    """One token's loss l(f_t, y_t), written from the formulas (not the library)."""
    if name == "squared_error":
        return lambda ft, yt: 0.5 * jnp.sum((ft - yt) ** 2)
    if name == "softmax_cross_entropy" and rows:
        return lambda ft, yt: jax.nn.logsumexp(ft) - jnp.dot(yt, ft)
    if name == "softmax_cross_entropy":
        return lambda ft, yt: jax.nn.logsumexp(ft) - ft[yt]
    if name == "sigmoid_binary_cross_entropy":
        return lambda ft, yt: jnp.sum(jnp.logaddexp(0.0, ft) - yt * ft)
    return _pseudo_huber


def _problem(name, b, tok, c, seed, weighted, rows=False):
    """Outputs, raw labels (per-token leading axes (b, *tok)) and weights (or None)."""
    kf, ky, kw, km = jax.random.split(jax.random.key(seed), 4)
    c = 1 if name == "sigmoid_binary_cross_entropy" else c
    f = 2.0 * jax.random.normal(kf, (b, *tok, c))
    if name in ("squared_error", "convex"):
        y = jax.random.normal(ky, f.shape)
    elif name == "softmax_cross_entropy" and rows:
        y = jax.nn.softmax(jax.random.normal(ky, f.shape), axis=-1)
    elif name == "softmax_cross_entropy":
        y = jax.random.randint(ky, (b, *tok), 0, c)
    else:
        y = jax.random.uniform(ky, (b, *tok))
    w = None
    if weighted:
        w = jax.random.uniform(kw, (b, *tok), minval=0.1, maxval=2.0)
        w = jnp.where(jax.random.bernoulli(km, 0.3, w.shape), 0.0, w).at[(0,) * w.ndim].set(1.0)
    return f, y, w


def _reference(name, rows, f, y, w):
    """Per-example value, gradient and dense Hessian of l_i w.r.t. f_i.reshape(-1)."""
    b, c = f.shape[0], f.shape[-1]
    t = math.prod(f.shape[1:-1])
    s = jnp.full((b, t), 1.0 / t) if w is None else (b * w / jnp.sum(w)).reshape(b, t)
    tok_loss = _reference_token_loss(name, rows)
    yt_all = y.reshape((b, t) + y.shape[f.ndim - 1 :])

    def per_example(fi_flat, yi, si):
        lt = jax.vmap(tok_loss)(fi_flat.reshape(t, c), yi)
        return jnp.sum(jnp.where(si != 0, si * lt, 0.0))

    args = (f.reshape(b, t * c), yt_all, s)
    return (
        jax.vmap(per_example)(*args),
        jax.vmap(jax.grad(per_example))(*args).reshape(f.shape),
        jax.vmap(jax.hessian(per_example))(*args),  # (b, Tc, Tc)
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compare(name, rows, f, y, w):
    loss = CONVEX if name == "convex" else gn.get_loss(name)
    yy = loss.prepare_labels(f, y if w is None else WeightedLabels(y, w))
    s = loss.factor(f, yy)
    closed = (loss.value(f, yy), loss.grad(f, yy), loss.hessian(f, yy))
    return closed, jnp.einsum("...cr,...dr->...cd", s, s), _reference(name, rows, f, y, w)


def _blockdiag(blocks):
    """(b, *tok, c, c) per-token blocks -> (b, Tc, Tc) block-diagonal per-example matrix."""
    b, c = blocks.shape[0], blocks.shape[-1]
    t = math.prod(blocks.shape[1:-2])
    blocks = np.asarray(blocks).reshape(b, t, c, c)
    full = np.einsum("tu,btcd->btcud", np.eye(t), blocks)
    return full.reshape(b, t * c, t * c)


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    b=st.integers(1, 3),
    tok=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    c=st.sampled_from([1, 3, 5]),
    weighted=st.booleans(),
    rows=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_per_token_closed_forms_match_dense_autodiff(name, b, tok, c, weighted, rows, seed):
    """value, g and Q (block-diagonal: off-diagonal token blocks are 0) equal autodiff of the flat
    per-example loss, with and without weights; S Sᵀ = Q per token. Float64, 1e-12: the two sides
    differ only in summation order of O(10) terms (rounding ~1e-15)."""
    rows = rows and name == "softmax_cross_entropy"
    f, y, w = _problem(name, b, tuple(tok), c, seed, weighted, rows)
    (value, grad, hess), ssT, (ref_value, ref_grad, ref_hess) = _compare(name, rows, f, y, w)
    assert value.shape == (b,) and grad.shape == f.shape and hess.shape == f.shape + (f.shape[-1],)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_blockdiag(hess), ref_hess, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ssT, hess, rtol=1e-12, atol=1e-12)
    if w is not None:  # masked tokens: exactly zero gradient and factor
        yy = WeightedLabels(y, w)
        loss = CONVEX if name == "convex" else gn.get_loss(name)
        yy = loss.prepare_labels(f, yy)
        off = np.asarray(w) == 0
        assert np.all(np.asarray(grad)[off] == 0)
        assert np.all(np.asarray(loss.factor(f, yy))[off] == 0)


@pytest.mark.parametrize("name", ["squared_error", "softmax_cross_entropy"])
def test_unweighted_tokens_are_the_mean_of_2d_losses(name):
    """(b, T, c) without weights = the 2-D loss of the (bT, c) outputs, averaged over each example's
    T tokens (grad and Q scaled by 1/T, S by 1/√T); exact up to rounding (1e-14)."""
    loss = gn.get_loss(name)
    f, y, _ = _problem(name, 2, (3,), 4, 5, False)
    flat_f, flat_y = f.reshape(6, 4), y.reshape((6,) + y.shape[2:])
    y3, y2 = loss.prepare_labels(f, y), loss.prepare_labels(flat_f, flat_y)
    np.testing.assert_allclose(
        loss.value(f, y3), loss.value(flat_f, y2).reshape(2, 3).mean(1), rtol=1e-14
    )
    np.testing.assert_allclose(loss.grad(f, y3), loss.grad(flat_f, y2).reshape(f.shape) / 3)
    np.testing.assert_allclose(
        loss.factor(f, y3), loss.factor(flat_f, y2).reshape(2, 3, 4, -1) / np.sqrt(3), rtol=1e-14
    )


def test_2d_weighted_is_the_weighted_mean():
    """For (b, c) outputs with weights (b,), mean_i value_i = Σ w_i l_i / Σ w (1e-14)."""
    loss = gn.get_loss("softmax_cross_entropy")
    f, y, w = _problem("softmax_cross_entropy", 4, (), 3, 2, True)
    plain = loss.value(f, loss.prepare_labels(f, y))
    weighted = loss.value(f, loss.prepare_labels(f, WeightedLabels(y, w)))
    np.testing.assert_allclose(jnp.mean(weighted), jnp.sum(w * plain) / jnp.sum(w), rtol=1e-14)


@pytest.mark.parametrize(
    "name,c",
    [("softmax_cross_entropy", 4), ("squared_error", 2), ("sigmoid_binary_cross_entropy", 1)],
)
def test_sampled_factor_is_unbiased_per_token_with_weights(name, c):
    """Mean of Ŝ Ŝᵀ over N = 10000 keys (m = 2 draws per token, so 20000 draws) equals the scaled
    per-token Q. One draw's entry has variance ≤ 2 (squared error, ε²) and ≤ 1 otherwise, so the
    error of an entry has std ≤ s_it √(2/20000); the test allows 5 std (≈ 100 entries: a false
    failure has probability < 1e-4). Masked tokens give exact zeros."""
    loss = gn.get_loss(name)
    f, y, w = _problem(name, 2, (3,), c, 11, True)
    yy = loss.prepare_labels(f, WeightedLabels(y, w))
    keys = jax.random.split(jax.random.key(1), 10000)

    @jax.jit
    def estimate(f, yy, keys):
        s = jax.vmap(lambda k: loss.sample_factor(f, yy, k, 2))(keys)  # (N, b, T, c, 2)
        return jnp.mean(jnp.einsum("n...cr,n...dr->n...cd", s, s), axis=0), s[0]

    est, one = estimate(f, yy, keys)
    assert one.shape == f.shape + (2,)
    scale = np.asarray(f.shape[0] * w / jnp.sum(w))[..., None, None]
    err = np.abs(np.asarray(est) - np.asarray(loss.hessian(f, yy)))
    bound = np.broadcast_to(5 * scale * np.sqrt(2 / 2e4), err.shape)
    assert np.all(err <= bound), float((err / np.maximum(bound, 1e-300)).max())
    assert np.all(np.asarray(one)[np.asarray(w) == 0] == 0)


def test_project_expand_and_shape_helpers():
    """project/expand are S_itᵀ v and S_it u token by token (checked against a loop over tokens);
    the shape helpers count tokens and per-example outputs."""
    s = jax.random.normal(jax.random.key(0), (2, 3, 2, 4, 2))  # (b, T1, T2, c, r)
    v = jax.random.normal(jax.random.key(1), (2, 3, 2, 4))
    u = jax.random.normal(jax.random.key(2), (2, 3, 2, 2))
    pv, eu = project(s, v), expand(s, u)
    assert pv.shape == u.shape and eu.shape == v.shape
    s, v, u, pv, eu = (np.asarray(a) for a in (s, v, u, pv, eu))
    for idx in np.ndindex(2, 3, 2):
        np.testing.assert_allclose(pv[idx], s[idx].T @ v[idx], rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(eu[idx], s[idx] @ u[idx], rtol=1e-13, atol=1e-14)
    f = jnp.zeros((2, 3, 2, 4))
    assert token_shape(f) == (3, 2) and num_tokens(f) == 6 and num_outputs(f) == 24
    assert token_shape(f[:, 0, 0]) == () and num_tokens(f[:, 0, 0]) == 1


def test_identity_scale():
    """Q_i = σ I is known statically only without weights: σ = 1 (2-D) or 1/T (per token)."""
    se, ce = gn.get_loss("squared_error"), gn.get_loss("softmax_cross_entropy")
    f = jnp.zeros((2, 4, 3))
    assert se.identity_scale(f[:, 0], None) == 1.0
    assert se.identity_scale(f, None) == 0.25
    assert se.identity_scale(f, WeightedLabels(f, jnp.ones((2, 4)))) is None
    assert ce.identity_scale(f, None) is None
