"""Small pure-JAX models of the experiments (protocol: docs/experiments.md), Flax-style initialised.

Parameters are plain pytrees (lists of ``{"w", "b"}`` dicts); weights LeCun-normal (truncated normal
with variance ``1 / fan_in``, as ``flax.linen.Dense`` / ``Conv``), biases zero. Every ``apply``
maps ``(params, x) -> (b, c)`` as the library's ``model_fn`` contract requires.

- regression MLP: Dense 32 -> ReLU -> 64 -> ReLU -> 32 -> ReLU -> 1;
- classification MLP: the same trunk -> c logits (inputs are flattened, so images work too);
- small CNN: Conv 16 3x3 -> ReLU -> maxpool 2 -> Conv 16 3x3 -> ReLU -> maxpool 2 -> Dense 32 ->
  ReLU -> c (NHWC images, SAME padding as Flax's default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["init_mlp", "mlp_apply", "init_cnn", "cnn_apply", "make_model", "count_params"]

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


def make_model(
    name: str,
    key: jax.Array,
    input_shape: Sequence[int],
    out_dim: int,
    *,
    hidden: Sequence[int] = (32, 64, 32),
    activation: str = "relu",
) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(model_fn, params)`` for ``name`` in {"mlp", "cnn"}; ``input_shape`` excludes the batch."""
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
    raise ValueError(f"model must be 'mlp' or 'cnn', got {name!r}.")


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
