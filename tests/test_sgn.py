"""SGN (docs/METHODS.md §4.2) and the Gram-Gauss-Newton preset (§4.3), float64.

- SGN with ``max_cg_iters`` well above the parameter count and a tight tolerance equals the EGN
  direction (1e-8 relative), for squared error and softmax CE;
- truncated CG (the default 10 iterations) still gives a descent direction;
- the authors' residual form of the predicted reduction equals the exact damped quadratic model
  (ρ from both agree to 1e-8);
- Gram-Gauss-Newton with λ equals EGN with λ/b (1e-10 relative).
"""

import jax
import numpy as np
import optax
import pytest
from conftest import flat, init_mlp, make_labels, mlp, rel_err

import gaussnewton as gn
from gaussnewton.gram_gauss_newton import gram_gauss_newton
from gaussnewton.sgn import sgn

PLAIN = dict(damping_policy="constant", line_search=None)
B = 6


def _problem(loss, c, seed=0):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    return init_mlp(kp, 3, c), jax.random.normal(kx, (B, 3)), make_labels(ky, loss, B, c)


def _delta(new, old):
    return flat(new) - flat(old)


@pytest.mark.parametrize(
    ("loss", "c"), [("squared_error", 2), ("softmax_cross_entropy", 3)], ids=["sq", "ce"]
)
def test_sgn_with_enough_cg_iterations_equals_egn(loss, c):
    params, x, y = _problem(loss, c)
    n_params = flat(params).size
    lam = 1e-2
    exact = sgn(mlp, loss=loss, damping=lam, max_cg_iters=4 * n_params, cg_tol=1e-13, **PLAIN)
    short = sgn(mlp, loss=loss, damping=lam, **PLAIN)  # the authors' 10 iterations

    @jax.jit
    def run(p):
        d_egn, _ = gn.egn_direction(mlp, p, x, y, loss=loss, damping=lam)
        a = exact.step(p, exact.init(p), x, y)
        b = short.step(p, short.init(p), x, y)
        return d_egn, a, b

    d_egn, (p_exact, _, info), (p_short, _, info_short) = run(params)
    assert rel_err(_delta(p_exact, params), flat(d_egn)) < 1e-8
    assert float(info.cg_residual) <= 1e-13 and int(info.cg_iters) > 10
    assert int(info_short.cg_iters) == 10
    assert float(info_short.directional_derivative) < 0  # truncated CG from 0: descent


def test_sgn_residual_model_equals_exact_model():
    params, x, y = _problem("softmax_cross_entropy", 3, seed=1)
    kw = dict(loss="softmax_cross_entropy", damping=1e-1, max_cg_iters=5, line_search=None)
    plain = sgn(mlp, **kw)
    # an identity tx forces the JVP evaluation of ½Δᵀ(H + λI)Δ instead of the residual form
    with_tx = sgn(mlp, **kw, tx=optax.identity())

    @jax.jit
    def run(p):
        return plain.step(p, plain.init(p), x, y)[2], with_tx.step(p, with_tx.init(p), x, y)[2]

    a, b = run(params)
    assert np.isfinite(float(a.rho))
    np.testing.assert_allclose(float(a.rho), float(b.rho), rtol=1e-8)


def test_sgn_defaults_are_the_authors():
    opt = sgn(mlp, loss="squared_error")
    assert opt.line_search == gn.Armijo(c1=1e-4, shrink=0.5, max_trials=10, reset="restart")
    assert opt.damping_policy == gn.AdaptiveDamping(increase=1.5, decrease=2 / 3, min=1e-6)
    assert opt.damping == 1e-4
    with pytest.raises(ValueError, match="max_cg_iters"):
        sgn(mlp, loss="squared_error", max_cg_iters=0)
    with pytest.raises(ValueError, match="damping"):
        sgn(mlp, loss="squared_error", damping=0.0)


def test_gram_gauss_newton_is_egn_with_lambda_over_b():
    params, x, y = _problem("squared_error", 2, seed=2)
    lam = 0.3
    ggn = gram_gauss_newton(mlp, learning_rate=0.7, damping=lam)
    egn = gn.egn(mlp, loss="squared_error", learning_rate=0.7, damping=lam / B, **PLAIN)

    @jax.jit
    def run(p):
        return ggn.step(p, ggn.init(p), x, y), egn.step(p, egn.init(p), x, y)

    (p_ggn, _, info), (p_egn, _, _) = run(params)
    assert rel_err(_delta(p_ggn, params), _delta(p_egn, params)) < 1e-10
    assert float(info.damping) == pytest.approx(lam)  # reported in the GGN convention
