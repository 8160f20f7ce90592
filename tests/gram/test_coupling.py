"""Batch-coupled models: detection (gram/_coupling.py) and exact Grams / EGN directions.

References are dense float64: ``J`` is the Jacobian of the BATCHED function
(``conftest.dense_jacobian``) and the direction is ``conftest.dense_lm_direction``. Tolerances:
1e-8 relative for directions (as tests/test_egn_direction.py: the float64 solves agree to ~1e-12,
the margin covers λ = 1e-3 conditioning), 1e-10 for Grams (pure products, no solve).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_jacobian, dense_lm_direction, flat, init_mlp, make_labels, rel_err

import gaussnewton as gn
from gaussnewton import gram as gram_mod
from gaussnewton.gram import batch_coupling

sys.path.insert(0, str(Path(__file__).parent))
from _structured_zoo import ZOO  # noqa: E402

B, D_IN, C, WIDTH = 5, 3, 3, 4
STRATEGIES = ("auto", "jacobian", "structured", "matvec")
LOSSES = ("squared_error", "softmax_cross_entropy")
_KEY = jax.random.key(42)  # the closed-over key of the dropout model


def _hidden(p, x):
    return x @ p["hidden"]["l1"]["w"] + p["hidden"]["l1"]["b"]


def _head(p, h):
    h = jnp.tanh(h @ p["hidden"]["l2"]["w"] + p["hidden"]["l2"]["b"])
    return h @ p["out"]["w"] + p["out"]["b"]


def batch_norm(p, x):
    """Train-mode batch norm on the first hidden layer (batch statistics)."""
    h = _hidden(p, x)
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    return _head(p, jnp.tanh(h))


def centring(p, x):
    return _head(p, jnp.tanh(_hidden(p, x - x.mean(0))))


def dropout(p, x):
    """One (b, width) mask per batch from a fixed key: row i depends on its position i."""
    h = jnp.tanh(_hidden(p, x))
    mask = jax.random.bernoulli(_KEY, 0.5, h.shape)
    return _head(p, jnp.where(mask, 2.0 * h, 0.0))


def batch_attention(p, x):
    """Every example attends to every other example of the batch."""
    h = jnp.tanh(_hidden(p, x))
    a = jax.nn.softmax(h @ h.T / 2.0, axis=-1)
    return _head(p, a @ h)


COUPLED = {
    "batch_norm": (batch_norm, "reduce_sum reduces over the batch axis"),
    "centring": (centring, "reduce_sum reduces over the batch axis"),
    "dropout": (dropout, "varies along the batch axis"),
    "batch_attention": (batch_attention, "contracts or pairs examples"),
}


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Tiny programs: XLA's expensive passes cost more than they save here."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def problem():
    kp, kx, kx2 = jax.random.split(jax.random.key(7), 3)
    params = init_mlp(kp, D_IN, C, width=WIDTH)
    return params, jax.random.normal(kx, (B, D_IN)), jax.random.normal(kx2, (3, D_IN))


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_coupled_models_get_exact_directions_and_grams(problem, name):
    """Every strategy: the EGN direction equals the dense LM direction (1e-8); gram_factors blocks,
    empirical_ntk and gram_diagonal equal the batched-Jacobian Gram (1e-10)."""
    model_fn, _ = COUPLED[name]
    params, x, _ = problem
    ys = {loss: make_labels(jax.random.key(1), loss, B, C) for loss in LOSSES}

    @jax.jit
    def run(p, x, ys, lam):
        dirs = {
            (loss, s): gn.egn_direction(model_fn, p, x, ys[loss], loss=loss, damping=lam, gram=s)[0]
            for loss in LOSSES
            for s in STRATEGIES
        }
        blocks = {}
        for s in STRATEGIES:
            F, block = gram_mod.gram_factors(model_fn, p, x, strategy=s)
            top, rest = (
                jax.tree_util.tree_map(lambda a, t=t: a[t], F) for t in (slice(0, 2), slice(2, B))
            )
            blocks[s] = (block(top), block(rest, top), block(rest))
        ntk = {s: gn.empirical_ntk(model_fn, p, x, strategy=s) for s in STRATEGIES}
        diag = {s: gram_mod.gram_diagonal(model_fn, p, x, strategy=s) for s in STRATEGIES}
        return dirs, blocks, ntk, diag

    j, _ = dense_jacobian(model_fn, params, x)
    K = np.asarray(j @ j.T).reshape(B, C, B, C)
    for lam in (1e-3, 1.0):
        dirs, blocks, ntk, diag = run(params, x, ys, lam)
        for (loss, s), d in dirs.items():
            ref, _ = dense_lm_direction(model_fn, params, x, ys[loss], loss, lam)
            assert rel_err(flat(d), ref) < 1e-8, (name, loss, s, lam)
    for s in STRATEGIES:
        top, cross, rest = blocks[s]
        assert rel_err(top, K[:2, :, :2]) < 1e-10, s
        assert rel_err(cross, K[2:, :, :2]) < 1e-10, s
        assert rel_err(rest, K[2:, :, 2:]) < 1e-10, s
        assert rel_err(ntk[s], K.reshape(B * C, B * C)) < 1e-10, s
        assert rel_err(diag[s], np.einsum("iaia->ia", K)) < 1e-10, s


def test_per_example_strategies_are_wrong_without_detection(problem):
    """The defect is real: the raw per-example engines disagree with the batched Jacobian."""
    params, x, _ = problem
    j, _ = dense_jacobian(batch_norm, params, x)
    K = (j @ j.T).reshape(B, C, B, C)
    raw = (gram_mod._jacobian.jacobian_gram, gram_mod.structured_gram)
    for k in jax.jit(lambda p, x: [g(batch_norm, p, x) for g in raw])(params, x):
        assert rel_err(k, K) > 1e-2


def test_cross_gram_uses_each_batch(problem):
    """K(x1, x2) of a coupled model: rows of J(x1) from batch x1, rows of J(x2) from batch x2."""
    params, x, x2 = problem
    j1, _ = dense_jacobian(centring, params, x)
    j2, _ = dense_jacobian(centring, params, x2)
    strategies = ("structured", "jacobian", "matvec")
    ntk = jax.jit(
        lambda p, a, b: [gn.empirical_ntk(centring, p, a, b, strategy=s) for s in strategies]
    )
    for s, k12 in zip(strategies, ntk(params, x, x2), strict=True):
        assert rel_err(k12, j1 @ j2.T) < 1e-10, s


def test_over_the_memory_limit_forms_k_from_whole_batch_products(problem, monkeypatch):
    """Above the Jacobian byte limit: K from matvec columns on the whole batch, F = (K, index)."""
    params, x, _ = problem
    monkeypatch.setattr(gram_mod, "_JACOBIAN_BYTES_LIMIT", 10)
    j, _ = dense_jacobian(dropout, params, x)
    K = np.asarray(j @ j.T).reshape(B, C, B, C)
    F, block = gram_mod.gram_factors(dropout, params, x, strategy="structured")
    assert isinstance(F, tuple) and F[0].shape == (B, C, B, C) and F[1].shape == (B,)
    sub = jax.tree_util.tree_map(lambda a: a[1:4], F)
    assert rel_err(block(sub), K[1:4, :, 1:4]) < 1e-10
    assert rel_err(gram_mod.gram_diagonal(dropout, params, x), np.einsum("iaia->ia", K)) < 1e-10
    plan = gn.explain_gram(dropout, params, x)["['out']['w']"]
    assert plan.method == "whole-batch-matvec"


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_analysis_flags_coupled_models(problem, name):
    model_fn, expected = COUPLED[name]
    params, x, _ = problem
    c = batch_coupling(model_fn, params, x)
    assert c.coupled and any(expected in r for r in c.reasons), c.reasons
    assert "test_coupling.py" in c.reasons[0]  # the source line of the offending operation


@pytest.mark.parametrize("name", sorted(ZOO))
def test_analysis_flags_no_zoo_model(name):
    model_fn, params, x1, x2 = ZOO[name]()
    for x in (x1,) if x2 is None else (x1, x2):
        c = batch_coupling(model_fn, params, x)
        assert not c.coupled, (name, c.reasons)


def _per_example_extras():
    """Per-example patterns that must not be flagged (beyond the zoo)."""
    import equinox as eqx

    conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=jax.random.key(0))
    emb = eqx.nn.Embedding(7, 3, key=jax.random.key(1))
    w = jnp.ones((3, 4))
    tok = jnp.zeros((4, 5), jnp.int32)
    img = jnp.ones((4, 2, 5, 5))
    x = jnp.ones((4, 3))

    def take_along(p, x):
        f = jnp.tanh(x @ p)
        return jnp.take_along_axis(f, jnp.argmax(f, axis=1, keepdims=True), axis=1)

    def one_hot(p, x):
        f = x @ p
        return f * (jnp.arange(4)[None, :] == jnp.argmax(f, 1)[:, None])

    def softmax_flatten(p, x):
        h = jnp.stack([x, 2 * x], axis=1) @ p  # (b, 2, 4)
        return jax.nn.softmax(h, -1).reshape(x.shape[0], -1)

    def vmapped_embedding(p, t):
        return jax.vmap(lambda ti: jax.vmap(p)(ti).sum(0))(t)

    def vmapped_conv(p, im):
        return jax.vmap(lambda a: p(a).mean((1, 2)))(im)

    def zeros_init_scatter(p, x):
        out = jnp.zeros((x.shape[0], 6)).at[:, 1:5].set(jnp.tanh(x @ p))
        return out.at[:, 0].add(1.0)

    return {
        "take_along_axis": (take_along, w, x),
        "one_hot_eq_iota": (one_hot, w, x),
        "softmax_flatten": (softmax_flatten, w, x),
        "equinox_vmapped_embedding": (vmapped_embedding, emb, tok),
        "equinox_vmapped_conv": (vmapped_conv, conv, img),
        "scatter_into_zeros": (zeros_init_scatter, w, x),
        "while_per_example": (
            lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p[:, :3]), x @ p[:, :3]),
            w,
            x,
        ),
        "cond_on_constant": (
            lambda p, x: jax.lax.cond(True, lambda h: h @ p, lambda h: -(h @ p), x),
            w,
            x,
        ),
    }


def test_analysis_flags_no_per_example_extra():
    for name, (fn, p, x) in _per_example_extras().items():
        c = batch_coupling(fn, p, x)
        assert not c.coupled, (name, c.reasons)


def _split_key_dropout(p, x):
    """Key i of split(key, b) for example i: row i depends on its position (model_fn on example i
    alone would use split(key, 1)[0])."""
    keys = jax.random.split(_KEY, x.shape[0])
    h = jnp.tanh(x @ p)
    return jax.vmap(lambda k, hi: hi * jax.random.bernoulli(k, 0.5, hi.shape))(keys, h)


def test_analysis_flags_batch_axis_manipulations():
    w = jnp.ones((3, 2))
    x = jnp.ones((4, 3))
    cases = {
        "split_keys": (_split_key_dropout, "varies along the batch axis"),
        "iota": (lambda p, x: (x @ p) * jnp.arange(4.0)[:, None], "varies along the batch axis"),
        "sort": (lambda p, x: jnp.sort(x @ p, axis=0), "sorts along the batch axis"),
        "cumsum": (lambda p, x: jnp.cumsum(x @ p, axis=0), "accumulates along the batch axis"),
        "reverse": (lambda p, x: (x @ p)[::-1], "reverses the batch axis"),
        "roll": (lambda p, x: jnp.roll(x @ p, 1, axis=0), "batch axis"),
        "slice": (lambda p, x: jnp.concatenate([x[:2], x[:2]]) @ p, "slices the batch axis"),
        "merge": (lambda p, x: (x.reshape(2, 6) @ jnp.ones((6, 4))).reshape(4, 2), "merges"),
        "gather": (lambda p, x: x[jnp.array([1, 0, 3, 2])] @ p, "gathers across the batch axis"),
        "scan_over_batch": (
            lambda p, x: jax.lax.scan(lambda c, xi: (c + xi, c), jnp.zeros(3), x)[1] @ p,
            "scans over the batch axis",
        ),
        "transpose_out": (lambda p, x: (x @ p).T.reshape(4, 2), "batch axis"),
        "max_over_batch": (lambda p, x: x @ p - jnp.max(x @ p), "reduces over the batch axis"),
    }
    for name, (fn, expected) in cases.items():
        c = batch_coupling(fn, w, x)
        assert c.coupled and any(expected in r for r in c.reasons), (name, c.reasons)


def test_batch_of_one_jit_and_failures(problem):
    params, x, _ = problem
    # b = 1: analyzed at b = 2 when the model allows it, so the batch mean is still reported
    assert batch_coupling(centring, params, x[:1]).coupled
    assert not batch_coupling(ZOO["batch_of_one"]()[0], ZOO["batch_of_one"]()[1], x[:1]).coupled

    # inside jit on tracers: shapes only
    @jax.jit
    def k(p, x):
        assert batch_coupling(batch_norm, p, x).coupled
        return gn.empirical_ntk(batch_norm, p, x)

    j, _ = dense_jacobian(batch_norm, params, x)
    assert rel_err(k(params, x), j @ j.T) < 1e-10

    def broken(p, x):
        raise RuntimeError("no trace")

    c = batch_coupling(broken, params, x)
    assert c.coupled and "RuntimeError" in c.reasons[0]


def test_explain_reports_the_coupling(problem):
    params, x, _ = problem
    plans = gn.explain_gram(batch_norm, params, x)
    assert set(plans) == {
        "['hidden']['l1']['b']",
        "['hidden']['l1']['w']",
        "['hidden']['l2']['b']",
        "['hidden']['l2']['w']",
        "['out']['b']",
        "['out']['w']",
    }
    for plan in plans.values():
        assert plan.method == "whole-batch-jacobian"
        assert plan.reason.startswith("batch coupled: reduce_sum reduces over the batch axis")
        assert plan.coupling is not None and plan.coupling.coupled
    assert plans["['out']['w']"].rule == "dense"  # what the per-example engine recognized
    per_example = gn.explain_gram(ZOO["mlp_tanh"]()[0], *ZOO["mlp_tanh"]()[1:3])
    assert all(p.coupling is None and "whole" not in p.method for p in per_example.values())


def test_register_strategy_per_example_flag(problem):
    """A user strategy is per-example by default: coupled models get "whole-batch" (warned)."""
    params, x, _ = problem
    calls = []

    def spy(model_fn, p, a, b=None):
        calls.append(1)
        return gram_mod.STRATEGIES["jacobian"](model_fn, p, a, b)

    j, _ = dense_jacobian(centring, params, x)
    try:
        gn.register_strategy("spy", spy)
        with pytest.warns(UserWarning, match="per-example strategy.*whole-batch"):
            k = gram_mod.gram(centring, params, x, strategy="spy")
        assert not calls and rel_err(k.reshape(B * C, -1), j @ j.T) < 1e-10
        gn.register_strategy("spy", gram_mod.STRATEGIES["matvec"], per_example=False)
        assert "spy" not in gram_mod.PER_EXAMPLE
        F, block = gram_mod.gram_factors(centring, params, x, strategy="spy")  # K once, sliced
        assert rel_err(block(F).reshape(B * C, -1), j @ j.T) < 1e-10
        with pytest.raises(TypeError, match="per_example for 'spy' must be True or False"):
            gn.register_strategy("spy", spy, per_example="yes")
    finally:
        gram_mod.STRATEGIES.pop("spy", None)
        gram_mod.PER_EXAMPLE.discard("spy")
