"""Structured Gram (METHODS 3.3) against a materialized-Jacobian reference, in float64."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _structured_zoo import ZOO  # noqa: E402

from gaussnewton.gram.structured import explain, structured_gram  # noqa: E402

RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Tiny programs: XLA's expensive passes cost more than they save here."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def reference_gram(model_fn, params, x1, x2=None):
    """``J(x1) J(x2)^T`` with per-example ``jacrev`` over the float leaves, shape (n1, k, n2, k).

    Both Jacobians come from ONE vmapped ``jacrev`` over the concatenated batch.
    """
    n1 = jax.tree.leaves(x1)[0].shape[0]
    if x2 is not None:
        x1 = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
    float_mask = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in jax.tree.leaves(params)]
    leaves, treedef = jax.tree.flatten(params)

    def jac(x):
        def f_one(float_leaves, xi):
            it = iter(float_leaves)
            full = [next(it) if m else a for a, m in zip(leaves, float_mask, strict=True)]
            q = jax.tree.unflatten(treedef, full)
            return model_fn(q, jax.tree.map(lambda a: a[None], xi))[0]

        fl = [a for a, m in zip(leaves, float_mask, strict=True) if m]
        J = jax.vmap(lambda xi: jax.jacrev(f_one)(fl, xi))(x)
        n, k = J[0].shape[:2]
        return jnp.concatenate([j.reshape(n * k, -1) for j in J], axis=1), n, k

    J, n, k = jac(x1)
    J1, J2 = J[: n1 * k], J[n1 * k :] if x2 is not None else J
    return (J1 @ J2.T).reshape(n1, k, -1, k)


def _rel_err(K, R):
    return float(jnp.max(jnp.abs(K - R)) / jnp.max(jnp.abs(R)))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_matches_materialized_jacobian(name):
    """K(x1, x2) (or K(x1) where the zoo gives no x2), every eligible dense leaf factored."""
    model_fn, params, x1, x2 = ZOO[name]()

    @jax.jit
    def both(params, x1, x2):
        K = structured_gram(model_fn, params, x1, x2, dense_method="factored")
        return K, reference_gram(model_fn, params, x1, x2)

    K, R = both(params, x1, x2)
    assert K.shape == R.shape and K.dtype == jnp.float64
    assert _rel_err(K, R) < RTOL, name


@pytest.mark.parametrize("name", ["many_positions", "two_branches", "embedding"])
def test_flop_model_choice_is_exact(name):
    """Default ("auto") choice (per-example gradients on these) on the diagonal K(x1, x1)."""
    model_fn, params, x1, _ = ZOO[name]()
    K = jax.jit(lambda p, x: structured_gram(model_fn, p, x))(params, x1)
    assert _rel_err(K, reference_gram(model_fn, params, x1)) < RTOL


def test_jit_and_float32():
    """Inside jit, in float32 (params and data), against the float64 reference."""
    model_fn, params, x1, x2 = ZOO["projected_tuple_input"]()
    p32, a32, b32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x1, x2))
    K = jax.jit(lambda p, a, b: structured_gram(model_fn, p, a, b))(p32, a32, b32)
    assert K.dtype == jnp.float32
    assert _rel_err(K, reference_gram(model_fn, params, x1, x2)) < 1e-4


def test_mlp_takes_structured_path_for_every_leaf():
    model_fn, params, x1, _ = ZOO["mlp_tanh"]()
    plans = explain(model_fn, params, x1)
    assert set(plans) == {"['w1']", "['w2']", "['w3']", "['b1']", "['b2']", "['b3']"}
    for name, plan in plans.items():
        expected = ("dense", "factored") if "w" in name else ("bias", "factored")
        assert (plan.rule, plan.method) == expected, (name, plan)
        if "b" in name:  # folded into the dense rule of the layer it is added to
            assert plan.reason == f"merged into the dense rule of {name.replace('b', 'w')}"
            assert plans[name.replace("b", "w")].forms[0].with_bias


def test_rules_chosen_for_the_zoo():
    rnn = explain(*ZOO["scan_rnn"]()[:3])
    assert rnn["['wh']"].rule == rnn["['wx']"].rule == rnn["['bh']"].rule == "fallback"
    assert "scan" in rnn["['wh']"].reason
    assert (rnn["['wo']"].rule, rnn["['wo']"].method) == ("dense", "factored")
    cd = explain(*ZOO["custom_derivatives"]()[:3], dense_method="factored")
    assert cd["['s']"].rule == "fallback" and "custom_jvp_call" in cd["['s']"].reason
    assert cd["['w1']"].method == cd["['b1']"].method == cd["['w2']"].method == "factored"
    two = explain(*ZOO["two_branches"]()[:3], dense_method="factored")
    assert two["['W']"].method == "factored" and len(two["['W']"].forms) == 2
    assert two["['V']"].method == "per-example-gradient"  # two different layouts
    many = explain(*ZOO["many_positions"]()[:3])
    assert (many["['w']"].rule, many["['w']"].method) == ("dense", "per-example-gradient")
    assert many["['w']"].cost_dense > many["['w']"].cost_pergrad
    unused = explain(*ZOO["unused_leaves"]()[:3])
    assert unused["['extra']['unused']"].rule == "unused"
    assert unused["['extra']['step']"].rule == "non-float"
    tf = explain(*ZOO["transformer_block"]()[:3], dense_method="factored")
    for w in ("wq", "wk", "wv", "wo", "m1", "m2", "head"):
        assert tf[f"['{w}']"].method == "factored", w
    emb = explain(*ZOO["embedding"]()[:3], dense_method="factored")["['E']"]
    assert (emb.rule, emb.method, len(emb.forms)) == ("embedding", "factored", 2)
    assert [f.fill for f in emb.forms] == [False, True]
    ln = explain(*ZOO["layernorm_residual"]()[:3])
    assert ln["['b1']"].method == "per-example-gradient"  # w1's output has two consumers
    assert not ln["['w1']"].forms[0].with_bias
    assert (ln["['g']"].rule, ln["['beta']"].rule) == ("scale", "bias")
    assert tf["['c1']"].method == "factored"  # implicit size-1 broadcast in the add
    nnx_plans = explain(*ZOO["flax_nnx"]()[:3])
    assert nnx_plans["['l1']['bias'].value"].method == "factored"
    eqx_plans = explain(*ZOO["equinox_mlp"]()[:3])  # W @ x, transposed, then + b
    assert all(p.method == "factored" for p in eqx_plans.values())
    tied = explain(*ZOO["tied_weights"]()[:3])
    assert tied["['E']"].rule == "mixed" and tied["['E']"].kinds == ("dense", "embedding")


def test_conv_rules_chosen_for_the_zoo():
    cnn = explain(*ZOO["cnn_pooling"]()[:3], dense_method="factored")
    for w in ("k1", "k2"):
        assert (cnn[f"['{w}']"].rule, cnn[f"['{w}']"].method) == ("conv", "factored"), w
    assert cnn["['c1']"].reason == "merged into the conv rule of ['k1']"
    assert cnn["['k1']"].forms[0].with_bias and not cnn["['k2']"].forms[0].with_bias
    strided = explain(*ZOO["conv_nchw_strided"]()[:3], dense_method="factored")
    assert strided["['k']"].forms[0].with_bias  # NCHW bias (1, C, 1, 1) merges too
    (form,) = strided["['k']"].forms
    assert (form.T, form.Cin, form.Cout) == (18, 12, 3)  # 3 x 6 positions, 2 x (2 x 3) patches
    seq = explain(*ZOO["conv1d_lhs_dilated"]()[:3], dense_method="factored")
    assert seq["['k2']"].method == "factored"  # transposed conv: rev + I/O swap of the kernel
    shared = explain(*ZOO["conv3d_shared_kernel"]()[:3], dense_method="factored")["['W']"]
    assert (shared.rule, shared.method, shared.kinds) == ("mixed", "factored", ("conv", "dense"))
    assert [f.T for f in shared.forms] == [27, 8, 1]
    grouped = explain(*ZOO["grouped_conv"]()[:3], dense_method="factored")
    assert (grouped["['g']"].rule, grouped["['g']"].method) == ("conv", "per-example-gradient")
    assert "feature_group_count=2" in grouped["['g']"].reason
    assert grouped["['c']"].method == "per-example-gradient"  # its conv is not factored
    assert grouped["['k']"].method == "factored"
    forced = explain(*ZOO["cnn_pooling"]()[:3], dense_method="per-example-gradient")
    assert forced["['k1']"].method == forced["['c1']"].method == "per-example-gradient"


def _conv_head(stride):
    def f(p, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, p["k"], stride, "SAME", dimension_numbers=dn)
        return jnp.tanh(h).mean((1, 2)) @ p["w"]

    return f


@pytest.mark.parametrize(
    "image, kernel, stride, method",
    [
        ((28, 28, 1), (3, 3, 1, 16), (1, 1), "per-example-gradient"),  # 784 positions
        ((4, 4, 64), (3, 3, 64, 64), (2, 2), "factored"),  # 2 x 2 positions, big kernel
    ],
)
def test_conv_flop_model_choice(image, kernel, stride, method):
    """``auto`` on a many-positions / small-kernel conv and a few-positions / big-kernel one."""
    n, k = 128, 10
    params = {"k": jnp.zeros(kernel), "w": jnp.zeros((kernel[-1], k))}
    plan = explain(_conv_head(stride), params, jnp.zeros((n, *image)))["['k']"]
    assert (plan.rule, plan.method) == ("conv", method)
    T = (image[0] // stride[0]) * (image[1] // stride[1])
    Cin, Cout = kernel[0] * kernel[1] * kernel[2], kernel[3]
    assert plan.cost_dense == n * n * T * T * (Cin + k * k * Cout + k * k)
    assert plan.cost_pergrad == 2 * n * k * T * Cin * Cout + n * n * k * k * Cin * Cout
    assert (plan.cost_dense > plan.cost_pergrad) == (method == "per-example-gradient")


def test_analysis_error_degrades_to_exact_fallback(monkeypatch):
    import gaussnewton.gram.structured._assemble as assemble

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(assemble, "analyze", broken)
    model_fn, params, x1, _ = ZOO["mlp_tanh"]()
    plans = explain(model_fn, params, x1)
    assert all(p.rule == "fallback" and "boom" in p.reason for p in plans.values())
    K = structured_gram(model_fn, params, x1)
    assert _rel_err(K, reference_gram(model_fn, params, x1)) < RTOL


def test_memory_guard_prefers_per_example_gradients():
    from gaussnewton.gram.structured._cost import MEMORY_CAP, _pergrad_better

    assert not _pergrad_better(1e6, 2e6, MEMORY_CAP, 10)  # cheaper and within the cap: factored
    assert _pergrad_better(1e6, 2e6, MEMORY_CAP + 1, 10)  # (i, j, t, s) too big: per-example
    assert not _pergrad_better(1e6, 2e6, MEMORY_CAP + 1, MEMORY_CAP + 2)


def test_bad_inputs_name_the_problem():
    model_fn, params, x1, _ = ZOO["mlp_tanh"]()
    with pytest.raises(ValueError, match="leading batch size"):
        structured_gram(lambda p, xs: model_fn(p, xs[0]), params, (x1, np.ones((2, 3))))
    with pytest.raises(ValueError, match="dense_method='dense'"):
        structured_gram(model_fn, params, x1, dense_method="dense")
