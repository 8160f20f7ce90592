"""The optax bridge: same update as ``step``, composition with optax.chain and flax.nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat

import gaussnewton as gn


def test_update_equals_step(regression_problem):
    model_fn, params, x, y = regression_problem
    opt = gn.egn(model_fn, loss="squared_error")
    tx = gn.as_optax(opt)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params, x=x, y=y)
    expected, _, info = jax.jit(opt.step)(params, opt.init(params), x, y)
    np.testing.assert_allclose(
        flat(optax.apply_updates(params, updates)), flat(expected), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(state.info.loss, info.loss)
    assert int(state.inner.count) == 1


def test_chain_with_clipping(regression_problem):
    model_fn, params, x, y = regression_problem
    tx = optax.chain(
        gn.as_optax(gn.egn(model_fn, loss="squared_error")), optax.clip_by_global_norm(1e-3)
    )
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params, x=x, y=y)
    assert np.linalg.norm(flat(updates)) <= 1e-3 * (1 + 1e-5)


def test_update_without_batch_explains():
    tx = gn.as_optax(gn.egn(lambda p, x: x @ p, loss="squared_error"))
    p = jnp.zeros(3)
    with pytest.raises(ValueError, match="x=x, y=y"):
        tx.update(p, tx.init(p), p)


def test_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))[:, 0]

    model = MLP(nnx.Rngs(0))
    model_fn, params, _ = gn.from_nnx(model)
    x = jax.random.normal(jax.random.key(1), (32, 3), jnp.float32)
    y = jnp.sin(2 * x[:, 0])
    optimizer = nnx.Optimizer(
        model, gn.as_optax(gn.egn(model_fn, loss="squared_error")), wrt=nnx.Param
    )

    def loss_of(m):
        return 0.5 * jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(loss_of)(model)  # ignored by the EGN transform, required by nnx's API
        optimizer.update(model, grads, x=x, y=y)

    first = float(loss_of(model))
    for _ in range(10):
        train_step(model, optimizer)
    assert float(loss_of(model)) < 0.2 * first
