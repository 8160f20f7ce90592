"""A new method written outside the package with public imports only (issue: composable pieces).

A damped gradient method ``d = −∇L / (1 + λ)`` built from ``gn.linearize`` + ``gn.Direction`` and
composed by ``gn.make_method`` with the family's step loop; then the same direction with a custom
damping policy and a custom step size (the stateless public protocols ``gn.DampingPolicy`` and
``gn.LineSearch``); then a built-in direction (``gn.egn``) with a step-size rule and a damping rule
that carry their own state (``gn.StepSizeRule``, ``gn.DampingRule``). Only ``gaussnewton`` public
names are imported here.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from conftest import flat, init_mlp, mlp

import gaussnewton as gn

LOSS = gn.get_loss("squared_error")


def damped_gradient(fn, params, x, y, lam, key, state):
    lin = gn.linearize(fn, LOSS, params, x, y)
    grad = lin.grad()
    d = jax.tree_util.tree_map(lambda g: -g / (1 + lam), grad)

    def quad(delta):  # a model ½ λ ‖Δ‖² (this method's own curvature model)
        return 0.5 * lam * sum(jnp.vdot(u, u) for u in jax.tree_util.tree_leaves(delta))

    return gn.Direction(lin.loss, grad, d, quad, method_state=state, labels_ok=lin.labels_ok)


@dataclasses.dataclass(frozen=True)
class Halving:  # gn.DampingPolicy: halve λ after every accepted step, double it on rejection
    uses_gain_ratio = False

    def update(self, lam, rho):
        return lam / 2

    def on_rejected(self, lam):
        return lam * 2


@dataclasses.dataclass(frozen=True)
class TryTwo:  # gn.LineSearch: α_max, else α_max / 4
    def search(self, loss_at, loss0, slope, prev, alpha_max):
        big = loss_at(alpha_max)
        small_alpha = alpha_max / 4
        small = loss_at(small_alpha)
        take_big = big <= small
        alpha = jnp.where(take_big, alpha_max, small_alpha)
        value = jnp.where(take_big, big, small)
        return gn.LineSearchResult(alpha, value, jnp.asarray(2, jnp.int32), value < loss0, alpha)


def _problem():
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (16, 3))
    y = jnp.sin(x[:, :1])
    return init_mlp(kp, 3, 1), x, y


def test_damped_gradient_method_from_public_pieces():
    params, x, y = _problem()
    opt = gn.make_method(
        "damped_gd",
        mlp,
        damped_gradient,
        loss="squared_error",
        learning_rate=0.5,
        damping=1.0,
        damping_policy="constant",
        line_search=None,
    )
    state = opt.init(params)
    step = jax.jit(opt.step)
    new, state, info = step(params, state, x, y)
    grad = jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((mlp(p, x) - y) ** 2, -1)))(params)
    np.testing.assert_allclose(flat(new), flat(params) - 0.5 * flat(grad) / 2.0, rtol=1e-10)
    losses = [float(info.loss)]
    for _ in range(20):
        new, state, info = step(new, state, x, y)
        losses.append(float(info.loss))
    assert losses[-1] < 0.7 * losses[0]
    assert step._cache_size() == 1


def test_custom_damping_policy_and_line_search_protocols():
    params, x, y = _problem()
    opt = gn.make_method(
        "damped_gd_custom",
        mlp,
        damped_gradient,
        loss="squared_error",
        learning_rate=2.0,
        damping=1.0,
        damping_policy=Halving(),
        line_search=TryTwo(),
    )
    state = opt.init(params)
    new, state, info = jax.jit(opt.step)(params, state, x, y)
    assert not bool(info.rejected)
    assert float(state.damping) == 0.5
    assert int(info.ls_trials) == 2
    assert float(info.step_size) in (2.0, 0.5)
    assert np.isnan(float(info.rho))  # uses_gain_ratio = False: ρ is not computed


class HalvingState(NamedTuple):
    alpha: jax.Array  # the α of the next step
    halvings: jax.Array  # how many rejected steps halved it (int32)


@dataclasses.dataclass(frozen=True)
class HalveOnReject:  # gn.StepSizeRule with its own state: α/2 after a rejected step, else ×grow
    grow: float = 1.25

    def init(self, alpha_max, dtype):
        return HalvingState(jnp.asarray(alpha_max, dtype), jnp.zeros((), jnp.int32))

    def update(self, state, loss_at, loss0, slope, alpha_max):
        alpha = jnp.minimum(state.alpha, alpha_max)
        value = loss_at(alpha)
        result = gn.LineSearchResult(alpha, value, jnp.asarray(1, jnp.int32), value < loss0)
        kept = state._replace(alpha=jnp.minimum(self.grow * alpha, alpha_max))
        return result, kept

    def on_rejected(self, state):
        return HalvingState(state.alpha / 2, state.halvings + 1)


class MemoryState(NamedTuple):
    lam: jax.Array
    rho_avg: jax.Array  # running mean of the clipped gain ratio
    rejections: jax.Array  # int32


@dataclasses.dataclass(frozen=True)
class AveragedGainDamping:  # gn.DampingRule with memory: λ follows a running mean of ρ
    uses_gain_ratio = True

    def init(self, lam0, dtype):
        return MemoryState(
            jnp.asarray(lam0, dtype), jnp.asarray(0.5, dtype), jnp.zeros((), jnp.int32)
        )

    def value(self, state, count=None):
        return state.lam

    def update(self, state, rho, count=None):
        avg = 0.5 * state.rho_avg + 0.5 * _clipped(rho)
        factor = jnp.where(avg > 0.6, 0.5, jnp.where(avg < 0.3, 2.0, 1.0))
        return state._replace(lam=state.lam * factor, rho_avg=avg)

    def on_rejected(self, state):
        return state._replace(lam=4 * state.lam, rejections=state.rejections + 1)


def _clipped(rho):
    return jnp.clip(jnp.nan_to_num(rho, nan=-1.0, neginf=-1.0), -1.0, 1.0)


def test_stateful_step_size_and_damping_rules_with_a_builtin_direction():
    """Both rules' states evolve as specified, every step; the loss falls; one trace for all."""
    params, x, y = _problem()
    traces = []

    def model(p, xb):
        traces.append(1)
        return mlp(p, xb)

    alpha_max = 8.0  # too long at first: rejected steps halve α until the loss falls
    opt = gn.egn(
        model,
        loss="squared_error",
        learning_rate=alpha_max,
        damping=1e-2,
        damping_policy=AveragedGainDamping(),
        line_search=HalveOnReject(),
    )
    state = opt.init(params)
    assert isinstance(state.step_size, HalvingState) and isinstance(state.damping, MemoryState)
    assert float(state.step_size.alpha) == alpha_max and float(state.damping.lam) == 1e-2
    step = jax.jit(opt.step)
    first = None
    n_rejected = n_accepted = 0
    for i in range(25):
        xb = x * (1.0 + 0.01 * i)  # new data every step, same shapes
        new, new_state, info = step(params, state, xb, y)
        old_s, new_s = state.step_size, new_state.step_size
        old_d, new_d = state.damping, new_state.damping
        a = min(float(old_s.alpha), alpha_max)
        np.testing.assert_allclose(info.step_size, a)
        np.testing.assert_allclose(info.damping, old_d.lam)
        if bool(info.rejected):
            n_rejected += 1
            np.testing.assert_array_equal(flat(new), flat(params))
            np.testing.assert_allclose(new_s.alpha, float(old_s.alpha) / 2)
            assert int(new_s.halvings) == int(old_s.halvings) + 1
            np.testing.assert_allclose(new_d.lam, 4 * float(old_d.lam))
            np.testing.assert_allclose(new_d.rho_avg, old_d.rho_avg)
            assert int(new_d.rejections) == int(old_d.rejections) + 1
            assert int(new_state.count) == int(state.count)
        else:
            n_accepted += 1
            np.testing.assert_allclose(new_s.alpha, min(1.25 * a, alpha_max))
            assert int(new_s.halvings) == int(old_s.halvings)
            avg = 0.5 * float(old_d.rho_avg) + 0.5 * float(_clipped(info.rho))
            factor = 0.5 if avg > 0.6 else (2.0 if avg < 0.3 else 1.0)
            np.testing.assert_allclose(new_d.rho_avg, avg, rtol=1e-12)
            np.testing.assert_allclose(new_d.lam, factor * float(old_d.lam), rtol=1e-12)
            assert int(new_d.rejections) == int(old_d.rejections)
            assert int(new_state.count) == int(state.count) + 1
        np.testing.assert_allclose(info.next_damping, new_d.lam)
        first = float(info.loss) if first is None else first
        params, state = new, new_state
    assert n_rejected >= 1 and n_accepted >= 10, (n_rejected, n_accepted)
    final = 0.5 * float(jnp.mean(jnp.sum((mlp(params, x) - y) ** 2, -1)))
    assert final < 0.5 * first
    n_traced = len(traces)
    step(params, state, x, y)
    assert step._cache_size() == 1 and len(traces) == n_traced  # no retracing across steps
    assert opt.step_size_rule is opt.line_search and opt.damping_rule is opt.damping_policy


@dataclasses.dataclass(frozen=True)
class StatelessArmijo:  # gn.LineSearch only (search): the loop gives it the state α_prev
    inner: gn.Armijo

    def search(self, loss_at, loss0, slope, prev, alpha_max):
        return self.inner.search(loss_at, loss0, slope, prev, alpha_max)


@dataclasses.dataclass(frozen=True)
class StatelessAdaptive:  # gn.DampingPolicy only (update(λ, ρ), on_rejected(λ)): state λ
    inner: gn.AdaptiveDamping
    uses_gain_ratio = True

    def update(self, lam, rho):
        return self.inner.update(lam, rho)

    def on_rejected(self, lam):
        return self.inner.on_rejected(lam)


def _run(opt, params, x, y, n=6, bad=3):
    state, step, out = opt.init(params), jax.jit(opt.step), []
    for i in range(n):
        xb = x * (1.0 + 0.02 * i)
        xb = xb.at[0, 0].set(jnp.nan) if i == bad else xb  # one rejected step
        params, state, info = step(params, state, xb, y)
        out.append(jax.tree_util.tree_leaves((params, state, info)))
    return out


def test_stateless_protocols_and_fixed_step_equal_the_rules_bitwise():
    """The stateless forms (wrapped by the step loop) and ``gn.FixedStep()`` (= ``None``) take
    exactly the steps of the rules they wrap, a rejected step included."""
    params, x, y = _problem()
    kw = dict(loss="squared_error", learning_rate=2.0, damping=1e-2)
    armijo, adaptive = gn.Armijo(reset="goldstein", shrink=0.5), gn.AdaptiveDamping()
    pairs = [
        (
            gn.egn(mlp, **kw, line_search=armijo, damping_policy=adaptive),
            gn.egn(
                mlp,
                **kw,
                line_search=StatelessArmijo(armijo),
                damping_policy=StatelessAdaptive(adaptive),
            ),
        ),
        (
            gn.egn(mlp, **kw, line_search=None, damping_policy=adaptive),
            gn.egn(mlp, **kw, line_search=gn.FixedStep(), damping_policy=adaptive),
        ),
    ]
    for rule_opt, other_opt in pairs:
        got, want = _run(other_opt, params, x, y), _run(rule_opt, params, x, y)
        assert bool(want[3][-1]) and not bool(want[2][-1])  # step 3 rejected (info.rejected)
        for a, b in zip(got, want, strict=True):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
