"""Damping: the gain-ratio rule, and ρ = 1 on a problem whose quadratic model is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussnewton as gn
from gaussnewton.damping import gain_ratio


def test_gain_ratio_failures():
    assert float(gain_ratio(jnp.float64(-1.0), jnp.float64(-2.0))) == 0.5
    for predicted in (0.0, 1.0, jnp.nan, jnp.inf):
        assert float(gain_ratio(jnp.float64(-1.0), jnp.float64(predicted))) == -np.inf
    assert float(gain_ratio(jnp.float64(jnp.nan), jnp.float64(-1.0))) == -np.inf


def test_update_rule_and_clamp():
    pol = gn.AdaptiveDamping(increase=1.5, decrease=2 / 3, min=1e-3, max=10.0)
    lam = jnp.float64(1.0)
    np.testing.assert_allclose(pol.update(lam, jnp.float64(0.1)), 1.5)
    np.testing.assert_allclose(pol.update(lam, jnp.float64(-jnp.inf)), 1.5)
    np.testing.assert_allclose(pol.update(lam, jnp.float64(0.5)), 1.0)
    np.testing.assert_allclose(pol.update(lam, jnp.float64(0.9)), 2 / 3)
    np.testing.assert_allclose(pol.update(jnp.float64(9.0), jnp.float64(0.0)), 10.0)
    np.testing.assert_allclose(pol.update(jnp.float64(1e-3), jnp.float64(1.0)), 1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [{"increase": 0.9}, {"decrease": 1.0}, {"min": 2.0, "max": 1.0}, {"lower": 0.9, "upper": 0.1}],
)
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError, match="AdaptiveDamping"):
        gn.AdaptiveDamping(**kwargs)


def test_exact_quadratic_model_gives_rho_one():
    """Linear model + squared error: L(w + Δ) − L(w) = ∇LᵀΔ + ½ΔᵀHΔ exactly, so ρ = 1 and λ × 2/3."""
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (16, 5))
    y = jax.random.normal(ky, (16,))
    model = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
    opt = gn.egn(model, loss="squared_error", learning_rate=0.5, damping=1.0, line_search=None)
    state = opt.init(params)
    step = jax.jit(opt.step)
    lam = 1.0
    for _ in range(3):
        params, state, info = step(params, state, x, y)
        np.testing.assert_allclose(info.rho, 1.0, rtol=1e-10)
        np.testing.assert_allclose(info.damping, lam)
        lam *= 2 / 3
        np.testing.assert_allclose(info.next_damping, lam)


def test_rho_rule_is_followed_on_a_nonlinear_problem(regression_problem):
    """Every step's λ update matches the rule applied to the reported ρ."""
    model_fn, params, x, y = regression_problem
    pol = gn.AdaptiveDamping(increase=1.5, decrease=2 / 3)
    opt = gn.egn(model_fn, loss="squared_error", damping=1.0, damping_policy=pol, line_search=None)
    state = opt.init(params)
    step = jax.jit(opt.step)
    seen = set()
    for _ in range(12):
        params, state, info = step(params, state, x, y)
        rho, lam = float(info.rho), float(info.damping)
        factor = 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)
        seen.add(factor)
        np.testing.assert_allclose(
            info.next_damping, min(max(lam * factor, pol.min), pol.max), rtol=1e-6
        )
    assert 2 / 3 in seen


def test_on_rejected_jumps_by_reject_increase():
    pol = gn.AdaptiveDamping(min=1e-3, max=10.0)
    assert pol.reject_increase == 10.0
    np.testing.assert_allclose(pol.on_rejected(jnp.float64(1e-2)), 0.1)
    np.testing.assert_allclose(pol.on_rejected(jnp.float64(5.0)), 10.0)  # clamped to max
    np.testing.assert_allclose(
        gn.AdaptiveDamping(reject_increase=1.5).on_rejected(jnp.float64(1.0)), 1.5
    )
    with pytest.raises(ValueError, match="reject_increase"):
        gn.AdaptiveDamping(reject_increase=0.5)


def _rejections_before_first_accepted(policy):
    """f(w, x) = x log w from w = 1 towards y = −10 x: the GN step is d = −10/(1 + λ), so every step
    with λ < 9 lands at w ≤ 0 (a non-finite loss) and is rejected; λ₀ = 1e-3."""
    model = lambda p, x: x[:, 0] * jnp.log(p["w"])  # noqa: E731
    x = jnp.ones((4, 1))
    opt = gn.egn(model, loss="squared_error", damping=1e-3, damping_policy=policy, line_search=None)
    params, state = {"w": jnp.float64(1.0)}, opt.init({"w": jnp.float64(1.0)})
    step = jax.jit(opt.step)
    for n in range(40):
        params, state, info = step(params, state, x, -10.0 * x[:, 0])
        if not bool(info.rejected):
            assert np.isfinite(float(info.loss_after))
            return n
    raise AssertionError("no step accepted in 40")


def test_rejected_steps_raise_lambda_fast_enough():
    """λ must grow from 1e-3 to 9: log(9e3)/log(10) → 4 rejected steps with the default jump,
    log(9e3)/log(1.5) → 23 with the gain-ratio factor 1.5 (the former rule)."""
    assert _rejections_before_first_accepted(gn.AdaptiveDamping()) == 4
    assert _rejections_before_first_accepted(gn.AdaptiveDamping(reject_increase=1.5)) == 23


def test_dtype_floor():
    """λ >= max(min, eps_floor · ε(λ's dtype)): 1.2e-4 in float32, ``min`` (1e-8) in float64."""
    pol = gn.AdaptiveDamping()
    np.testing.assert_allclose(pol.floor(jnp.float32), 1000 * 2.0**-23)
    assert pol.floor(jnp.float64) == 1e-8
    lam32 = pol.update(jnp.float32(1e-4), jnp.float32(1.0))  # λ · 2/3 would be 6.7e-5
    assert lam32.dtype == jnp.float32
    np.testing.assert_allclose(lam32, 1000 * 2.0**-23, rtol=1e-6)
    np.testing.assert_allclose(pol.update(jnp.float64(1e-4), jnp.float64(1.0)), 1e-4 * 2 / 3)
    assert gn.AdaptiveDamping(eps_floor=0.0).floor(jnp.float32) == 1e-8
    with pytest.raises(ValueError, match="eps_floor"):
        gn.AdaptiveDamping(eps_floor=-1.0)


def test_library_default_floors_lambda_at_the_batch_loss():
    """``gn.egn(model, loss=...)``: λ₀ = 1e-3 and ``AdaptiveDamping(loss_floor=1)`` (λ ≥ L(w));
    an explicit ``damping`` or a constant policy keeps the former behaviour (METHODS §2.2)."""
    model = lambda p, x: x @ p["w"]  # noqa: E731
    opt = gn.egn(model, loss="squared_error")
    assert opt.damping == 1e-3 and opt.damping_policy == gn.AdaptiveDamping(loss_floor=1.0)
    assert gn.default_damping("adaptive") == (1e-3, gn.AdaptiveDamping(loss_floor=1.0))
    explicit = gn.egn(model, loss="squared_error", damping=1e-3)
    assert explicit.damping == 1e-3 and explicit.damping_policy == gn.AdaptiveDamping()
    constant = gn.egn(model, loss="squared_error", damping_policy="constant")
    assert constant.damping == 1e-3 and isinstance(constant.damping_policy, gn.ConstantDamping)
    custom = gn.AdaptiveDamping(min=1e-2)
    assert gn.egn(model, loss="squared_error", damping_policy=custom).damping_policy == custom
    with pytest.raises(ValueError, match="loss_floor"):
        gn.AdaptiveDamping(loss_floor=-1.0)


def test_with_loss_floor_rule():
    pol = gn.AdaptiveDamping(loss_floor=2.0, max=10.0)
    np.testing.assert_allclose(pol.with_loss_floor(jnp.float64(0.1), jnp.float64(0.3)), 0.6)
    np.testing.assert_allclose(pol.with_loss_floor(jnp.float64(1.0), jnp.float64(0.3)), 1.0)
    np.testing.assert_allclose(pol.with_loss_floor(jnp.float64(0.1), jnp.float64(50.0)), 10.0)
    lo = pol.with_loss_floor(jnp.float32(1e-9), jnp.float32(0.0))  # the dtype floor still holds
    np.testing.assert_allclose(lo, 1000 * 2.0**-23, rtol=1e-6)


def _mini_batch_lams(**egn_kwargs):
    """λ and the batch loss of 60 steps on fresh mini-batches (b = 8) of a noisy sin target, an
    over-parameterized model (D = 64 > b)."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k1, (256, 3))
    y = jnp.sin(2 * x[:, 0]) + 0.3 * jax.random.normal(k2, (256,))

    def model(p, xx):
        return jnp.tanh(xx @ p["w1"]) @ p["w2"]

    params = {"w1": jax.random.normal(k3, (3, 16)) / 2, "w2": jnp.zeros(16)}
    idx = jax.random.randint(jax.random.key(4), (60, 8), 0, 256)
    opt = gn.egn(model, loss="squared_error", **egn_kwargs)

    def body(carry, i):
        p, s = carry
        p, s, info = opt.step(p, s, x[i], y[i])
        return (p, s), (info.damping, info.next_damping, info.loss, info.rejected)

    out = jax.lax.scan(body, (params, opt.init(params)), idx)[1]
    return (np.asarray(a) for a in out)


def test_default_floor_holds_where_lambda_would_collapse():
    """On fresh mini-batches the gain ratio on the batch that built the model stays high: with
    ``damping=1e-3`` given λ falls towards 1e-8; the library default keeps λ ≥ L(w) after every
    accepted step, i.e. at the noise level (the target's noise variance is 0.09: L ≳ 0.045)."""
    lam, nxt, loss, rej = _mini_batch_lams()
    ok = ~rej
    assert np.all(nxt[ok] >= loss[ok] * (1 - 1e-12))
    assert lam[0] == 1e-3 and lam[1:].min() > 1e-2
    lam_old, *_ = _mini_batch_lams(damping=1e-3)
    assert lam_old.min() < 1e-6  # the collapse the default prevents
