"""Flax NNX and Equinox models through the adapters: exact direction (float64) and training."""

import jax
import jax.numpy as jnp
import pytest
from conftest import dense_lm_direction, flat, rel_err

import gaussnewton as gn


def _data(dtype=jnp.float64):
    x = jax.random.normal(jax.random.key(0), (6, 3), dtype)
    return x, jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1])], axis=1)


def _check_direction_and_train(model_fn, params, x, y):
    """The EGN direction equals the dense float64 LM direction (1e-8); 5 EGN steps are taken.

    Returns the trained params and the loss before the first step."""
    d, _ = jax.jit(
        lambda p: gn.egn_direction(model_fn, p, x, y, loss="squared_error", damping=1e-2)
    )(params)
    ref, _ = dense_lm_direction(model_fn, params, x, y, "squared_error", 1e-2)
    assert rel_err(flat(d), ref) < 1e-8
    opt = gn.egn(model_fn, loss="squared_error")
    state, step = opt.init(params), jax.jit(opt.step)
    first = None
    for _ in range(5):
        params, state, info = step(params, state, x, y)
        first = float(info.loss) if first is None else first
    return params, first


def _loss(model, x, y):
    return float(0.5 * jnp.mean(jnp.sum((model(x) - y) ** 2, axis=1)))


def test_nnx_direction_matches_dense_and_trains():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 5, param_dtype=jnp.float64, rngs=rngs)
            self.b = nnx.Linear(5, 2, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    model_fn, params, combine = gn.from_nnx(Net(nnx.Rngs(0)))
    x, y = _data()
    params, first = _check_direction_and_train(model_fn, params, x, y)
    # the rebuilt nnx module computes the trained function
    assert _loss(combine(params), x, y) < 0.5 * first


def test_equinox_direction_matches_dense_and_trains():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(
        3, 2, width_size=5, depth=2, activation=jnp.tanh, key=jax.random.key(1), dtype=jnp.float64
    )
    model_fn, params, combine = gn.from_equinox(mlp)
    x, y = _data()
    params, first = _check_direction_and_train(model_fn, params, x, y)
    trained = combine(params)
    assert isinstance(trained, eqx.nn.MLP)
    assert _loss(jax.vmap(trained), x, y) < 0.5 * first
