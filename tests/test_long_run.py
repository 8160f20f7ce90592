"""Long float32 runs of ``gn.egn`` with library defaults (adaptive λ from 1e-3, Armijo, auto solver).

A run must never reject a step (a non-finite direction or loss), and its training-set loss at the
end must not be above twice its running minimum (no late blow-up once λ has fallen to its floor).
Random mini-batches (with replacement) from a synthetic regression or classification set, the
whole run one ``lax.scan`` (one compilation). The slow test is the 3000-step, 8-32-32-1,
b = 64 case of the issue (and 8-32-32-10 softmax CE); the fast one takes the same path
(row-space solve, b = 64) with a 3-16-16-c model and 200 steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaussnewton as gn


def _mlp(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return out[:, 0] if out.shape[1] == 1 else out


def _init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), jnp.float32) / m**0.5,
            "b": jnp.zeros(n, jnp.float32),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _data(task, n, d_in, c):
    kx, kn = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (n, d_in), jnp.float32)
    z = jnp.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    if task == "regression":
        return x, z + 0.1 * jax.random.normal(kn, (n,), jnp.float32), "squared_error"
    logits = jnp.stack([z * (k - c / 2) + x[:, k % d_in] for k in range(c)], axis=1)
    return (
        x,
        jnp.argmax(logits + 0.3 * jax.random.normal(kn, logits.shape), axis=1),
        ("softmax_cross_entropy"),
    )


def _run(task, sizes, steps, b=64, n=1024):
    x, y, loss = _data(task, n, sizes[0], sizes[-1])
    params = _init(jax.random.key(0), sizes)
    opt = gn.egn(_mlp, loss=loss)
    lo = gn.get_loss(loss)
    idx = jax.random.randint(jax.random.key(1), (steps, b), 0, n)

    def full_loss(p):
        f = _mlp(p, x)
        f2 = f[:, None] if f.ndim == 1 else f
        return lo.value(f2, lo.prepare_labels(f2, y)).mean()

    def body(carry, i):
        p, s = carry
        p, s, info = opt.step(p, s, x[i], y[i])
        return (p, s), (info.rejected, info.damping, full_loss(p))

    @jax.jit
    def go(params):
        return jax.lax.scan(body, (params, opt.init(params)), idx)[1]

    rejected, lam, losses = (np.asarray(a) for a in go(params))
    assert lam.dtype == losses.dtype == np.float32  # (the tests run with jax_enable_x64)
    return rejected, lam, losses.astype(np.float64)


def _check(rejected, lam, losses, window):
    """No rejected step; the training loss, averaged over ``window`` steps (single full LM steps on
    small mini-batches fluctuate), ends at most 2x above the running minimum of that average."""
    assert not rejected.any(), f"{rejected.sum()} rejected steps (first at {np.argmax(rejected)})"
    assert np.all(np.isfinite(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    assert smooth[-1] <= 2.0 * smooth.min(), (smooth[-1], smooth.min(), lam.min())
    assert smooth[-1] < 0.8 * losses[0]  # it trained (losses[0]: after the first step)


@pytest.mark.parametrize("task, c", [("regression", 1), ("classification", 4)])
def test_short_float32_run_with_defaults(task, c):
    """The same path (row-space solve: D = 353 or 404 > b·r) with a 3-16-16-c model, 200 steps."""
    _check(*_run(task, [3, 16, 16, c], steps=200, n=512), window=20)


@pytest.mark.slow
@pytest.mark.parametrize("task, c", [("regression", 1), ("classification", 10)])
def test_3000_step_float32_run_with_defaults(task, c):
    _check(*_run(task, [8, 32, 32, c], steps=3000), window=50)
