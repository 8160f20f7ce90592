"""Gram strategies against the explicit ``J Jᵀ`` (float64, 1e-10 relative)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_jacobian, init_mlp, mlp, mlp_scalar, rel_err

import gaussnewton as gn
from gaussnewton import gram as gram_mod


@pytest.fixture(scope="module")
def problem():
    kp, k1, k2 = jax.random.split(jax.random.key(3), 3)
    params = init_mlp(kp, 4, 3)
    return params, jax.random.normal(k1, (5, 4)), jax.random.normal(k2, (2, 4))


@pytest.mark.parametrize("strategy", ["jacobian", "matvec"])
def test_strategies_equal_explicit_gram(problem, strategy):
    params, x1, x2 = problem
    j1, _ = dense_jacobian(mlp, params, x1)
    j2, _ = dense_jacobian(mlp, params, x2)
    fn = jax.jit(
        lambda p, a, b: (
            gn.empirical_ntk(mlp, p, a, strategy=strategy),
            gn.empirical_ntk(mlp, p, a, b, strategy=strategy),
        )
    )
    k11, k12 = fn(params, x1, x2)
    assert k11.shape == (15, 15) and k12.shape == (15, 6)
    assert rel_err(k11, j1 @ j1.T) < 1e-10
    assert rel_err(k12, j1 @ j2.T) < 1e-10


def test_scalar_outputs_and_auto(problem):
    params, x1, _ = problem
    params1 = init_mlp(jax.random.key(1), 4, 1)
    j, _ = dense_jacobian(mlp_scalar, params1, x1)
    k = gn.empirical_ntk(mlp_scalar, params1, x1)  # "auto"
    assert k.shape == (5, 5)
    assert rel_err(k, j @ j.T) < 1e-10


def test_float32_params_give_float32_gram_at_least():
    params = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16), init_mlp(jax.random.key(1), 4, 2)
    )
    x = jnp.ones((3, 4), jnp.bfloat16)
    k = gram_mod.gram(mlp, params, x, strategy="jacobian")
    assert k.dtype == jnp.float32


def test_register_strategy_is_used(problem):
    params, x1, _ = problem
    calls = []

    def spy(model_fn, p, a, b=None):
        calls.append(1)
        return gram_mod.STRATEGIES["jacobian"](model_fn, p, a, b)

    gn.register_strategy("spy", spy)
    try:
        d, _ = gn.egn_direction(
            mlp, params, x1, jnp.zeros((5, 3)), loss="squared_error", damping=1.0, gram="spy"
        )
        assert calls and np.all(np.isfinite(jax.flatten_util.ravel_pytree(d)[0]))
    finally:
        del gram_mod.STRATEGIES["spy"]


def test_unknown_strategy_and_bad_output_rank(problem):
    params, x1, _ = problem
    with pytest.raises(ValueError, match="gram='nope'"):
        gn.empirical_ntk(mlp, params, x1, strategy="nope")
    with pytest.raises(ValueError, match=r"shape \(b, c\) or \(b,\)"):
        gn.empirical_ntk(lambda p, x: mlp(p, x)[:, :, None], params, x1)


def test_auto_avoids_huge_jacobian(monkeypatch, problem):
    params, x1, _ = problem
    monkeypatch.setattr(gram_mod, "_JACOBIAN_BYTES_LIMIT", 10)
    saved = gram_mod.STRATEGIES.pop("structured", None)
    try:
        assert gram_mod.resolve_strategy("auto", mlp, params, x1, 3) == "matvec"
    finally:
        if saved is not None:
            gram_mod.STRATEGIES["structured"] = saved


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "matvec"])
def test_gram_factors_blocks_equal_gram(problem, strategy):
    """Blocks from one set of factors equal the slices of the Gram (1e-10, float64): a factor form
    for jacobian / structured, the generic fallback (calls on the example slices) for matvec."""
    params, x1, _ = problem

    @jax.jit
    def blocks(p, x):
        F, block = gram_mod.gram_factors(mlp, p, x, strategy=strategy)
        top, rest = (
            jax.tree_util.tree_map(lambda a, s=s: a[s], F) for s in (slice(0, 2), slice(2, 5))
        )
        return block(top), block(rest, top), gram_mod.gram(mlp, p, x, strategy=strategy)

    k_top, k_cross, k = blocks(params, x1)
    assert (strategy in gram_mod.FACTORS) == (strategy != "matvec")
    assert rel_err(k_top, k[:2, :, :2]) < 1e-10
    assert rel_err(k_cross, k[2:, :, :2]) < 1e-10


def test_register_strategy_with_factors(problem):
    """A registered factor form is what gram_factors uses; re-registering without one drops it."""
    params, x1, _ = problem
    used = []

    def factors(model_fn, p, x):
        used.append(1)
        return gram_mod.FACTORS["jacobian"](model_fn, p, x)

    gn.register_strategy("spyf", gram_mod.STRATEGIES["jacobian"], factors=factors)
    try:
        F, block = gram_mod.gram_factors(mlp, params, x1, strategy="spyf")
        assert (
            used and rel_err(block(F), gram_mod.gram(mlp, params, x1, strategy="jacobian")) < 1e-12
        )
        gn.register_strategy("spyf", gram_mod.STRATEGIES["jacobian"])
        assert "spyf" not in gram_mod.FACTORS
        with pytest.raises(TypeError, match="factors for 'spyf' must be callable"):
            gn.register_strategy("spyf", gram_mod.STRATEGIES["jacobian"], factors=3)
    finally:
        gram_mod.STRATEGIES.pop("spyf", None)
        gram_mod.FACTORS.pop("spyf", None)
