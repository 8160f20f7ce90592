"""The optax bridge.

``as_optax``: same update as ``step``, ignores the incoming update, chains after it, nnx.Optimizer.
``egn_preconditioner``: composition anywhere in optax (chain with clipping / weight decay before and
after, masked, multi_transform, MultiSteps, nnx.Optimizer, jit without retracing), each compared to
the manual composition with :func:`gaussnewton.preconditioner.precondition` (itself checked against
dense float64 references in test_preconditioner.py) at 1e-12 relative in float64 (same operations in
another order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat, init_mlp, make_labels, mlp, rel_err

import gaussnewton as gn
from gaussnewton.preconditioner import precondition


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


def _nnx_mlp(nnx):
    """A 3-8-1 tanh MLP as a Flax NNX module (shared by the nnx.Optimizer tests)."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))[:, 0]

    return MLP(nnx.Rngs(0))


def test_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    model = _nnx_mlp(nnx)
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


# --- egn_preconditioner: the composable form (preconditions the incoming update) --------------

B, D_IN, C, LAM, LR = 6, 3, 3, 1e-2, 0.5


def _problem(loss="softmax_cross_entropy", seed=0):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = init_mlp(kp, D_IN, C, width=4)
    x = jax.random.normal(kx, (B, D_IN))
    y = make_labels(ky, loss, B, C)
    return params, x, y


def _grad(params, x, y, loss="softmax_cross_entropy"):
    lo = gn.get_loss(loss)

    def mean_loss(p):
        f = mlp(p, x)
        return jnp.mean(lo.value(f, lo.prepare_labels(f, y)))

    return jax.grad(mean_loss)(params)


def _tmap(f, *trees):
    return jax.tree_util.tree_map(f, *trees)


@jax.jit
def _precondition(params, u, x, y):
    """The reference composition: P u by the function under test outside any optax wrapper."""
    return precondition(mlp, params, u, x, y, loss="softmax_cross_entropy", damping=LAM)


def test_update_ignores_the_incoming_gradient(regression_problem):
    """as_optax is a whole LM step: what arrives as `updates` does not change its output."""
    model_fn, params, x, y = regression_problem
    tx = gn.as_optax(gn.egn(model_fn, loss="squared_error"))
    update = jax.jit(tx.update)
    a, _ = update(params, tx.init(params), params, x=x, y=y)
    b, _ = update(_tmap(jnp.zeros_like, params), tx.init(params), params, x=x, y=y)
    np.testing.assert_array_equal(flat(a), flat(b))


def test_preconditioner_in_a_chain_with_clipping_and_weight_decay():
    params, x, y = _problem()
    g = _grad(params, x, y)
    clip, wd1, wd2 = 0.05, 1e-2, 3e-3
    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.add_decayed_weights(wd1),
        gn.egn_preconditioner(mlp, loss="softmax_cross_entropy", damping=LAM),
        optax.add_decayed_weights(wd2),
        optax.clip_by_global_norm(10 * clip),
        optax.sgd(LR),
    )
    got, _ = jax.jit(tx.update)(g, tx.init(params), params, x=x, y=y)

    def clip_to(u, c):
        n = optax.tree.norm(u)
        return _tmap(lambda a: a * jnp.minimum(1.0, c / n), u)

    assert float(optax.tree.norm(g)) > clip  # the first clip is active
    u = _tmap(lambda a, p: a + wd1 * p, clip_to(g, clip), params)
    u = _tmap(lambda a, p: a + wd2 * p, _precondition(params, u, x, y), params)
    expected = _tmap(lambda a: -LR * a, clip_to(u, 10 * clip))
    assert rel_err(flat(got), flat(expected)) < 1e-12


def test_preconditioner_inside_masked_uses_the_restricted_ggn():
    params, x, y = _problem()
    g = _grad(params, x, y)
    tx = optax.masked(
        gn.egn_preconditioner(mlp, loss="softmax_cross_entropy", damping=LAM),
        {"hidden": False, "out": True},
    )
    got, _ = jax.jit(tx.update)(g, tx.init(params), params, x=x, y=y, full_params=params)
    restricted = _precondition(params, {"hidden": optax.MaskedNode(), "out": g["out"]}, x, y)
    np.testing.assert_array_equal(flat(got["hidden"]), flat(g["hidden"]))  # passed through
    assert rel_err(flat(got["out"]), flat(restricted["out"])) < 1e-12
    assert rel_err(flat(got["out"]), flat(g["out"])) > 1e-2  # and really preconditioned


def test_preconditioner_in_multi_transform_is_block_diagonal():
    params, x, y = _problem()
    g = _grad(params, x, y)
    prec = gn.egn_preconditioner(mlp, loss="softmax_cross_entropy", damping=LAM)
    tx = optax.multi_transform(
        {"gn": optax.chain(prec, optax.scale(-LR)), "sgd": optax.sgd(0.1)},
        {"hidden": "gn", "out": "sgd"},
    )
    got, _ = jax.jit(tx.update)(g, tx.init(params), params, x=x, y=y, full_params=params)
    hidden = _precondition(params, {"hidden": g["hidden"], "out": optax.MaskedNode()}, x, y)
    expected = {
        "hidden": _tmap(lambda a: -LR * a, hidden["hidden"]),
        "out": _tmap(lambda a: -0.1 * a, g["out"]),
    }
    assert rel_err(flat(got), flat(expected)) < 1e-12


def test_multisteps_preconditions_the_mean_gradient_with_the_last_micro_batch():
    params, x1, y1 = _problem(seed=0)
    _, x2, y2 = _problem(seed=1)
    g1, g2 = _grad(params, x1, y1), _grad(params, x2, y2)
    ms = optax.MultiSteps(
        optax.chain(
            gn.egn_preconditioner(mlp, loss="softmax_cross_entropy", damping=LAM),
            optax.scale(-LR),
        ),
        every_k_schedule=2,
        accumulator_dtype=jnp.float64,  # MultiSteps' default accumulates in float32
    )
    update = jax.jit(ms.update)
    state = ms.init(params)
    first, state = update(g1, state, params, x=x1, y=y1)
    second, state = update(g2, state, params, x=x2, y=y2)
    assert float(optax.tree.norm(first)) == 0.0
    mean = _tmap(lambda a, b: 0.5 * (a + b), g1, g2)
    expected = _tmap(lambda a: -LR * a, _precondition(params, mean, x2, y2))
    assert rel_err(flat(second), flat(expected)) < 1e-12
    assert int(state.inner_opt_state[0].count) == 1  # the λ-schedule count: once per emitted step


def test_preconditioner_compiles_once_across_steps():
    params, x, y = _problem()
    g = _grad(params, x, y)
    tx = optax.chain(
        gn.egn_preconditioner(mlp, loss="softmax_cross_entropy", damping=lambda n: LAM / (1.0 + n)),
        optax.sgd(LR, momentum=0.9),
    )
    traces = []

    @jax.jit
    def step(p, state):
        traces.append(None)
        updates, state = tx.update(g, state, p, x=x, y=y)
        return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for _ in range(3):
        p, state = step(p, state)
    assert len(traces) == 1
    assert int(state[0].count) == 3


def test_preconditioner_with_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    model = _nnx_mlp(nnx)
    model_fn, params, _ = gn.from_nnx(model)
    params = jax.tree_util.tree_map(jnp.copy, params)  # a snapshot: the optimizer updates in place
    x = jax.random.normal(jax.random.key(1), (32, 3), jnp.float32)
    y = jnp.sin(2 * x[:, 0])
    prec = gn.egn_preconditioner(model_fn, loss="squared_error", damping=1e-2)
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.clip_by_global_norm(10.0), prec, optax.sgd(0.5)), wrt=nnx.Param
    )

    def loss_of(m):
        return 0.5 * jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(loss_of)(model)
        optimizer.update(model, grads, x=x, y=y)
        return grads

    first = float(loss_of(model))
    grads = train_step(model, optimizer)
    # the first step is p − 0.5 P∇L (the gradient is far below the clip norm)
    expected = _tmap(
        lambda p, u: p - 0.5 * u,
        params,
        precondition(model_fn, params, grads, x, y, loss="squared_error", damping=1e-2),
    )
    _, after, _ = gn.from_nnx(model)
    assert rel_err(flat(after), flat(expected)) < 1e-5  # float32 model
    for _ in range(9):
        train_step(model, optimizer)
    assert float(loss_of(model)) < 0.2 * first
