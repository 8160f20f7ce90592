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
from conftest import (
    dense_jacobian,
    dense_lm_direction,
    flat,
    init_mlp,
    make_labels,
    mlp,
    rel_err,
)

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


def _lambda_path(rule, n_steps=6):
    """λ after each of ``n_steps`` default SGN steps (the authors' settings) on one batch."""
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = init_mlp(kp, 3, 2)
    x, y = 3.0 * jax.random.normal(kx, (16, 3)), make_labels(ky, "squared_error", 16, 2)
    opt = sgn(mlp, loss="squared_error", rho_at=rule)

    def body(carry, _):
        p, s = carry
        p, s, info = opt.step(p, s, x, y)
        return (p, s), (info.next_damping, info.ls_trials, info.rho)

    _, out = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, length=n_steps))(params)
    return [np.asarray(o) for o in out]


def test_sgn_rho_at_full_step_raises_lambda_where_the_backtracked_rule_lowers_it():
    """On a batch where every full step overshoots (each step backtracks), the authors' ratio at
    α_max d is < ¼ and λ rises ×3/2 per step (11x after 6 steps); the ratio of the accepted
    (halved) step is > ¼ on average and λ ends BELOW λ₀. Same directions, same step sizes."""
    lam0 = 1e-4
    ours, trials_ours, rho_ours = _lambda_path("accepted_step")
    theirs, trials_theirs, rho_theirs = _lambda_path("full_step")
    assert (trials_theirs > 1).all()  # every full step was rejected by Armijo first
    assert (rho_theirs < 0.25).all()
    np.testing.assert_allclose(theirs, lam0 * 1.5 ** np.arange(1, 7), rtol=1e-12)
    assert theirs[-1] / lam0 > 10
    assert ours[-1] < lam0 and np.isfinite(rho_ours).all()
    np.testing.assert_array_equal(trials_ours[:2], trials_theirs[:2])  # same first steps


def test_sgn_full_step_rho_is_the_dense_ratio():
    """First step, CG run to convergence: ρ = (L(w + d) − L(w)) / (∇Lᵀd + ½ dᵀ(H + λI)d) with the
    dense float64 LM direction d, whatever step the line search then takes."""
    params, x, y = _problem("squared_error", 2, seed=3)
    x = 3.0 * x
    lam = 1e-4
    n = flat(params).size
    opt = sgn(mlp, loss="squared_error", damping=lam, max_cg_iters=4 * n, cg_tol=1e-13,
              rho_at="full_step")  # fmt: skip
    _, _, info = jax.jit(lambda p: opt.step(p, opt.init(p), x, y))(params)
    jac, unravel = dense_jacobian(mlp, params, x)
    jac = np.asarray(jac)
    d, g = dense_lm_direction(mlp, params, x, y, "squared_error", lam)

    def loss_at(step):
        w = unravel(flat(params) + step)
        return 0.5 * np.sum(np.asarray(mlp(w, x) - y) ** 2) / B

    model = g @ d + 0.5 * (np.sum((jac @ d) ** 2) / B + lam * d @ d)
    rho = (loss_at(d) - loss_at(0.0 * d)) / model
    assert int(info.ls_trials) > 1  # the line search backtracked, ρ is still that of d
    np.testing.assert_allclose(float(info.rho), rho, rtol=1e-6)


def test_sgn_rho_at_is_checked():
    with pytest.raises(ValueError, match="rho_at='both'"):
        sgn(mlp, loss="squared_error", rho_at="both")
    assert sgn(mlp, loss="squared_error").rho_at == "accepted_step"  # the default is unchanged
