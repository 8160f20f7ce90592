"""Shared test configuration and problems.

The whole suite runs with float64 enabled (dense references need it); float32 paths are tested with
explicitly float32 inputs. Problems are small so that a dense Jacobian is cheap.
"""

from __future__ import annotations

import functools
import os

# Much of the suite is XLA compilation of small programs: the least backend (LLVM) code
# generation effort; the HLO passes still run and results agree to rounding, which every tolerance
# here allows. Measured: tests/test_tokens.py + test_param_space.py 24 % less CPU, the whole suite
# only 2 % (32.7 -> 31.9 CPU-minutes; its long pole is the 8-device subprocess, which sets the
# same flag itself). Read when jax starts its backend (before the first computation of any test);
# appended to a user's XLA_FLAGS.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from gaussnewton.losses import get_loss  # noqa: E402


def mlp(params, x):
    """tanh MLP with nested-dict parameters and two hidden layers."""
    h = jnp.tanh(x @ params["hidden"]["l1"]["w"] + params["hidden"]["l1"]["b"])
    h = jnp.tanh(h @ params["hidden"]["l2"]["w"] + params["hidden"]["l2"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def mlp_scalar(params, x):
    """The same MLP with a (b,)-shaped output (c = 1)."""
    return mlp(params, x)[:, 0]


def init_mlp(key, d_in: int, c: int, width: int = 5, dtype=jnp.float64):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "hidden": {
            "l1": {
                "w": jax.random.normal(k1, (d_in, width), dtype)
                / jnp.sqrt(jnp.asarray(d_in, dtype)),
                "b": 0.1 * jax.random.normal(k4, (width,), dtype),
            },
            "l2": {
                "w": jax.random.normal(k2, (width, width), dtype)
                / jnp.sqrt(jnp.asarray(width, dtype)),
                "b": jnp.zeros(width, dtype),
            },
        },
        "out": {
            "w": jax.random.normal(k3, (width, c), dtype) / jnp.sqrt(jnp.asarray(width, dtype)),
            "b": jnp.zeros(c, dtype),
        },
    }


def make_labels(key, loss: str, b: int, c: int, dtype=jnp.float64):
    if loss == "squared_error":
        return jax.random.normal(key, (b, c), dtype)
    if loss == "softmax_cross_entropy":
        return jax.random.randint(key, (b,), 0, c)
    if loss == "sigmoid_binary_cross_entropy":
        return jax.random.bernoulli(key, 0.5, (b, 1)).astype(dtype)
    raise ValueError(loss)


def dense_jacobian(model_fn, params, x):
    """Materialized ``J`` of shape ``(b*c, d)`` (example-major rows) and the unravel function."""
    flat, unravel = ravel_pytree(params)
    return _dense_jacobian(model_fn, unravel, flat, x), unravel


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_jacobian(model_fn, unravel, flat, x):
    b = jax.tree_util.tree_leaves(x)[0].shape[0]
    jac = jax.jacfwd(lambda w: model_fn(unravel(w), x).reshape(b, -1))(flat)
    return jac.reshape(-1, flat.size)


def dense_lm_direction(model_fn, params, x, y, loss, lam, q_override=None):
    """Parameter-space reference ``−(Jᵀ Q J / b + λ I)⁻¹ ∇L`` in float64 (numpy solve)."""
    loss = get_loss(loss)
    f = model_fn(params, x)
    f2 = f if f.ndim == 2 else f[:, None]
    yy = loss.prepare_labels(f2, y)
    b = f2.shape[0]
    jac, unravel = dense_jacobian(model_fn, params, x)
    q = np.asarray(loss.hessian(f2, yy) if q_override is None else q_override, np.float64)
    g = np.asarray(loss.grad(f2, yy), np.float64).reshape(-1)
    jac = np.asarray(jac, np.float64)
    jb = jac.reshape(b, q.shape[1], -1)
    h = np.einsum("bcd,bce,bep->dp", jb, q, jb) / b
    grad = jac.T @ g / b
    return -np.linalg.solve(h + lam * np.eye(h.shape[0]), grad), grad


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="session")
def regression_problem():
    """A small regression task (b = 32, 3 inputs, 1 output) where a tanh MLP can fit sin."""
    key = jax.random.key(0)
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (32, 3), jnp.float32)
    y = jnp.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    params = init_mlp(kp, 3, 1, width=8, dtype=jnp.float32)
    return mlp_scalar, params, x, y
