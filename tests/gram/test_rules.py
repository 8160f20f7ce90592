"""A structured Gram rule written outside the package, with public imports only (issue #11).

``ChannelScale`` is one class: the elementwise scale ``z = h * γ`` by a parameter vector ``γ``
(shape ``(c,)``, broadcast over the positions ``t`` of ``h``). The built-in ``"scale"`` rule sends
``γ`` to per-example gradients; this rule factors it instead: ``d f_ik / d γ = Σ_t G_ikt ⊙ h_it``
with ``G = d f / d z`` from the engine's probes, so the forward pass records ``h`` and the block is
``K = Σ_c v_ikc v_jlc`` with ``v_ik = Σ_t G_ikt ⊙ h_it`` (several uses of ``γ`` concatenate along
``t``, which adds their cross terms). Registered, it must be what ``explain_gram`` reports for
``γ`` and give the dense Jacobian Gram (float64, 1e-10, max-abs relative as
tests/gram/test_structured.py); unregistered, ``γ`` is back to ``"scale"``. Also: the registry's
refusals name the argument and the fix.
"""

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import dense_jacobian  # noqa: E402

import gaussnewton as gn  # noqa: E402
from gaussnewton.gram.structured import structured_gram  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _structured_zoo import ZOO  # noqa: E402

RTOL = 1e-10


class ChannelScale(gn.GramRule):
    """``z = h * γ``, ``γ`` broadcast along every axis of ``h`` but the last (channels)."""

    name = "channel_scale"
    primitives = frozenset({"mul"})
    family = "channel_scale"

    def form(self, use):
        channels = use.out_shape[-1] if use.out_shape else 0
        if use.other_shape != use.out_shape or channels == 0:
            return "h is broadcast too (or a scalar product)"
        layout = np.broadcast_to(use.index, use.out_shape).reshape(-1, channels)
        if (layout != layout[0]).any():
            return "γ varies along the positions"
        positions = layout.shape[0]
        return {"h": 1 - use.operand, "T": positions, "c": channels}, layout[0]

    def cost(self, forms, size, n1, n2, k):
        T = sum(f["T"] for f in forms)
        factored = (n1 + n2) * k * T * size + n1 * n2 * k * k * size
        pergrad = factored + (n1 + n2) * k * T * size  # one more backward pass through the mul
        return factored, pergrad, n1 * n2 * k * k, (n1 + n2) * k * size

    def activation(self, form, invals):
        return invals[form["h"]]

    def factor(self, form, act, g, k):
        return act.reshape(form["T"], form["c"]), g.reshape(k, form["T"], form["c"])

    def block(self, A1, G1, A2, G2, dtype):
        v1 = (A1[:, None] * G1).sum(2).astype(dtype)  # (n1, k, c)
        v2 = (A2[:, None] * G2).sum(2).astype(dtype)
        return jnp.einsum("ikc,jlc->ikjl", v1, v2, precision=jax.lax.Precision.HIGHEST)


def gated_mlp():
    """``γ`` used twice (two positions sets of one layer, and once more after a nonlinearity)."""
    ks = jax.random.split(jax.random.PRNGKey(21), 6)

    def f(p, x):  # x: (n, 3, 2)
        h = jnp.tanh(x @ p["w"]) * p["gamma"]  # (n, 3, 4)
        h = jnp.sin(h) * p["gamma"]
        return h.mean(1) @ p["o"]

    p = {
        "w": 0.7 * jax.random.normal(ks[0], (2, 4), jnp.float64),
        "gamma": 1.0 + 0.3 * jax.random.normal(ks[1], (4,), jnp.float64),
        "o": 0.7 * jax.random.normal(ks[2], (4, 2), jnp.float64),
    }
    x1 = jax.random.normal(ks[3], (4, 3, 2), jnp.float64)
    x2 = jax.random.normal(ks[4], (3, 3, 2), jnp.float64)
    return f, p, x1, x2


#: model -> (model_fn, params, x1, x2) and the leaves the new rule must take
MODELS = {
    "gated_mlp": (gated_mlp, ("['gamma']",)),
    "layernorm_residual": (ZOO["layernorm_residual"], ("['g']",)),
    "transformer_block": (ZOO["transformer_block"], ("['ln1_g']", "['ln2_g']")),
}


@pytest.fixture
def channel_scale():
    rule = gn.register_rule(ChannelScale())
    try:
        yield rule
    finally:
        gn.unregister_rule(rule.name)


def dense_gram(model_fn, params, x1, x2):
    """``J(x1) J(x2)ᵀ`` from materialized Jacobians of the batched model, ``(n1, k, n2, k)``."""
    J1, _ = dense_jacobian(model_fn, params, x1)
    J2, _ = dense_jacobian(model_fn, params, x2)
    n1, n2 = x1.shape[0], x2.shape[0]
    return (J1 @ J2.T).reshape(n1, -1, n2, J2.shape[0] // n2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_rule_is_used_and_exact(name, channel_scale):
    make, leaves = MODELS[name]
    model_fn, params, x1, x2 = make()
    x2 = x1[:2] if x2 is None else x2
    plans = gn.explain_gram(model_fn, params, x1, x2)
    for leaf in leaves:
        assert (plans[leaf].rule, plans[leaf].method) == ("channel_scale", "factored"), leaf
        assert plans[leaf].kinds == ("channel_scale",)
        assert plans[leaf].cost_dense < plans[leaf].cost_pergrad
    if name == "gated_mlp":
        assert [f["T"] for f in plans["['gamma']"].forms] == [3, 3]  # two uses, merged
    K = jax.jit(lambda p, a, b: structured_gram(model_fn, p, a, b))(params, x1, x2)
    R = dense_gram(model_fn, params, x1, x2)
    assert K.shape == R.shape and K.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(K - R)) / jnp.max(jnp.abs(R))) < RTOL


def test_without_the_rule_the_builtin_scale_takes_per_example_gradients():
    model_fn, params, x1, x2 = gated_mlp()
    plan = gn.explain_gram(model_fn, params, x1, x2)["['gamma']"]
    assert (plan.rule, plan.method) == ("scale", "per-example-gradient")
    rule = gn.register_rule(ChannelScale())
    assert gn.unregister_rule("channel_scale") is rule
    plan = gn.explain_gram(model_fn, params, x1, x2)["['gamma']"]
    assert plan.rule == "scale"


def test_a_use_the_rule_has_no_form_for_falls_back_with_its_reason(channel_scale):
    def f(p, x):  # γ varies along positions: (3, 4) scale of a (n, 3, 4) activation
        return (jnp.tanh(x @ p["w"]) * p["gamma"]).mean(1) @ p["o"]

    _, p, x1, _ = gated_mlp()
    p = {**p, "gamma": jnp.ones((3, 4))}
    plan = gn.explain_gram(f, p, x1)["['gamma']"]
    assert (plan.rule, plan.method) == ("channel_scale", "per-example-gradient")
    assert plan.reason == "γ varies along the positions"


class Reciprocal(gn.GramRule):
    name, primitives = "reciprocal", frozenset({"div"})


def test_register_rule_refuses_with_the_fix(channel_scale):
    with pytest.raises(ValueError, match=r"'channel_scale' is already registered.*unregister_rule"):
        gn.register_rule(ChannelScale())
    with pytest.raises(ValueError, match="'dense' is already registered; it is built in"):
        gn.register_rule(type("D", (Reciprocal,), {"name": "dense"})())
    with pytest.raises(TypeError, match=r"got the class Reciprocal; pass Reciprocal\(\)"):
        gn.register_rule(Reciprocal)
    with pytest.raises(TypeError, match="GramRule subclass, got function"):
        gn.register_rule(lambda eqn, operand: True)
    with pytest.raises(ValueError, match="name='mixed' is reserved"):
        gn.register_rule(type("M", (Reciprocal,), {"name": "mixed"})())
    with pytest.raises(ValueError, match="non-empty string, got ''"):
        gn.register_rule(gn.GramRule())
    with pytest.raises(TypeError, match="non-empty set of jaxpr primitive names"):
        gn.register_rule(type("P", (Reciprocal,), {"primitives": "div"})())
    with pytest.raises(TypeError, match=r"family='f'.*does not define \['form', 'cost'"):
        gn.register_rule(type("F", (Reciprocal,), {"family": "f"})())
    with pytest.raises(ValueError, match="'bias' is a built-in rule"):
        gn.unregister_rule("bias")
    with pytest.raises(KeyError, match="no rule named 'reciprocal'"):
        gn.unregister_rule("reciprocal")


def test_a_rule_without_a_factored_form_names_its_leaf():
    def f(p, x):
        return jnp.tanh(x / p["d"]) @ p["o"]

    p = {"d": jnp.full((3,), 2.0), "o": jnp.ones((3, 2))}
    x = jnp.ones((4, 3))
    assert gn.explain_gram(f, p, x)["['d']"].rule == "fallback"
    gn.register_rule(Reciprocal())
    try:
        plan = gn.explain_gram(f, p, x)["['d']"]
        assert (plan.rule, plan.method) == ("reciprocal", "per-example-gradient")
        K = structured_gram(f, p, x)
        R = dense_gram(f, p, x, x)
        assert float(jnp.max(jnp.abs(K - R)) / jnp.max(jnp.abs(R))) < RTOL
    finally:
        gn.unregister_rule("reciprocal")
