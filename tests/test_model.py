"""Model state and per-step keys (gn.Model), and the rule "never a step into a non-finite region".

- A stateful model's state is threaded by the step: the new state comes from the evaluation at the
  current parameters, is kept on an accepted step and dropped on a rejected one.
- A model that needs a key sees ONE key per step: the direction and every line-search trial use
  the same function (same dropout mask); steps get different keys.
- When the loss at the new point is not finite (no finite trial), the step is rejected for every
  method of the family, with and without a line search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat

import gaussnewton as gn

X = jax.random.normal(jax.random.key(1), (8, 3))
Y = jnp.sin(X[:, 0])
P0 = {"w": 0.3 * jax.random.normal(jax.random.key(2), (3, 4)), "v": jnp.ones((4,)) / 4}


def _dropout_fn(p, x, *, state, key):
    h = jnp.tanh(x @ p["w"])
    keep = jax.random.bernoulli(key, 0.5, h.shape)
    f = jnp.where(keep, 2.0 * h, 0.0) @ p["v"]
    return f, {"steps": state["steps"] + 1, "mean_h": jnp.mean(h, axis=0)}


MODEL = gn.Model(
    _dropout_fn,
    has_state=True,
    needs_key=True,
    initial_state={"steps": jnp.zeros((), jnp.int32), "mean_h": jnp.zeros(4)},
)


def test_model_requires_key_and_state_contract():
    with pytest.raises(ValueError, match="needs a PRNG key"):
        MODEL.apply(P0, X, MODEL.initial_state, None)
    bad = gn.Model(lambda p, x, *, state: x @ p["w"], has_state=True)
    with pytest.raises(TypeError, match=r"\(outputs, new_state\)"):
        bad.apply(P0, X, {}, None)
    with pytest.raises(TypeError, match="must be True or False"):
        gn.Model(_dropout_fn, has_state=1)
    with pytest.raises(TypeError, match="model_fn must be a callable"):
        gn.egn(3, loss="squared_error")


def test_state_and_key_threaded_through_jitted_steps():
    opt = gn.egn(MODEL, loss="squared_error")
    state = opt.init(P0, key=jax.random.key(0))
    step = jax.jit(opt.step)
    params, losses = P0, []
    for i in range(3):
        key_before = state.key
        new_params, state, info = step(params, state, X, Y)
        assert not bool(info.rejected)
        assert int(state.model_state["steps"]) == i + 1
        # the new state is the one of the evaluation at the OLD params
        np.testing.assert_allclose(
            state.model_state["mean_h"], jnp.mean(jnp.tanh(X @ params["w"]), 0), rtol=1e-10
        )
        # info.loss is the loss of the model bound to this step's key at the old params
        k = jax.random.split(jax.random.wrap_key_data(key_before))[0]
        f = MODEL.apply(params, X, state.model_state, jax.random.fold_in(k, 1))[0]
        np.testing.assert_allclose(info.loss, 0.5 * jnp.mean((f - Y) ** 2), rtol=1e-10)
        # ... and loss_after the SAME function (same mask) at the new params
        f_new = MODEL.apply(new_params, X, state.model_state, jax.random.fold_in(k, 1))[0]
        np.testing.assert_allclose(info.loss_after, 0.5 * jnp.mean((f_new - Y) ** 2), rtol=1e-10)
        losses.append(float(info.loss))
        params = new_params
    assert step._cache_size() == 1


def test_explicit_key_is_deterministic_and_masks_change_between_keys():
    opt = gn.egn(MODEL, loss="squared_error", damping_policy="constant", line_search=None)
    state = opt.init(P0)
    step = jax.jit(opt.step)
    a = step(P0, state, X, Y, jax.random.key(5))
    b = step(P0, state, X, Y, jax.random.key(5))
    c = step(P0, state, X, Y, jax.random.key(6))
    np.testing.assert_array_equal(flat(a[0]), flat(b[0]))
    assert not np.allclose(flat(a[0]), flat(c[0]))


def test_rejected_step_keeps_model_state():
    opt = gn.egn(MODEL, loss="squared_error")
    state = opt.init(P0)
    x_nan = X.at[0, 0].set(jnp.nan)
    params, new_state, info = jax.jit(opt.step)(P0, state, x_nan, Y)
    assert bool(info.rejected)
    assert int(new_state.model_state["steps"]) == 0
    np.testing.assert_array_equal(flat(params), flat(P0))


# ------------------------------------------------------------------- non-finite region (NaN)
def _log_model(p, x):
    return x @ jnp.log(p["w"])  # NaN as soon as a weight becomes negative


XL = jnp.abs(jax.random.normal(jax.random.key(3), (6, 3))) + 0.5
YL = -20.0 * jnp.ones(6)  # pushes log(w) down, i.e. w towards and past 0
PL = {"w": jnp.ones(3)}
HUGE = 1e4
ARMIJO = gn.Armijo(shrink=0.9, max_trials=3, reset="restart")

METHODS = {
    "egn-ls": lambda: gn.egn(
        _log_model, loss="squared_error", learning_rate=HUGE, line_search=ARMIJO
    ),
    "egn-plain": lambda: gn.egn(
        _log_model,
        loss="squared_error",
        learning_rate=HUGE,
        damping_policy="constant",
        line_search=None,
    ),
    "sgn": lambda: gn.sgn(_log_model, loss="squared_error", learning_rate=HUGE, line_search=ARMIJO),
    "ggn": lambda: gn.gram_gauss_newton(_log_model, learning_rate=HUGE),
    "dual_gn": lambda: gn.dual_gn(
        _log_model, loss="squared_error", learning_rate=HUGE, line_search=None
    ),
    "ignd": lambda: gn.ignd(_log_model, loss="squared_error", learning_rate=HUGE, damping=1e-3),
    "sqn": lambda: gn.sqn(_log_model, loss="squared_error", learning_rate=HUGE, line_search=None),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_step_into_a_non_finite_region(name):
    opt = METHODS[name]()
    state = opt.init(PL)
    params, new_state, info = jax.jit(opt.step)(PL, state, XL, YL)
    assert np.isfinite(float(info.loss))
    assert not np.isfinite(float(info.loss_after))
    assert bool(info.rejected)
    np.testing.assert_array_equal(flat(params), flat(PL))
    assert int(new_state.count) == 0
    assert float(new_state.damping) >= float(state.damping)


def test_failed_line_search_that_raises_the_loss_is_rejected():
    """No Armijo trial passes and the last one raises the loss: rejected, not taken."""
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    params = {"w": jnp.zeros(3)}
    opt = gn.egn(
        fn,
        loss="squared_error",
        learning_rate=1e3,  # a full LM step times 1000 overshoots a quadratic
        damping=1e-3,
        line_search=gn.Armijo(max_trials=1, reset="restart"),
    )
    state = opt.init(params)
    new, new_state, info = jax.jit(opt.step)(params, state, XL, XL[:, 0])
    assert not bool(info.ls_accepted)
    assert float(info.loss_after) > float(info.loss)  # finite but higher
    assert bool(info.rejected)
    np.testing.assert_array_equal(flat(new), flat(params))
    assert float(new_state.damping) > float(state.damping)
