"""Dual Gauss-Newton directions (docs/METHODS.md §4.4), float64 with a dense Jacobian reference.

- squared error: the dual direction IS the EGN direction with the same λ (1e-10 relative);
- softmax CE and sigmoid BCE: after enough inner Newton steps the direction equals the minimizer of
  the prox-linear problem ``(1/b) Σ l(f + J v) + (λ/2)‖v‖²`` solved directly in parameter space
  by damped Newton with the dense ``J`` (1e-7 relative);
- after ANY number of inner steps (0, 1, 2, 4) the direction decreases the prox-linear objective
  below ``P(0) = L`` and is a descent direction (``∇Lᵀv < 0``), for λ from 1e-4 to 1;
- the optax transform: ``chain(dual_gn_transform(λ), sgd(1/λ))`` takes the dual GN step, it tends
  to the gradient as λ → ∞, and it runs inside ``optax.adam`` under ``jit``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_jacobian, flat, init_mlp, make_labels, mlp, rel_err

import gaussnewton as gn
from gaussnewton.dual import dual_gn, dual_gn_transform, dual_solve

B = 6
PLAIN = dict(damping_policy="constant", line_search=None)
CASES = [("softmax_cross_entropy", 3), ("sigmoid_binary_cross_entropy", 1)]
IDS = ["ce", "bce"]


def _setup(loss, c, seed=0):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = init_mlp(kp, 3, c)
    x = jax.random.normal(kx, (B, 3))
    y = make_labels(ky, loss, B, c)
    loss_obj = gn.get_loss(loss)
    f = mlp(params, x)
    yp = loss_obj.prepare_labels(f, y)
    jac, _ = dense_jacobian(mlp, params, x)
    return params, x, y, loss_obj, f, yp, np.asarray(jac)


def _primal(loss_obj, f, yp, jac, lam, v):
    z = f + (jac @ v).reshape(f.shape)
    return float(jnp.mean(loss_obj.value(z, yp))) + 0.5 * lam * float(v @ v)


def _prox_linear_reference(loss_obj, f, yp, jac, lam, iters=60):
    """argmin_v (1/b) Σ l(f + J v) + (λ/2)‖v‖² by damped Newton in parameter space."""
    b, c = f.shape
    d = jac.shape[1]
    jb = jac.reshape(b, c, d)
    v = np.zeros(d)
    for _ in range(iters):
        z = f + (jac @ v).reshape(b, c)
        grad = jac.T @ np.asarray(loss_obj.grad(z, yp)).reshape(-1) / b + lam * v
        hess = np.einsum("bcd,bce,bep->dp", jb, np.asarray(loss_obj.hessian(z, yp)), jb) / b
        step = np.linalg.solve(hess + lam * np.eye(d), grad)
        t, p0 = 1.0, _primal(loss_obj, f, yp, jac, lam, v)
        while _primal(loss_obj, f, yp, jac, lam, v - t * step) > p0 - 1e-4 * t * grad @ step:
            t *= 0.5
            if t < 1e-12:
                break
        v = v - t * step
    return v


def test_squared_error_dual_is_egn():
    kp, kx, ky = jax.random.split(jax.random.key(5), 3)
    params, x = init_mlp(kp, 3, 2), jax.random.normal(kx, (B, 3))
    y = make_labels(ky, "squared_error", B, 2)
    opt = dual_gn(mlp, loss="squared_error", damping=1e-2, **PLAIN)

    @jax.jit
    def run(p):
        d, _ = gn.egn_direction(mlp, p, x, y, loss="squared_error", damping=1e-2)
        return opt.step(p, opt.init(p), x, y), d

    (new, _, info), d = run(params)
    assert rel_err(flat(new) - flat(params), flat(d)) < 1e-10
    assert not bool(info.rejected)


@pytest.mark.parametrize(("loss", "c"), CASES, ids=IDS)
def test_converges_to_the_prox_linear_minimizer(loss, c):
    params, x, y, loss_obj, f, yp, jac = _setup(loss, c)
    opt = dual_gn(mlp, loss=loss, damping=1e-2, max_inner_iters=30, **PLAIN)
    step = jax.jit(opt.step)
    state0 = opt.init(params)
    for lam in (1e-2, 3e-1):  # λ lives in the state: one compilation
        new, _, info = step(params, state0._replace(damping=jnp.asarray(lam)), x, y)
        v_ref = _prox_linear_reference(loss_obj, f, yp, jac, lam)
        assert rel_err(flat(new) - flat(params), v_ref) < 1e-7, (loss, lam)
        assert float(info.cg_residual) < 1e-8 and int(info.cg_iters) == 30


@pytest.mark.parametrize(("loss", "c"), CASES, ids=IDS)
def test_any_number_of_inner_steps_gives_descent(loss, c):
    params, x, y, loss_obj, f, yp, jac = _setup(loss, c, seed=1)
    b = B
    kmat = jnp.asarray(jac @ jac.T).reshape(b, c, b, c)
    grad_l = jac.T @ np.asarray(loss_obj.grad(f, yp)).reshape(-1) / b
    solve = jax.jit(lambda lam, k: dual_solve(loss_obj, f, yp, kmat, lam, k).alpha)
    p_zero = float(jnp.mean(loss_obj.value(f, yp)))
    for lam in (1e-4, 1e-2, 1.0):
        for k in (0, 1, 2, 4):
            alpha = np.asarray(solve(lam, k)).reshape(-1)
            v = -jac.T @ alpha / (b * lam)
            p_v = _primal(loss_obj, f, yp, jac, lam, v)
            assert grad_l @ v < 0, (lam, k)
            assert p_v < p_zero, (lam, k)


def test_optax_transform():
    loss, c = CASES[0]
    params, x, y, *_ = _setup(loss, c, seed=2)
    lam = 1e-1
    opt = dual_gn(mlp, loss=loss, damping=lam, max_inner_iters=4, **PLAIN)
    tx = optax.chain(
        dual_gn_transform(mlp, loss=loss, damping=lam, max_inner_iters=4), optax.sgd(1.0 / lam)
    )
    big = dual_gn_transform(mlp, loss=loss, damping=1e6, max_inner_iters=2)
    adam = optax.chain(dual_gn_transform(mlp, loss=loss, damping=lam), optax.adam(1e-2))

    @jax.jit
    def run(p):
        new, _, _ = opt.step(p, opt.init(p), x, y)
        upd, _ = tx.update(p, tx.init(p), p, x=x, y=y)
        far, _ = big.update(p, big.init(p), p, x=x, y=y)
        grad = gn.egn_direction(mlp, p, x, y, loss=loss, damping=1.0)[1].grad
        a_upd, _ = adam.update(p, adam.init(p), p, x=x, y=y)
        return new, upd, far, grad, a_upd

    new, upd, far, grad, a_upd = run(params)
    assert rel_err(flat(upd), flat(new) - flat(params)) < 1e-10
    assert rel_err(flat(far), flat(grad)) < 1e-4
    assert np.all(np.isfinite(flat(a_upd))) and np.linalg.norm(flat(a_upd)) > 0
    with pytest.raises(ValueError, match="x=x, y=y"):
        tx.update(params, tx.init(params), params)


def test_unsupported_loss_is_rejected():
    huber = gn.ConvexLoss(lambda f, y: jnp.sum(jnp.sqrt(1 + (f - y) ** 2) - 1))
    with pytest.raises(ValueError, match="dual_gn"):
        dual_gn(mlp, loss=huber)
    with pytest.raises(ValueError, match="damping"):
        dual_gn(mlp, loss="softmax_cross_entropy", damping=0.0)
