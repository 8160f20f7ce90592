"""Small pure-JAX models of the experiments (protocol: docs/experiments.md), Flax-style initialised.

Parameters are plain pytrees (lists of ``{"w", "b"}`` dicts); weights LeCun-normal (truncated normal
with variance ``1 / fan_in``, as ``flax.linen.Dense`` / ``Conv``), biases zero. Every ``apply``
maps ``(params, x) -> (b, c)`` as the library's ``model_fn`` contract requires.

- regression MLP: Dense 32 -> ReLU -> 64 -> ReLU -> 32 -> ReLU -> 1;
- classification MLP: the same trunk -> c logits (inputs are flattened, so images work too);
- small CNN: Conv 16 3x3 -> ReLU -> maxpool 2 -> Conv 16 3x3 -> ReLU -> maxpool 2 -> Dense 32 ->
  ReLU -> c (NHWC images, SAME padding as Flax's default);
- tiny causal transformer LM: token + position embeddings (dim 32) -> one causal multi-head
  self-attention block with a residual -> tanh -> Dense V, per-token logits ``(b, T) -> (b, T, V)``
  (the one model whose outputs are per token).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "init_mlp",
    "mlp_apply",
    "init_cnn",
    "cnn_apply",
    "init_transformer",
    "transformer_apply",
    "make_model",
    "count_params",
]

_lecun = jax.nn.initializers.lecun_normal()
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def init_mlp(
    key: jax.Array, in_dim: int, out_dim: int, hidden: Sequence[int] = (32, 64, 32)
) -> list[dict[str, jax.Array]]:
    """Dense layers ``in_dim -> hidden... -> out_dim``; LeCun-normal weights, zero biases."""
    return _init_mlp_jit(key, int(in_dim), int(out_dim), tuple(int(h) for h in hidden))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_mlp_jit(key, in_dim, out_dim, hidden):
    dims = [int(in_dim), *map(int, hidden), int(out_dim)]
    keys = jax.random.split(key, len(dims) - 1)
    return [
        {"w": _lecun(k, (a, b), jnp.float32), "b": jnp.zeros((b,), jnp.float32)}
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
    ]


def mlp_apply(params: list[dict[str, jax.Array]], x: jax.Array, activation: str = "relu"):
    """``x`` (b, ...) is flattened to (b, n_in); returns (b, c)."""
    act = _ACTIVATIONS[activation]
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
        h = act(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _maxpool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, VALID (odd trailing rows / columns dropped).

    Written as a reshape + max rather than ``lax.reduce_window``: same values, and its gradient
    avoids XLA's ``select_and_scatter``, which is slow on CPU.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def init_cnn(
    key: jax.Array,
    image_shape: Sequence[int],
    out_dim: int,
    channels: Sequence[int] = (16, 16),
    dense: int = 32,
) -> dict[str, Any]:
    """Parameters of the small CNN for NHWC images of shape ``image_shape = (H, W, C)``."""
    return _init_cnn_jit(
        key, tuple(int(s) for s in image_shape), int(out_dim), tuple(map(int, channels)), int(dense)
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_cnn_jit(key, image_shape, out_dim, channels, dense):
    h, w, c = map(int, image_shape)
    keys = jax.random.split(key, len(channels) + 2)
    convs, c_in = [], c
    for k, c_out in zip(keys[: len(channels)], channels, strict=True):
        convs.append(
            {
                "w": _lecun(k, (3, 3, c_in, c_out), jnp.float32),
                "b": jnp.zeros((c_out,), jnp.float32),
            }
        )
        c_in = c_out
        h, w = h // 2, w // 2
    flat = h * w * c_in
    return {
        "conv": convs,
        "dense": [
            {
                "w": _lecun(keys[-2], (flat, dense), jnp.float32),
                "b": jnp.zeros((dense,), jnp.float32),
            },
            {
                "w": _lecun(keys[-1], (dense, out_dim), jnp.float32),
                "b": jnp.zeros((out_dim,), jnp.float32),
            },
        ],
    }


def cnn_apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
    """``x`` (b, H, W, C) -> logits (b, c)."""
    h = x.astype(params["conv"][0]["w"].dtype)
    for layer in params["conv"]:
        h = _maxpool2(jax.nn.relu(_conv(h, layer["w"]) + layer["b"]))
    h = h.reshape(h.shape[0], -1)
    d1, d2 = params["dense"]
    h = jax.nn.relu(h @ d1["w"] + d1["b"])
    return h @ d2["w"] + d2["b"]


def init_transformer(
    key: jax.Array, seq_len: int, vocab: int, dim: int = 32, heads: int = 2
) -> dict[str, Any]:
    """Parameters of :func:`transformer_apply`: ``embed`` (V, d) and ``pos`` (T, d) ~ N(0, 1/d)
    (so a token's input vector has unit-order norm), ``wq`` / ``wk`` / ``wv`` / ``wo`` (d, d) and
    ``out`` (d, V) LeCun-normal, ``out_b`` zero. ``heads`` must divide ``dim``."""
    if dim % heads:
        raise ValueError(f"heads={heads} must divide dim={dim}; e.g. heads=1 or heads=2.")
    return _init_transformer_jit(key, int(seq_len), int(vocab), int(dim))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_transformer_jit(key, seq_len, vocab, dim):
    k = jax.random.split(key, 7)
    emb = jax.nn.initializers.normal(1.0 / dim**0.5)
    return {
        "embed": emb(k[0], (vocab, dim), jnp.float32),
        "pos": emb(k[1], (seq_len, dim), jnp.float32),
        **{n: _lecun(kk, (dim, dim), jnp.float32) for n, kk in zip("qkvo", k[2:6], strict=True)},
        "out": _lecun(k[6], (dim, vocab), jnp.float32),
        "out_b": jnp.zeros((vocab,), jnp.float32),
    }


def transformer_apply(params: dict[str, Any], ids: jax.Array, heads: int = 2) -> jax.Array:
    """Causal one-block transformer: integer ids ``(b, T)`` -> next-token logits ``(b, T, V)``.

    With ``h_t = E[ids_t] + P_t`` and per head ``a`` (width ``d_h = d / heads``)
    ``A = softmax_s(q_t · k_s / sqrt(d_h), s <= t)``, the output is
    ``logits_t = tanh(h_t + concat_a(sum_s A_ts v_s) W_o) W_out + b_out``: position ``t`` sees
    ids ``<= t`` only, so ``logits_t`` predicts ``ids_{t+1}``.
    """
    ids = ids.astype(jnp.int32)
    b, t = ids.shape
    d = params["embed"].shape[1]
    dh = d // heads
    h = params["embed"][ids] + params["pos"][:t]

    def split(w):
        return (h @ w).reshape(b, t, heads, dh)

    q, k, v = split(params["q"]), split(params["k"]), split(params["v"])
    att = jnp.einsum("btad,bsad->bats", q, k) / jnp.sqrt(jnp.asarray(dh, h.dtype))
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, att, jnp.finfo(att.dtype).min), axis=-1)
    mixed = jnp.einsum("bats,bsad->btad", att, v).reshape(b, t, d)
    h = h + mixed @ params["o"]
    return jnp.tanh(h) @ params["out"] + params["out_b"]


def make_model(
    name: str,
    key: jax.Array,
    input_shape: Sequence[int],
    out_dim: int,
    *,
    hidden: Sequence[int] = (32, 64, 32),
    activation: str = "relu",
    heads: int = 2,
) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(model_fn, params)`` for ``name`` in {"mlp", "cnn", "transformer"}; ``input_shape``
    excludes the batch.

    ``"transformer"``: ``input_shape = (T,)`` integer ids, ``out_dim`` the vocabulary size V,
    outputs ``(b, T, V)`` (:func:`transformer_apply`, ``heads`` heads, width 32).

    Example::

        fn, p = make_model("transformer", jax.random.key(0), (32,), 34)
        fn(p, jnp.zeros((4, 32), jnp.int32)).shape  # (4, 32, 34)
    """
    if name == "mlp":
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
            )
        in_dim = 1
        for s in input_shape:
            in_dim *= int(s)
        params = init_mlp(key, in_dim, out_dim, hidden)

        def model_fn(p, x):
            return mlp_apply(p, x, activation)

        return model_fn, params
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs (H, W, C) images, got input shape {input_shape}.")
        return cnn_apply, init_cnn(key, input_shape, out_dim)
    if name == "transformer":
        if len(input_shape) != 1:
            raise ValueError(
                f"model 'transformer' needs (T,) token-id inputs, got input shape {input_shape}."
            )

        def lm_fn(p, ids):
            return transformer_apply(p, ids, heads)

        return lm_fn, init_transformer(key, int(input_shape[0]), out_dim, heads=heads)
    raise ValueError(f"model must be 'mlp', 'cnn' or 'transformer', got {name!r}.")


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
