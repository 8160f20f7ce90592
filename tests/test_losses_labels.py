"""Label and weight checks: eager ValueErrors, and labels_valid / NaN values under jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaussnewton as gn
from gaussnewton.losses import WeightedLabels, row_tolerance

CE, SE, BCE = (
    gn.get_loss(n)
    for n in ("softmax_cross_entropy", "squared_error", "sigmoid_binary_cross_entropy")
)

F10 = jnp.zeros((3, 10))  # 10 classes
F_TOK = jnp.zeros((2, 4, 5))  # (b, T, c) logits
F_BCE = jnp.zeros((2, 3, 1))
ONES_TOK = jnp.ones((2, 4))
PROBS = jnp.full((3, 10), 0.1)

# (loss, f, y, eager message pattern)
BAD = {
    "class 10 of 10": (CE, F10, jnp.array([0, 10, 3]), r"\[0, 10\).*got 10 at index \(1,\)"),
    "class -1": (CE, F10, jnp.array([-1, 0, 3]), r"\[0, 10\).*got -1 at index \(0,\)"),
    "per-token class 5 of 5": (
        CE,
        F_TOK,
        jnp.array([[0, 1, 2, 3], [4, 5, 0, 0]]),
        r"\[0, 5\).*got 5 at index \(1, 1\)",
    ),
    "bce 1.5": (BCE, F_BCE, jnp.array([[0.0, 1.5, 1.0], [0, 0, 0]]), r"\[0, 1\].*got \[1.5\]"),
    "bce -0.2 per token": (BCE, F_BCE, -0.2 * jnp.ones((2, 3, 1)), r"\[0, 1\].*6 of 6 tokens"),
    "negative row entry": (
        CE,
        F10,
        PROBS.at[1, :2].set(jnp.array([0.3, -0.1])),
        r"entries >= 0.*index \(1,\)",
    ),
    "row sum 1.1": (CE, F10, PROBS.at[2, 0].set(0.2), r"sum to 1 \(tol 1.5e-08\).*index \(2,\)"),
    "NaN row": (CE, F10, PROBS.at[0, 0].set(jnp.nan), r"entries >= 0"),
    "inf regression target": (SE, F_TOK, jnp.zeros(F_TOK.shape).at[1, 2, 0].set(jnp.inf), "finite"),
    "negative weight": (
        CE,
        F_TOK,
        WeightedLabels(jnp.zeros((2, 4), int), ONES_TOK.at[0, 1].set(-1.0)),
        r"weights must be finite and >= 0; got -1.0 at index \(0, 1\)",
    ),
    "inf weight": (
        SE,
        F_TOK,
        WeightedLabels(jnp.zeros(F_TOK.shape), ONES_TOK.at[1, 3].set(jnp.inf)),
        r"weights must be finite.*got inf",
    ),
    "all weights 0": (
        CE,
        F_TOK,
        WeightedLabels(jnp.zeros((2, 4), int), 0 * ONES_TOK),
        "weights are all 0",
    ),
}


def _valid_under_jit(loss, f, y):
    return bool(jax.jit(lambda f, y: loss.labels_valid(f, loss.prepare_labels(f, y)))(f, y))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_labels_raise_eagerly_and_are_invalid_under_jit(case):
    """Each bad case raises the documented ValueError (naming the value and where it is) when the
    labels are concrete, and gives labels_valid = False when they are traced."""
    loss, f, y, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        loss.prepare_labels(f, y)
    assert not _valid_under_jit(loss, f, y)


@pytest.mark.parametrize(
    "loss,f,y",
    [
        (CE, F10, jnp.array([0, 9, 3])),
        (CE, F10, PROBS),
        (CE, F_TOK, jnp.array([[0, 1, 2, 3], [4, 4, 0, 0]])),
        (BCE, F_BCE, jnp.array([[0.0, 1.0, 0.5], [0, 0, 0]])),
        (SE, F_TOK, jnp.ones(F_TOK.shape)),
        # masked tokens may carry any label (padding with -100), their weight is 0
        (
            CE,
            F_TOK,
            WeightedLabels(
                jnp.array([[0, 1, -100, -100], [4, 4, 0, -100]]),
                jnp.array([[1.0, 1, 0, 0], [1, 1, 1, 0]]),
            ),
        ),
    ],
)
def test_good_labels_pass_eagerly_and_under_jit(loss, f, y):
    yy = loss.prepare_labels(f, y)
    assert bool(loss.labels_valid(f, yy))
    assert _valid_under_jit(loss, f, y)


def test_out_of_range_class_gives_nan_value_under_jit_not_a_clamped_class():
    """Under jit an out-of-range index makes THAT example's value NaN (one_hot alone would give a
    zero row, i.e. a silently wrong finite loss); the other examples are unaffected."""
    fn = jax.jit(lambda f, y: CE.value(f, CE.prepare_labels(f, y)))
    f = jax.random.normal(jax.random.key(0), (3, 10))
    value = np.asarray(fn(f, jnp.array([0, 10, 3])))
    assert np.isnan(value[1]) and np.all(np.isfinite(value[[0, 2]]))
    np.testing.assert_allclose(value[[0, 2]], np.asarray(fn(f, jnp.array([0, 1, 3])))[[0, 2]])
    tok = np.asarray(fn(F_TOK, jnp.array([[0, 1, 2, 3], [-1, 4, 0, 0]])))
    assert np.isfinite(tok[0]) and np.isnan(tok[1])


def test_masked_padding_labels_give_zero_gradient_and_factor():
    """Tokens of weight 0 with label -100: g and S are exactly 0 there, eagerly and under jit."""
    f = jax.random.normal(jax.random.key(1), F_TOK.shape)
    y = WeightedLabels(
        jnp.array([[0, 1, -100, 2], [4, 4, 0, -100]]), jnp.array([[1.0, 1, 0, 1], [1, 1, 1, 0]])
    )

    def grad_and_factor(f, y):
        yy = CE.prepare_labels(f, y)
        return CE.grad(f, yy), CE.factor(f, yy), CE.value(f, yy)

    for fn in (grad_and_factor, jax.jit(grad_and_factor)):
        g, s, v = fn(f, y)
        assert np.all(np.isfinite(v))
        assert np.all(np.asarray(g)[[0, 1], [2, 3]] == 0) and np.all(
            np.asarray(s)[[0, 1], [2, 3]] == 0
        )


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_probability_row_tolerance(dtype):
    """Rows off by half the stated tolerance pass, rows off by twice it are rejected."""
    c = 10
    tol = row_tolerance(dtype, dtype, c)
    assert tol == max(np.sqrt(np.finfo(dtype).eps), 4 * c * np.finfo(dtype).eps)
    f = jnp.zeros((1, c), dtype)
    base = np.full((1, c), 0.1)
    CE.prepare_labels(f, jnp.asarray(base + np.eye(c)[:1] * tol / 2, dtype))
    with pytest.raises(ValueError, match="sum to 1"):
        CE.prepare_labels(f, jnp.asarray(base + np.eye(c)[:1] * 2 * tol, dtype))


def test_shape_mismatches_raise_also_under_jit():
    """Label and weight shapes are checked at trace time."""
    bad_labels = (CE, F_TOK, jnp.zeros((2, 3), int), "do not fit")
    bad_weights = (CE, F_TOK, WeightedLabels(jnp.zeros((2, 4), int), jnp.ones((2, 3))), r"\(2, 4\)")
    bad_se = (SE, F_TOK, jnp.zeros((2, 4, 2)), "do not match")
    for loss, f, y, pattern in (bad_labels, bad_weights, bad_se):
        with pytest.raises(ValueError, match=pattern):
            loss.prepare_labels(f, y)
        with pytest.raises(ValueError, match=pattern):
            jax.jit(loss.prepare_labels)(f, y)
    with pytest.raises(ValueError, match=r"\(b, \*tok, c\)"):
        SE.prepare_labels(jnp.zeros(3), jnp.zeros(3))


def test_half_squared_error_alias_and_optax_naming():
    """'half_squared_error' is the same loss; it is ½‖f − y‖² = optax.l2_loss, half of
    optax.squared_error (summed over outputs)."""
    assert gn.get_loss("half_squared_error") is gn.get_loss("squared_error")
    f = jax.random.normal(jax.random.key(2), (3, 2))
    y = jax.random.normal(jax.random.key(3), (3, 2))
    value = SE.value(f, SE.prepare_labels(f, y))
    np.testing.assert_allclose(value, optax.l2_loss(f, y).sum(-1), rtol=1e-14)
    np.testing.assert_allclose(2 * value, optax.squared_error(f, y).sum(-1), rtol=1e-14)
    with pytest.raises(ValueError, match="half_squared_error"):
        gn.get_loss("mse")


def test_concrete_labels_inside_jit_are_checked_at_trace_time():
    """Labels closed over by a jitted function are concrete: they are checked (and reshaped,
    (b,) -> (b, 1) for one output) while tracing, without reading a tracer."""
    y = jnp.array([0.5, -1.0, 2.0])
    value = jax.jit(lambda f: SE.value(f, SE.prepare_labels(f, y)))(jnp.zeros((3, 1)))
    np.testing.assert_allclose(value, 0.5 * y**2)
    weighted = WeightedLabels(jnp.array([0, 1, -100]), jnp.array([1.0, 1.0, 0.0]))
    value = jax.jit(lambda f: CE.value(f, CE.prepare_labels(f, weighted)))(F10)
    np.testing.assert_allclose(value, [1.5 * np.log(10), 1.5 * np.log(10), 0.0], rtol=1e-14)
    bad = jnp.array([0, 10, 3])
    with pytest.raises(ValueError, match="got 10 at index"):
        jax.jit(lambda f: CE.value(f, CE.prepare_labels(f, bad)))(F10)
