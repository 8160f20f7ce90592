"""IGND (docs/METHODS.md §4.5), float64, scalar-output MLPs.

- b = 1: the IGND direction IS the EGN direction (Sherman-Morrison), squared error and BCE, λ > 0
  and λ = 0 (squared error) — 1e-10 relative;
- b > 1: it is the mean of the per-example IGND directions (1e-10 relative);
- the Gram diagonal equals diag(J Jᵀ) of the dense Jacobian (1e-12 relative);
- a model with c > 1 outputs is rejected at the first trace, naming the shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dense_jacobian, flat, init_mlp, make_labels, mlp, rel_err

import gaussnewton as gn
from gaussnewton.gram import as_2d
from gaussnewton.ignd import gram_diagonal, ignd

PLAIN = dict(damping_policy="constant", line_search=None)
B = 5


def _setup(loss, seed=0):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    return init_mlp(kp, 3, 1), jax.random.normal(kx, (B, 3)), make_labels(ky, loss, B, 1)


@pytest.mark.parametrize(
    "loss", ["squared_error", "sigmoid_binary_cross_entropy"], ids=["sq", "bce"]
)
def test_ignd_batch_one_is_egn_and_batch_is_mean(loss):
    params, x, y = _setup(loss)
    opt = ignd(mlp, loss=loss, learning_rate=1.0, damping=1e-2, **PLAIN)
    step = jax.jit(opt.step)

    @jax.jit
    def egn_dir(p, xi, yi, lam):
        return gn.egn_direction(mlp, p, xi, yi, loss=loss, damping=lam)[0]

    state = opt.init(params)
    lams = (1e-2, 0.0) if loss == "squared_error" else (1e-2,)
    per_example = []
    for i in range(B):
        xi, yi = x[i : i + 1], y[i : i + 1]
        for lam in lams:
            new, _, info = step(params, state._replace(damping=jnp.asarray(lam)), xi, yi)
            d_egn = egn_dir(params, xi, yi, lam)
            assert rel_err(flat(new) - flat(params), flat(d_egn)) < 1e-10, (i, lam)
            assert float(info.directional_derivative) < 0
        per_example.append(flat(step(params, state, xi, yi)[0]) - flat(params))
    new, _, _ = step(params, state, x, y)
    assert rel_err(flat(new) - flat(params), np.mean(per_example, axis=0)) < 1e-10


def test_gram_diagonal_matches_dense():
    params, x, _ = _setup("squared_error", seed=1)
    jac, _ = dense_jacobian(mlp, params, x)
    kii = jax.jit(lambda p: gram_diagonal(as_2d(mlp), p, x))(params)
    assert rel_err(kii, np.sum(np.asarray(jac) ** 2, axis=1)) < 1e-12


def test_ignd_rejects_multi_output_and_runs_with_adam():
    params, x, y = _setup("squared_error", seed=2)
    multi = init_mlp(jax.random.key(3), 3, 2)
    opt = ignd(mlp, loss="squared_error", learning_rate=0.1)
    with pytest.raises(ValueError, match="scalar-output"):
        opt.step(multi, opt.init(multi), x, jnp.zeros((B, 2)))
    with pytest.raises(ValueError, match="damping"):
        ignd(mlp, loss="squared_error", learning_rate=0.1, damping=-1.0)
    adam = ignd(mlp, loss="squared_error", learning_rate=0.05, tx=optax.scale_by_adam())
    step = jax.jit(adam.step)
    state, p = adam.init(params), params
    losses = []
    for _ in range(10):
        p, state, info = step(p, state, x, y)
        losses.append(float(info.loss))
    assert losses[-1] < 0.9 * losses[0]
