"""Per-token outputs ``(b, T, c)`` through EGN (METHODS §1, per-token losses).

- Exact curvature: ``gn.egn_direction`` equals the dense float64 LM direction with the
  block-diagonal per-example curvature ``Q_i = blockdiag_t(s_it Q_it)`` (1e-8 relative; the
  systems are well conditioned at these λ, so float64 rounding stays near 1e-12), for squared
  error, softmax CE and sigmoid BCE, with and without a token mask (``WeightedLabels``).
- Sampled curvature: the direction is exact for the drawn factor (``m`` samples PER TOKEN, row
  space ``b·T·m``); the factor's unbiasedness per token is tested in ``test_losses_tokens.py``.
- A tiny character-level transformer language model trains with EGN (sampled curvature).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_jacobian, flat, rel_err

import gaussnewton as gn
from gaussnewton.losses import WeightedLabels

B, T, DIN, H = 4, 3, 2, 5


def seq_model(p, x):
    """(b, T, DIN) -> (b, T, c): per-position MLP plus a within-example mix over positions."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = h + jnp.mean(h, axis=1, keepdims=True) @ p["mix"]  # couples the tokens of one example
    return h @ p["w2"]


def _params(c, key):
    k = jax.random.split(key, 4)
    return {
        "w1": jax.random.normal(k[0], (DIN, H)),
        "b1": 0.1 * jax.random.normal(k[1], (H,)),
        "mix": 0.5 * jax.random.normal(k[2], (H, H)),
        "w2": jax.random.normal(k[3], (H, c)) / np.sqrt(H),
    }


def _labels(loss, c, key):
    if loss == "softmax_cross_entropy":
        return jax.random.randint(key, (B, T), 0, c)
    if loss == "sigmoid_binary_cross_entropy":
        return jax.random.bernoulli(key, 0.5, (B, T, 1)).astype(jnp.float64)
    return jax.random.normal(key, (B, T, c))


def _dense_direction(params, x, y, loss, lam, factor=None):
    """−(Σ_i J_iᵀ Q_i J_i / b + λI)⁻¹ ∇L with Q_i block-diagonal over tokens (numpy, float64)."""
    loss = gn.get_loss(loss)
    f = seq_model(params, x)
    yy = loss.prepare_labels(f, y)
    c = f.shape[-1]
    jac, _ = dense_jacobian(seq_model, params, x)
    jb = np.asarray(jac).reshape(B, T * c, -1)
    if factor is None:
        blocks = np.asarray(loss.hessian(f, yy))  # (b, T, c, c)
    else:
        s = np.asarray(factor)
        blocks = np.einsum("btcr,btdr->btcd", s, s)
    q = np.zeros((B, T * c, T * c))
    for t in range(T):
        q[:, t * c : (t + 1) * c, t * c : (t + 1) * c] = blocks[:, t]
    g = np.asarray(loss.grad(f, yy)).reshape(B, T * c)
    hmat = np.einsum("bkd,bkl,ble->de", jb, q, jb) / B
    grad = np.einsum("bkd,bk->d", jb, g) / B
    return -np.linalg.solve(hmat + lam * np.eye(hmat.shape[0]), grad)


CASES = [("squared_error", 2), ("softmax_cross_entropy", 4), ("sigmoid_binary_cross_entropy", 1)]


@pytest.mark.parametrize("loss, c", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_per_token_direction_matches_dense(loss, c, masked):
    params = _params(c, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, T, DIN))
    y = _labels(loss, c, jax.random.key(2))
    if masked:
        mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1]], jnp.float64)
        y = WeightedLabels(y, mask)
    # one compilation for both λ (eager op-by-op dispatch of the engine is the slow part)
    direction = jax.jit(lambda p, lam: gn.egn_direction(seq_model, p, x, y, loss=loss, damping=lam))
    for lam in (1e-4, 1e-1):
        d, info = direction(params, lam)
        ref = _dense_direction(params, x, y, loss, lam)
        assert rel_err(flat(d), ref) < 1e-8, (loss, masked, lam)
        assert float(info.directional_derivative) < 0


def test_per_token_sampled_direction_is_exact_for_its_factor():
    loss, c, m = "softmax_cross_entropy", 5, 2
    params = _params(c, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (B, T, DIN))
    y = _labels(loss, c, jax.random.key(5))
    key = jax.random.key(7)
    d, _ = jax.jit(
        lambda p: gn.egn_direction(
            seq_model,
            p,
            x,
            y,
            loss=loss,
            damping=1e-2,
            curvature="sampled",
            num_samples=m,
            key=key,
        )
    )(params)
    lobj = gn.get_loss(loss)
    f = seq_model(params, x)
    s = lobj.sample_factor(f, lobj.prepare_labels(f, y), key, m)
    assert s.shape == (B, T, c, m)  # row space b·T·m
    ref = _dense_direction(params, x, y, loss, 1e-2, factor=s)
    assert rel_err(flat(d), ref) < 1e-8


# ------------------------------------------------------------------ tiny character-level LM
TEXT = "the quick brown fox jumps over the lazy dog. " * 4
VOCAB = sorted(set(TEXT))
V, SEQ, D = len(VOCAB), 8, 16


def lm_init(key):
    k = jax.random.split(key, 7)
    n = lambda kk, shape, fan: jax.random.normal(kk, shape) / np.sqrt(fan)  # noqa: E731
    return {
        "embed": n(k[0], (V, D), 1.0) * 0.5,
        "pos": n(k[1], (SEQ, D), 1.0) * 0.1,
        "wq": n(k[2], (D, D), D),
        "wk": n(k[3], (D, D), D),
        "wv": n(k[4], (D, D), D),
        "wo": n(k[5], (D, D), D),
        "out": n(k[6], (D, V), D),
        "out_b": jnp.zeros(V),
    }


def lm(p, ids):
    """One causal self-attention block: (b, SEQ) int ids -> (b, SEQ, V) next-character logits."""
    h = p["embed"][ids] + p["pos"]
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    att = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
    causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
    att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
    h = h + jnp.einsum("bts,bsd->btd", att, v) @ p["wo"]
    return jnp.tanh(h) @ p["out"] + p["out_b"]


def _lm_batches(b):
    ids = np.array([VOCAB.index(ch) for ch in TEXT])
    starts = np.arange(0, len(ids) - SEQ - 1, 3)
    xs = np.stack([ids[s : s + SEQ] for s in starts])
    ys = np.stack([ids[s + 1 : s + SEQ + 1] for s in starts])
    return jnp.asarray(xs[:b]), jnp.asarray(ys[:b])


def test_tiny_transformer_lm_trains_with_sampled_egn():
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), lm_init(jax.random.key(0)))
    x, y = _lm_batches(16)
    opt = gn.egn(lm, loss="softmax_cross_entropy", curvature="sampled", damping=1e-2)
    state = opt.init(params, key=jax.random.key(1))
    step = jax.jit(opt.step)
    losses = []
    for _ in range(15):
        params, state, info = step(params, state, x, y)
        losses.append(float(info.loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses  # ln(V) ≈ 2.9 nats at the start
    assert step._cache_size() == 1
