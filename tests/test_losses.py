"""Losses: closed forms against autodiff, factors, sampled curvature, label validation (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gaussnewton as gn

BUILTIN = ["squared_error", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


def _case(name, b, c, seed):
    kf, ky = jax.random.split(jax.random.key(seed))
    c = 1 if name == "sigmoid_binary_cross_entropy" else c
    f = 2.0 * jax.random.normal(kf, (b, c))
    loss = gn.get_loss(name)
    if name == "squared_error":
        y = jax.random.normal(ky, (b, c))
    elif name == "softmax_cross_entropy":
        y = jax.random.randint(ky, (b,), 0, c)
    else:
        y = jax.random.bernoulli(ky, 0.3, (b,)).astype(f.dtype)
    return loss, f, loss.prepare_labels(f, y)


@functools.partial(jax.jit, static_argnums=0)
def _closed_and_autodiff(loss, f, y):
    per_example = lambda fi, yi: loss.value(fi[None], yi[None])[0]  # noqa: E731
    s = loss.factor(f, y)
    return (
        (loss.grad(f, y), jax.vmap(jax.grad(per_example))(f, y)),
        (loss.hessian(f, y), jax.vmap(jax.hessian(per_example))(f, y)),
        (jnp.einsum("bcr,bdr->bcd", s, s), loss.hessian(f, y)),
    )


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(BUILTIN),
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_closed_forms_match_autodiff(name, b, c, seed):
    """g, Q from the table equal autodiff of the per-example loss; S Sᵀ = Q (1e-12: float64 rounding)."""
    loss, f, y = _case(name, b, c, seed)
    for closed, reference in _closed_and_autodiff(loss, f, y):
        np.testing.assert_allclose(closed, reference, rtol=1e-12, atol=1e-12)


def test_softmax_factor_orientation():
    """Q = S Sᵀ, and NOT Sᵀ S (the EGN authors' library used the wrong side); S has c − 1 columns
    (rank Q = c − 1), all orthogonal to 1 (Sᵀ1 = 0 because 1ᵀQ1 = 0)."""
    f = jnp.array([[2.0, -1.0, 0.3, 0.0]])
    loss = gn.get_loss("softmax_cross_entropy")
    s = loss.factor(f, loss.prepare_labels(f, jnp.array([1])))[0]
    q = loss.hessian(f, None)[0]
    assert s.shape == (4, 3)
    np.testing.assert_allclose(s @ s.T, q, atol=1e-14)
    np.testing.assert_allclose(s.T @ jnp.ones(4), 0.0, atol=1e-15)
    assert np.linalg.matrix_rank(np.asarray(s)) == 3


@pytest.mark.parametrize("scale", [1.0, 30.0, 200.0])
def test_softmax_factor_float32_extreme_logits(scale):
    """The rank c − 1 factor in float32 keeps S Sᵀ = Q to float32 rounding (2e-6 of max |Q|, a few
    ulps of the O(1) entries), also when p is one-hot to rounding or the last class is certain."""
    f = scale * jax.random.normal(jax.random.key(3), (64, 7), jnp.float32)
    f = f.at[0].set(jnp.array([0, 0, 0, 0, 0, 0, scale], jnp.float32))  # last class certain
    loss = gn.get_loss("softmax_cross_entropy")
    s = jax.jit(loss.factor)(f, None)
    q = np.asarray(loss.hessian(f.astype(jnp.float64), None))
    err = np.abs(
        np.einsum("bcr,bdr->bcd", np.asarray(s, np.float64), np.asarray(s, np.float64)) - q
    )
    assert s.dtype == jnp.float32 and s.shape == (64, 7, 6)
    assert err.max() <= 2e-6 * max(np.abs(q).max(), 1e-30) + 1e-7


@pytest.mark.parametrize(
    "name,c",
    [("softmax_cross_entropy", 4), ("squared_error", 3), ("sigmoid_binary_cross_entropy", 1)],
)
def test_sampled_factor_is_unbiased(name, c):
    """Mean of Ŝ Ŝᵀ over 20000 keys equals Q; the Monte-Carlo error of an entry is below 4/√N ≈ 0.03."""
    loss, f, y = _case(name, 2, c, 7)
    keys = jax.random.split(jax.random.key(1), 20000)

    @jax.jit
    def estimate(f, y, keys):
        s = jax.vmap(lambda k: loss.sample_factor(f, y, k, 1))(keys)  # (N, b, c, 1)
        return jnp.mean(jnp.einsum("nbcr,nbdr->nbcd", s, s), axis=0), loss.hessian(f, y)

    est, q = estimate(f, y, keys)
    np.testing.assert_allclose(est, q, atol=0.03)


def test_sampled_factor_shape_and_scale():
    loss, f, y = _case("softmax_cross_entropy", 3, 5, 0)
    s = jax.jit(loss.sample_factor, static_argnums=3)(f, y, jax.random.key(0), 4)
    assert s.shape == (3, 5, 4)
    # each column is (p − e_ŷ)/√m: columns sum to zero over classes
    np.testing.assert_allclose(s.sum(axis=1), 0.0, atol=1e-12)


def test_convex_loss_matches_closed_form_and_clips():
    """A user loss equal to softmax CE reproduces its g and Q; a concave user loss gets S = 0."""

    def ce(fi, yi):
        return jax.nn.logsumexp(fi) - fi[yi]

    user = gn.ConvexLoss(ce, name="my_ce")
    loss, f, y_onehot = _case("softmax_cross_entropy", 3, 4, 3)
    y = jnp.argmax(y_onehot, axis=-1)
    g, s = jax.jit(lambda f, y: (user.grad(f, y), user.factor(f, y)))(f, y)
    np.testing.assert_allclose(g, loss.grad(f, y_onehot), atol=1e-12)
    np.testing.assert_allclose(
        jnp.einsum("bcr,bdr->bcd", s, s), loss.hessian(f, y_onehot), atol=1e-12
    )
    concave = gn.ConvexLoss(lambda fi, yi: -jnp.sum(fi**2))
    np.testing.assert_allclose(jax.jit(concave.factor)(f, y), 0.0)


def test_convex_loss_needs_callable():
    with pytest.raises(TypeError, match="ConvexLoss"):
        gn.ConvexLoss(3)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="loss='hinge'"):
        gn.get_loss("hinge")


def test_label_validation_messages():
    f3 = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="c = 1"):
        gn.get_loss("sigmoid_binary_cross_entropy").prepare_labels(f3, jnp.zeros(4))
    with pytest.raises(ValueError, match="do not match"):
        gn.get_loss("squared_error").prepare_labels(f3, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="integer class indices"):
        gn.get_loss("softmax_cross_entropy").prepare_labels(f3, jnp.zeros(4))
    with pytest.raises(ValueError, match="do not fit"):
        gn.get_loss("softmax_cross_entropy").prepare_labels(f3, jnp.zeros((4, 2)))
    # (b,) labels are accepted for a single output
    assert gn.get_loss("squared_error").prepare_labels(jnp.zeros((4, 1)), jnp.zeros(4)).shape == (
        4,
        1,
    )


def test_sigmoid_factor_stable_for_large_logits():
    loss = gn.get_loss("sigmoid_binary_cross_entropy")
    f = jnp.array([[40.0], [-40.0]], jnp.float32)
    s = loss.factor(f, loss.prepare_labels(f, jnp.array([1.0, 0.0])))
    assert np.all(np.asarray(s) > 0)  # σ(1 − σ) ≈ e^-40 does not round to 0 via 1 − σ
