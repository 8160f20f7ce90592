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
