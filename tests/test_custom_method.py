"""A new method written outside the package with public imports only (issue: composable pieces).

A damped gradient method ``d = −∇L / (1 + λ)`` built from ``gn.linearize`` + ``gn.Direction`` and
composed by ``gn.make_method`` with the family's step loop; then the same direction with a custom
damping policy and a custom step size (the public protocols ``gn.DampingPolicy`` and
``gn.LineSearch``). Only ``gaussnewton`` public names are imported here.
"""

import dataclasses

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
