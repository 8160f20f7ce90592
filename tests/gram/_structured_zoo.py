"""Tiny models for the structured-Gram tests: ``name -> (model_fn, params, x1, x2)``.

Every ``model_fn(params, x) -> (n, k)``; shapes are kept tiny (widths 2-6, n <= 4) so that the
dense float64 reference (per-example ``jacrev``) stays cheap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normal(key, shape, scale=0.7):
    return scale * jax.random.normal(key, shape, dtype=jnp.float64)


def _keys(seed, n=12):
    return list(jax.random.split(jax.random.PRNGKey(seed), n))


def _mlp(act1, act2):
    def f(p, x):
        h = act1(x @ p["w1"] + p["b1"])
        h = act2(h @ p["w2"] + p["b2"])
        return h @ p["w3"] + p["b3"]

    return f


def _mlp_params(ks, sizes):
    p = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        p[f"w{i}"] = _normal(ks[2 * i], (a, b))
        p[f"b{i}"] = _normal(ks[2 * i + 1], (b,), 0.1)
    return p


def mlp(act1=jnp.tanh, act2=jnp.tanh, k=2, n1=4, n2=3, seed=0):
    ks = _keys(seed)
    p = _mlp_params(ks, (3, 5, 4, k))
    return _mlp(act1, act2), p, _normal(ks[0], (n1, 3), 1.0), _normal(ks[1], (n2, 3), 1.0)


def cnn():
    ks = _keys(1)

    def f(p, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn)
        h = jax.nn.relu(h + p["c1"])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "VALID", dimension_numbers=dn)
        h = jnp.tanh(h)
        h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "VALID") / 4
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

    p = {
        "k1": _normal(ks[2], (3, 3, 2, 3)),
        "c1": _normal(ks[3], (3,), 0.1),
        "k2": _normal(ks[4], (2, 2, 3, 2)),
        "w": _normal(ks[5], (2, 2)),
        "b": _normal(ks[6], (2,), 0.1),
    }
    return f, p, _normal(ks[0], (3, 6, 6, 2), 1.0), _normal(ks[1], (2, 6, 6, 2), 1.0)


def conv_nchw_strided():
    """NCHW/OIHW conv: strides (2, 1), asymmetric explicit padding, kernel dilation, bias."""
    ks = _keys(15)

    def f(p, x):  # x: (n, 2, 6, 5)
        h = jax.lax.conv_general_dilated(
            x,
            p["k"],
            window_strides=(2, 1),
            padding=((1, 0), (2, 1)),
            rhs_dilation=(2, 1),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )  # (n, 3, 3, 6)
        h = jnp.tanh(h + p["c"][None, :, None, None])
        return h.reshape(h.shape[0], -1) @ p["w"]

    p = {
        "k": _normal(ks[2], (3, 2, 2, 3)),
        "c": _normal(ks[3], (3,), 0.1),
        "w": _normal(ks[4], (54, 2), 0.3),
    }
    return f, p, _normal(ks[0], (3, 2, 6, 5), 1.0), _normal(ks[1], (2, 2, 6, 5), 1.0)


def conv1d_lhs_dilated():
    """1-D convs over a sequence (NWC/WIO): input (lhs) dilation, then a transposed conv."""
    ks = _keys(16)

    def f(p, x):  # x: (n, 5, 2)
        dn = ("NWC", "WIO", "NWC")
        h = jax.lax.conv_general_dilated(
            x, p["k1"], (1,), ((1, 1),), lhs_dilation=(2,), dimension_numbers=dn
        )  # (n, 9, 3)
        h = jnp.tanh(h + p["c1"])
        # flipped, I/O-swapped kernel (rev + transpose views) with lhs dilation 2
        h = jax.lax.conv_transpose(
            h, p["k2"], (2,), "SAME", dimension_numbers=dn, transpose_kernel=True
        )
        return jnp.tanh(h).mean(1) @ p["w"]

    p = {
        "k1": _normal(ks[2], (3, 2, 3)),
        "c1": _normal(ks[3], (3,), 0.1),
        "k2": _normal(ks[4], (2, 2, 3)),  # WIO of the forward conv: transposed here
        "w": _normal(ks[5], (2, 2)),
    }
    return f, p, _normal(ks[0], (4, 5, 2), 1.0), _normal(ks[1], (2, 5, 2), 1.0)


def conv3d_shared_kernel():
    """One 3-D kernel used by two convs (two layouts) and a dense layer: merged, cross terms."""
    ks = _keys(17)

    def f(p, x):  # x: (n, 3, 3, 3, 2)
        W = p["W"]  # DHWIO (2, 2, 2, 2, 2)
        h = jax.lax.conv_general_dilated(
            x, W, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )  # (n, 3, 3, 3, 2)
        h = jnp.tanh(h)
        h = jax.lax.conv_general_dilated(
            h,
            jnp.transpose(W, (4, 3, 0, 1, 2)),
            (2, 2, 2),
            "SAME",
            dimension_numbers=("NDHWC", "OIDHW", "NCDHW"),
        )  # (n, 2, 2, 2, 2)
        # the same kernel as a dense layer on a flattened (input feature, D, H, W) patch
        patch = jnp.transpose(x[:, :2, :2, :2, :], (0, 4, 1, 2, 3)).reshape(x.shape[0], 16)
        d = jnp.tanh(patch @ jnp.transpose(W, (3, 0, 1, 2, 4)).reshape(16, 2))
        return jnp.sin(h).reshape(h.shape[0], -1) @ p["w"] + d

    p = {"W": _normal(ks[2], (2, 2, 2, 2, 2)), "w": _normal(ks[3], (16, 2), 0.4)}
    return f, p, _normal(ks[0], (3, 3, 3, 3, 2), 1.0), _normal(ks[1], (2, 3, 3, 3, 2), 1.0)


def grouped_conv():
    """``feature_group_count=2`` (depthwise): per-example gradients of that kernel."""
    ks = _keys(18)

    def f(p, x):  # x: (n, 4, 4, 2)
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(
            x, p["g"], (1, 1), "VALID", dimension_numbers=dn, feature_group_count=2
        )  # (n, 3, 3, 2)
        h = jax.nn.softplus(h + p["c"])
        h = jax.lax.conv_general_dilated(h, p["k"], (2, 2), "SAME", dimension_numbers=dn)
        return jnp.tanh(h).mean((1, 2)) @ p["w"]

    p = {
        "g": _normal(ks[2], (2, 2, 1, 2)),
        "c": _normal(ks[3], (2,), 0.1),
        "k": _normal(ks[4], (2, 2, 2, 3)),
        "w": _normal(ks[5], (3, 2)),
    }
    return f, p, _normal(ks[0], (3, 4, 4, 2), 1.0), _normal(ks[1], (2, 4, 4, 2), 1.0)


def _layer_norm(h, g, b, eps=1e-5):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + eps) * g + b


def layernorm_residual():
    ks = _keys(2)

    def f(p, x):
        h = x @ p["w1"]  # used twice: the bias b1 must NOT fold into w1's dense rule
        h = h + jnp.tanh(_layer_norm(h + p["b1"], p["g"], p["beta"]) @ p["w2"])
        return h @ p["w3"]

    p = {
        "w1": _normal(ks[2], (3, 4)),
        "b1": _normal(ks[7], (4,), 0.1),
        "g": 1.0 + _normal(ks[3], (4,), 0.1),
        "beta": _normal(ks[4], (4,), 0.1),
        "w2": _normal(ks[5], (4, 4)),
        "w3": _normal(ks[6], (4, 2)),
    }
    return f, p, _normal(ks[0], (4, 3), 1.0), None


def embedding():
    ks = _keys(3)

    def f(p, tokens):
        e = p["E"][tokens]  # (n, T, D)
        # a second lookup of the same table, FILL_OR_DROP mode, some ids out of range (7, 8)
        e2 = jnp.take(p["E"], tokens + 2, axis=0, mode="fill", fill_value=0.0)
        h = jnp.tanh((e + e2 * e) @ p["w"]).mean(1)
        return h @ p["o"]

    p = {"E": _normal(ks[2], (7, 3)), "w": _normal(ks[3], (3, 4)), "o": _normal(ks[4], (4, 2))}
    t1 = jax.random.randint(ks[0], (4, 3), 0, 7)
    t2 = jax.random.randint(ks[1], (2, 3), 0, 7)
    return f, p, t1, t2


def transformer():
    """One pre-LN block: multi-head attention (per-head weights with batch dims) + MLP."""
    ks = _keys(4, 16)
    D, H, Dh, F, T = 4, 2, 2, 6, 3

    def f(p, x):  # x: (n, T, D)
        h = _layer_norm(x, p["ln1_g"], p["ln1_b"])
        q = jnp.einsum("ntd,dhe->nthe", h, p["wq"])
        k = jnp.einsum("ntd,dhe->nthe", h, p["wk"])
        v = jnp.einsum("ntd,hde->nthe", h, p["wv"])  # different layout on purpose
        s = jnp.einsum("nthe,nshe->nhts", q, k) / jnp.sqrt(Dh)
        a = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("nhts,nshe->nthe", a, v)
        x = x + jnp.einsum("nthe,hed->ntd", o, p["wo"])
        h = _layer_norm(x, p["ln2_g"], p["ln2_b"])
        x = x + jax.nn.gelu(h @ p["m1"] + p["c1"]) @ p["m2"]
        return x.mean(1) @ p["head"]

    p = {
        "ln1_g": 1.0 + _normal(ks[2], (D,), 0.1),
        "ln1_b": _normal(ks[3], (D,), 0.1),
        "wq": _normal(ks[4], (D, H, Dh)),
        "wk": _normal(ks[5], (D, H, Dh)),
        "wv": _normal(ks[6], (H, D, Dh)),
        "wo": _normal(ks[7], (H, Dh, D)),
        "ln2_g": 1.0 + _normal(ks[8], (D,), 0.1),
        "ln2_b": _normal(ks[9], (D,), 0.1),
        "m1": _normal(ks[10], (D, F)),
        "c1": _normal(ks[11], (F,), 0.1),
        "m2": _normal(ks[12], (F, D)),
        "head": _normal(ks[13], (D, 2)),
    }
    return f, p, _normal(ks[0], (3, T, D), 1.0), _normal(ks[1], (2, T, D), 1.0)


def tied_weights():
    """Embedding table reused (transposed) as the output projection."""
    ks = _keys(5)

    def f(p, tokens):
        h = jnp.tanh(p["E"][tokens].sum(1) @ p["w"])
        return h @ p["E"].T

    p = {"E": _normal(ks[2], (4, 3)), "w": _normal(ks[3], (3, 3))}
    return f, p, jax.random.randint(ks[0], (3, 2), 0, 4), jax.random.randint(ks[1], (2, 2), 0, 4)


def two_branches():
    """``W`` in two branches with the same layout (merged factored form), ``V`` in two layouts."""
    ks = _keys(6)

    def f(p, x):
        a = jnp.tanh(x @ p["W"])
        b = jnp.sin((2.0 * x + 1.0) @ p["W"])
        h = a * b + jnp.tanh(a @ p["V"]) + jnp.tanh(b @ p["V"].T)
        return h @ p["o"]

    p = {"W": _normal(ks[2], (3, 3)), "V": _normal(ks[3], (3, 3)), "o": _normal(ks[4], (3, 2))}
    return f, p, _normal(ks[0], (4, 3), 1.0), _normal(ks[1], (3, 3), 1.0)


def many_positions():
    """A dense layer applied at 12 positions: the flop model picks per-example gradients."""
    ks = _keys(7)

    def f(p, x):  # x: (n, 12, 2)
        return jnp.tanh(x @ p["w"]).reshape(x.shape[0], -1) @ p["o"]

    p = {"w": _normal(ks[2], (2, 2)), "o": _normal(ks[3], (24, 3))}
    return f, p, _normal(ks[0], (4, 12, 2), 1.0), _normal(ks[1], (2, 12, 2), 1.0)


def scan_rnn():
    ks = _keys(8)

    def f(p, x):  # x: (n, T, 2)
        def cell(h, xt):
            h = jnp.tanh(h @ p["wh"] + xt @ p["wx"] + p["bh"])
            return h, None

        h, _ = jax.lax.scan(cell, jnp.zeros((x.shape[0], 3), x.dtype), jnp.swapaxes(x, 0, 1))
        return h @ p["wo"]

    p = {
        "wh": _normal(ks[2], (3, 3)),
        "wx": _normal(ks[3], (2, 3)),
        "bh": _normal(ks[4], (3,), 0.1),
        "wo": _normal(ks[5], (3, 2)),
    }
    return f, p, _normal(ks[0], (3, 4, 2), 1.0), _normal(ks[1], (2, 4, 2), 1.0)


@jax.custom_vjp
def _softsign(h):
    return h / (1.0 + jnp.abs(h))


def _softsign_fwd(h):
    return _softsign(h), h


def _softsign_bwd(h, ct):
    return (ct / (1.0 + jnp.abs(h)) ** 2,)


_softsign.defvjp(_softsign_fwd, _softsign_bwd)


@jax.custom_jvp
def _scaled_tanh(h, s):
    return jnp.tanh(h * s)


@_scaled_tanh.defjvp
def _scaled_tanh_jvp(primals, tangents):
    (h, s), (dh, ds) = primals, tangents
    y = jnp.tanh(h * s)
    return y, (1.0 - y**2) * (dh * s + h * ds)


def custom_derivatives():
    """custom_vjp activation (no parameter inside) and a parameter inside a custom_jvp call."""
    ks = _keys(14)

    def f(p, x):
        h = _softsign(x @ p["w1"] + p["b1"])
        h = _scaled_tanh(h, p["s"])  # s enters a custom_jvp call: fallback for s only
        return jax.nn.relu(h) @ p["w2"]

    p = {
        "w1": _normal(ks[2], (3, 4)),
        "b1": _normal(ks[3], (4,), 0.1),
        "s": 1.0 + _normal(ks[4], (4,), 0.1),
        "w2": _normal(ks[5], (4, 2)),
    }
    return f, p, _normal(ks[0], (4, 3), 1.0), _normal(ks[1], (2, 3), 1.0)


def unused_leaves():
    f0, p, x1, _ = mlp(seed=9)
    p = {"net": p, "extra": {"unused": jnp.ones((5, 2)), "step": jnp.array(3)}}
    return (lambda q, x: f0(q["net"], x)), p, x1, None


def batch_of_one():
    f, p, x1, _ = mlp(k=3, n1=1, seed=10)
    return f, p, x1, None


def flax_nnx():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 5, rngs=rngs)
            self.ln = nnx.LayerNorm(5, rngs=rngs)
            self.l2 = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.ln(self.l1(x))))

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state)

    def f(s, x):
        return nnx.merge(graphdef, s)(x)

    ks = _keys(11)
    return f, state, _normal(ks[0], (4, 3), 1.0), _normal(ks[1], (2, 3), 1.0)


def equinox_mlp():
    import equinox as eqx

    net = eqx.nn.MLP(3, 2, 4, 2, activation=jax.nn.softplus, key=jax.random.PRNGKey(12))
    params, static = eqx.partition(net, eqx.is_array)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)

    def f(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    ks = _keys(12)
    return f, params, _normal(ks[0], (3, 3), 1.0), _normal(ks[1], (2, 3), 1.0)


def projected_tuple_input():
    """``(x, S)`` input: the model output projected by a per-example ``S`` (c x m)."""
    f0, p, x1, x2 = mlp(k=4, seed=13)
    ks = _keys(13)

    def f(q, xs):
        x, S = xs
        return jnp.einsum("bc,bcm->bm", f0(q, x), S)

    S1, S2 = _normal(ks[5], (4, 4, 2), 1.0), _normal(ks[6], (3, 4, 2), 1.0)
    return f, p, (x1, S1), (x2, S2)


ZOO = {
    "mlp_tanh": lambda: mlp(),
    "mlp_relu_gelu_multi_output": lambda: mlp(jax.nn.relu, jax.nn.gelu, k=4, seed=3),
    "cnn_pooling": cnn,
    "conv_nchw_strided": conv_nchw_strided,
    "conv1d_lhs_dilated": conv1d_lhs_dilated,
    "conv3d_shared_kernel": conv3d_shared_kernel,
    "grouped_conv": grouped_conv,
    "layernorm_residual": layernorm_residual,
    "embedding": embedding,
    "transformer_block": transformer,
    "tied_weights": tied_weights,
    "two_branches": two_branches,
    "many_positions": many_positions,
    "scan_rnn": scan_rnn,
    "custom_derivatives": custom_derivatives,
    "unused_leaves": unused_leaves,
    "batch_of_one": batch_of_one,
    "flax_nnx": flax_nnx,
    "equinox_mlp": equinox_mlp,
    "projected_tuple_input": projected_tuple_input,
}
