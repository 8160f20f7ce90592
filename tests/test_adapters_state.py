"""Adapters with model state: NNX / Equinox batch norm and dropout through ``gn.Model``.

Training tests use ``gram="matvec"`` (whole-batch Jacobian products: the exact Gram of a
batch-coupled model, whatever ``"auto"`` does with train-mode batch norm) and check behaviour:
every step decreases the loss of its own function (same batch-norm batch, same dropout mask),
the loss of one fixed function falls, the running statistics and RNG streams in
``opt_state.model_state`` advance once per step, and the rebuilt model in eval / inference mode
uses the stored statistics (a hand computation). Each jitted ``opt.step`` compiles once, and
``opt.step`` called without ``jax.jit`` gives the jitted steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import gaussnewton as gn

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

pytestmark = pytest.mark.filterwarnings(
    # nnx.BatchNorm keeps float32 running statistics even with param_dtype=float64
    "ignore:scatter inputs have incompatible types:FutureWarning"
)


def _digits(b: int):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    return jnp.asarray(x[:b] / 16.0, jnp.float64), jnp.asarray(y[:b])


def _ce(logits, y):
    return float(jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(y)), y]))


def _leaves(tree):
    return [np.asarray(jax.random.key_data(a) if _is_key(a) else a) for a in jax.tree.leaves(tree)]


def _is_key(a):
    return jnp.issubdtype(jnp.result_type(a), jax.dtypes.prng_key)


def _same(t1, t2):
    return all(np.array_equal(a, b) for a, b in zip(_leaves(t1), _leaves(t2), strict=True))


def _train(model_fn, params, x, y, steps, model_state=None):
    """``steps`` jitted EGN steps (exact Gram); returns params, opt state and the infos."""
    opt = gn.egn(model_fn, loss="softmax_cross_entropy", gram="matvec")
    state, step = (
        opt.init(params, key=jax.random.key(3), model_state=model_state),
        jax.jit(opt.step),
    )
    history = [(params, state)]
    infos = []
    for _ in range(steps):
        params, state, info = step(params, state, x, y)
        history.append((params, state))
        infos.append(info)
    return history, infos


def _check_steps(infos):
    for info in infos:
        assert not bool(info.rejected)
        assert bool(info.ls_accepted)
        # the line search saw the function of the direction: its loss decreased on that function
        assert float(info.loss_after) < float(info.loss)


# ----------------------------------------------------------------------------------- Flax NNX
class CNN(nnx.Module):
    """conv 3x3 -> BatchNorm -> relu -> 2x2 average pool -> Dropout -> linear (10 classes)."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), param_dtype=jnp.float64, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.8, param_dtype=jnp.float64, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(4 * 16, 10, param_dtype=jnp.float64, rngs=rngs)

    def features(self, x):
        return self.conv(x.reshape(-1, 8, 8, 1))

    def head(self, h):
        h = nnx.avg_pool(nnx.relu(h), (2, 2), strides=(2, 2))
        return self.out(self.drop(h.reshape(h.shape[0], -1)))

    def __call__(self, x):
        return self.head(self.bn(self.features(x)))


def test_nnx_cnn_batchnorm_dropout_trains_and_keeps_statistics():
    x, y = _digits(16)
    module = CNN(nnx.Rngs(0, dropout=1))  # train mode (the default)
    model_fn, params, combine = gn.from_nnx(module)
    assert isinstance(model_fn, gn.Model) and model_fn.has_state and not model_fn.needs_key
    state0 = model_fn.initial_state
    snapshot = _leaves(state0)
    steps = 8
    history, infos = _train(model_fn, params, x, y, steps)
    _check_steps(infos)
    (p0, s0), (p1, s1), (pn, sn) = history[0], history[1], history[-1]
    ms0, ms1, msn = s0.model_state, s1.model_state, sn.model_state

    # one function per step: the reported loss is that of the model bound to the step's state
    assert abs(_ce(model_fn.bind(ms0)(p0, x), y) - float(infos[0].loss)) < 1e-10
    assert abs(_ce(model_fn.bind(ms1)(p1, x), y) - float(infos[1].loss)) < 1e-10
    # ... and the next step draws a new dropout mask (the stream in the state advanced)
    assert not np.allclose(model_fn.bind(ms0)(p1, x), model_fn.bind(ms1)(p1, x))
    count = msn["drop"]["rngs"]["count"][...]
    assert int(count) == int(state0["drop"]["rngs"]["count"][...]) + steps
    # the loss of one fixed function (state 0: its batch and mask) fell
    assert _ce(model_fn.bind(ms0)(pn, x), y) < 0.5 * _ce(model_fn.bind(ms0)(p0, x), y)

    # running statistics moved from their initial values (0, 1); the user's module is untouched
    mean, var = msn["bn"]["mean"][...], msn["bn"]["var"][...]
    assert np.abs(mean).max() > 1e-3 and np.abs(var - 1).max() > 1e-3
    assert np.array_equal(module.bn.mean[...], np.zeros(4))
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(state0), snapshot, strict=True))

    # eval mode of the rebuilt module uses the stored statistics
    trained = combine(pn, msn)
    trained.eval()
    out = trained(x)
    z = trained.features(x)
    bn = trained.bn
    hand = (z - mean) / jnp.sqrt(var + bn.epsilon) * bn.scale[...] + bn.bias[...]
    # dropout is off in eval mode; nnx keeps the statistics in float32 and normalizes with
    # rsqrt(var + eps) in its own order: agreement to float32 rounding (measured 4e-8)
    assert rel_err(out, trained.head(hand)) < 1e-6
    initial_stats = combine(pn)  # default: the state at from_nnx time
    initial_stats.eval()
    assert np.array_equal(initial_stats.bn.mean[...], np.zeros(4))
    assert rel_err(initial_stats(x), out) > 1e-3

    # the call a user makes without jax.jit: opt.step runs its own compilation of the same
    # program, so two steps give the jitted steps' parameters and model state (float64, 1e-12)
    opt = gn.egn(model_fn, loss="softmax_cross_entropy", gram="matvec")
    pe, se = p0, s0
    for p_jit, s_jit in history[1:3]:
        pe, se, _ = opt.step(pe, se, x, y)
        for a, b in zip(_leaves((pe, se)), _leaves((p_jit, s_jit)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_nnx_eval_mode_uses_and_keeps_running_statistics():
    x, y = _digits(16)
    module = CNN(nnx.Rngs(0, dropout=1))
    module.eval()  # use_running_average=True, dropout deterministic
    model_fn, params, _ = gn.from_nnx(module)
    opt = gn.egn(model_fn, loss="softmax_cross_entropy")
    state, step = opt.init(params), jax.jit(opt.step)
    first = None
    for _ in range(4):
        params, state, info = step(params, state, x, y)
        first = float(info.loss) if first is None else first
        assert not bool(info.rejected)
    assert float(info.loss_after) < first
    assert _same(state.model_state, model_fn.initial_state)  # statistics and streams unchanged


class _Drop(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 6, param_dtype=jnp.float64, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


def test_nnx_dropout_mask_is_a_function_of_the_state_and_fn_is_pure():
    model_fn, params, combine = gn.from_nnx(_Drop(nnx.Rngs(0, dropout=5)))
    fn, s0 = model_fn.fn, model_fn.initial_state
    x = jax.random.normal(jax.random.key(0), (8, 3))
    out_a, s1 = fn(params, x, state=s0)
    out_b, _ = fn(params, x, state=s0)
    out_c, s2 = fn(params, x, state=s1)
    assert np.array_equal(out_a, out_b)  # same state: same mask
    assert not np.array_equal(out_a == 0, out_c == 0)  # advanced stream: a new mask
    assert not _same(s1, s0) and not _same(s2, s1)
    assert _same(s0, model_fn.initial_state)  # the input state was not mutated
    # jit, grad and vmap of the same function
    out_j, s1_j = jax.jit(fn)(params, x, state=s0)
    assert np.allclose(out_j, out_a) and _same(s1_j, s1)
    g = jax.grad(lambda p: jnp.sum(fn(p, x, state=s0)[0] ** 2))(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    outs = jax.vmap(lambda xx: fn(params, xx, state=s0)[0])(jnp.stack([x, 2 * x]))
    assert np.allclose(outs[0], out_a) and np.allclose(outs[1], fn(params, 2 * x, state=s0)[0])
    # combine rebuilds the module with a given state (here: the advanced stream)
    assert np.array_equal(combine(params, s1)(x), out_c)


def test_nnx_wrt_selects_the_trained_variables_and_errors_name_the_argument():
    module = _Drop(nnx.Rngs(0, dropout=5))
    module.eval()
    kernel_only = nnx.All(nnx.Param, nnx.PathContains("kernel"))
    model_fn, params, combine = gn.from_nnx(module, wrt=kernel_only)
    assert [a.shape for a in jax.tree.leaves(params)] == [(3, 6)]
    x = jnp.ones((2, 3))
    (out, _), ref = model_fn.apply(params, x, model_fn.initial_state), module(x)
    assert np.allclose(out, ref)  # the bias travels in the model state
    with pytest.raises(TypeError, match="nnx.Module"):
        gn.from_nnx(lambda p, x: x)
    with pytest.raises(ValueError, match="wrt="):
        gn.from_nnx(module, wrt=nnx.BatchStat)


def test_nnx_without_state_is_a_plain_function():
    model_fn, params, _ = gn.from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    assert not isinstance(model_fn, gn.Model)
    assert model_fn(params, jnp.ones((4, 3))).shape == (4, 2)


# ----------------------------------------------------------------------------------- Equinox
class EqxNet(eqx.Module):
    """Per-example: linear -> BatchNorm(axis "batch") -> relu -> Dropout -> linear."""

    lin: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.lin = eqx.nn.Linear(64, 16, key=k1, dtype=jnp.float64)
        self.bn = eqx.nn.BatchNorm(
            16, axis_name="batch", momentum=0.8, mode="batch", dtype=jnp.float64
        )
        self.drop = eqx.nn.Dropout(0.1)
        self.out = eqx.nn.Linear(16, 10, key=k2, dtype=jnp.float64)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.lin(x), state)
        return self.out(self.drop(jax.nn.relu(h), key=key)), state


def test_equinox_batchnorm_dropout_trains_and_keeps_statistics():
    x, y = _digits(16)
    net, bn_state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
    model_fn, params, combine = gn.from_equinox(net, bn_state, needs_key=True)
    assert isinstance(model_fn, gn.Model) and model_fn.has_state and model_fn.needs_key
    steps = 10
    history, infos = _train(model_fn, params, x, y, steps)
    _check_steps(infos)
    (p0, s0), (pn, sn) = history[0], history[-1]
    ms0, msn = s0.model_state, sn.model_state
    key = jax.random.key(7)
    fixed = model_fn.bind(ms0, key)  # one batch and one dropout mask
    assert _ce(fixed(pn, x), y) < 0.5 * _ce(fixed(p0, x), y)

    # the batch counter advanced once per step; the running statistics moved from zero
    assert int(msn.get(net.bn.batch_counter)) == steps
    hidden_mean, hidden_var = msn.get(net.bn.batch_state_index)
    assert np.abs(hidden_mean).max() > 1e-3 and np.abs(hidden_var).max() > 1e-3

    # inference mode of the rebuilt model uses the stored statistics (zero-debiased)
    trained, s = combine(pn, msn)
    assert s is msn
    trained = eqx.nn.inference_mode(trained)
    out = jax.vmap(trained, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)[0]
    debias = 1 - 0.8**steps
    mean, var = hidden_mean / debias, hidden_var / debias
    z = (jax.vmap(trained.lin)(x) - mean) / jnp.sqrt(var + trained.bn.eps)
    z = z * trained.bn.weight + trained.bn.bias
    assert rel_err(out, jax.vmap(trained.out)(jax.nn.relu(z))) < 1e-12
    _, s_init = combine(pn)
    assert s_init is bn_state


def test_equinox_per_example_dropout_keys():
    lin = eqx.nn.Linear(3, 50, key=jax.random.key(0), dtype=jnp.float64)
    net = eqx.nn.Sequential([lin, eqx.nn.Dropout(0.5)])
    model_fn, params, combine = gn.from_equinox(net, needs_key=True)
    assert isinstance(model_fn, gn.Model) and model_fn.needs_key and not model_fn.has_state
    x = jnp.ones((2, 3))  # two identical examples
    k1, k2 = jax.random.key(1), jax.random.key(2)
    out = model_fn(params, x, key=k1)
    assert not np.array_equal(out[0] == 0, out[1] == 0)  # one key per example
    assert np.array_equal(model_fn(params, x, key=k1), out)  # same key: same masks
    assert not np.array_equal(model_fn(params, x, key=k2) == 0, out == 0)
    assert isinstance(combine(params), eqx.nn.Sequential)
    with pytest.raises(TypeError, match="eqx.nn.State"):
        gn.from_equinox(net, {"not": "a state"})
