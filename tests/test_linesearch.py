"""Armijo backtracking: acceptance condition, resets, exhaustion, and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussnewton as gn


def _quadratic(a=4.0):
    """L(α) along d for L(w) = a/2 w², w = 1, d = −1: L(α) = a/2 (1 − α)², slope = −a."""
    return (lambda alpha: 0.5 * a * (1.0 - alpha) ** 2), 0.5 * a, -a


@jax.jit
def _search_all(prev, alpha_max):
    loss_at, loss0, slope = _quadratic()
    out = {}
    for reset in ("increase", "conservative", "goldstein", "restart"):
        out[reset] = gn.Armijo(c1=0.1, shrink=0.8, max_trials=15, reset=reset).search(
            loss_at, loss0, slope, prev, alpha_max
        )
    return out


def test_accepted_step_satisfies_armijo_and_resets():
    loss_at, loss0, slope = _quadratic()
    res = _search_all(jnp.float64(1.0), jnp.float64(2.0))
    for name, r in res.items():
        assert bool(r.accepted), name
        assert float(r.loss) <= loss0 + 0.1 * float(r.step_size) * slope + 1e-15
        np.testing.assert_allclose(r.loss, loss_at(r.step_size))
    # increase: α₀ = min(1.5·1, 2) = 1.5 passes (L = 0.5 ≤ 2 − 0.6) in one trial
    np.testing.assert_allclose(res["increase"].step_size, 1.5)
    assert int(res["increase"].trials) == 1
    # conservative: α₀ = α_prev = 1 passes at once, next start stays 1
    np.testing.assert_allclose(res["conservative"].step_size, 1.0)
    np.testing.assert_allclose(res["conservative"].next_step_size, 1.0)
    # goldstein: the decrease 2 is below (1 − c1)·α·|slope| = 3.6, so α is not enlarged
    np.testing.assert_allclose(res["goldstein"].next_step_size, 1.0)


def test_goldstein_enlarges_short_steps_and_caps_at_alpha_max():
    # from α_prev = 0.1 the decrease 2 − 2·0.81 = 0.38 exceeds 0.9·0.1·4 = 0.36: enlarge to 0.15
    res = _search_all(jnp.float64(0.1), jnp.float64(2.0))
    np.testing.assert_allclose(res["goldstein"].step_size, 0.1)
    np.testing.assert_allclose(res["goldstein"].next_step_size, 0.15)
    np.testing.assert_allclose(res["increase"].step_size, 0.15)  # min(1.5·0.1, 2)
    capped = _search_all(jnp.float64(1.0), jnp.float64(0.5))
    np.testing.assert_allclose(capped["increase"].step_size, 0.5)  # α_max caps every reset
    np.testing.assert_allclose(
        res["restart"].step_size, 1.6
    )  # from α_max = 2: L(2) = 2 fails, 1.6 passes


def test_backtracks_and_exhausts():
    loss_at, loss0, slope = _quadratic()
    ls = gn.Armijo(c1=0.1, shrink=0.5, max_trials=15, reset="conservative")
    r = jax.jit(lambda p: ls.search(loss_at, loss0, slope, p, jnp.float64(10.0)))(jnp.float64(8.0))
    # 8 → 4 → 2 → 1: first pass at α = 1 (L(2) = 2 fails: 2 > 2 − 0.8)
    np.testing.assert_allclose(r.step_size, 1.0)
    assert int(r.trials) == 4 and bool(r.accepted)
    # an ascent direction never passes: the last trial is taken and reported
    ls3 = gn.Armijo(max_trials=3, reset="conservative")
    r = ls3.search(lambda a: loss0 + a, loss0, jnp.float64(1.0), jnp.float64(1.0), jnp.float64(1.0))
    assert int(r.trials) == 3 and not bool(r.accepted)
    np.testing.assert_allclose(r.step_size, 0.8**2)


def test_nan_trial_is_rejected():
    ls = gn.Armijo(reset="conservative")
    r = ls.search(lambda a: jnp.where(a > 0.5, jnp.nan, 1.0 - a), 1.0, -1.0, 1.0, 1.0)
    assert bool(r.accepted) and float(r.step_size) <= 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"c1": 1.5}, "c1"),
        ({"shrink": 1.0}, "shrink"),
        ({"max_trials": 0}, "max_trials"),
        ({"reset": "wolfe"}, "reset"),
        ({"grow": 0.5}, "grow"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gn.Armijo(**kwargs)
