r"""Token axes, per-token weights and the per-token factor algebra (docs/METHODS.md section 1).

Outputs ``f`` have shape ``(b, *tok, c)``: a batch axis, zero or more token axes (sequence
positions, pixels) and ``c`` outputs per token. With weights ``w`` (shape ``(b, *tok)``, ``≥ 0``)
the training loss is the weighted token mean, written per example as

.. math:: l_i = \sum_t s_{it}\, l(f_{it}, y_{it}), \qquad s_{it} = b\, w_{it} / \textstyle\sum_{j,u} w_{ju},

so that ``L = (1/b) Σ_i l_i``; without weights ``s_it = 1/T`` (``T`` tokens per example), and for
2-D outputs without weights ``s_i = 1`` (the plain per-example loss).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class WeightedLabels(NamedTuple):
    """Labels with per-token weights, passed to a loss in place of the labels ``y``.

    ``weights`` has the shape ``(b, *tok)`` of the outputs without their last axis (``(b,)`` for 2-D
    outputs), entries ``≥ 0``, not all zero. A weight of 0 masks a token out: it contributes
    nothing to the loss, gradient or curvature, and its label is ignored (not checked), so padding
    may carry any label (e.g. ``-100``). A pytree, so it passes through ``jax.jit``.

    Example:
        >>> import jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> f = jnp.zeros((2, 4, 3))                      # (b, T, c) logits
        >>> from gaussnewton.losses import WeightedLabels
        >>> y = WeightedLabels(jnp.zeros((2, 4), int), jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]]))
        >>> loss = gn.get_loss("softmax_cross_entropy")
        >>> loss.value(f, loss.prepare_labels(f, y)).shape
        (2,)
    """

    labels: Array
    weights: Array


def split_labels(y) -> tuple[Array, Array | None]:
    """``(labels, weights)`` of ``y``; ``weights`` is None unless ``y`` is :class:`WeightedLabels`.

    Example:
        >>> from gaussnewton.losses import WeightedLabels, split_labels
        >>> split_labels(WeightedLabels("y", "w")), split_labels("y")
        (('y', 'w'), ('y', None))
    """
    if isinstance(y, WeightedLabels):
        return y.labels, y.weights
    return y, None


def token_shape(f: Array) -> tuple[int, ...]:
    """The token axes ``tok`` of outputs ``f`` of shape ``(b, *tok, c)`` (``()`` for 2-D ``f``).

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.losses import token_shape
        >>> token_shape(jnp.zeros((8, 5, 7, 3))), token_shape(jnp.zeros((8, 3)))
        ((5, 7), ())
    """
    return tuple(f.shape[1:-1])


def num_tokens(f: Array) -> int:
    """``T = prod(tok)``, the number of tokens per example (1 for 2-D outputs).

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.losses import num_tokens
        >>> num_tokens(jnp.zeros((8, 5, 7, 3))), num_tokens(jnp.zeros((8, 3)))
        (35, 1)
    """
    return math.prod(token_shape(f))


def num_outputs(f: Array) -> int:
    """``T · c``, the number of outputs per example (the size of ``f_i`` flattened).

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.losses import num_outputs
        >>> num_outputs(jnp.zeros((8, 5, 7, 3)))
        105
    """
    return num_tokens(f) * f.shape[-1]


def project(s: Array, v: Array) -> Array:
    r"""Per-token ``S_itᵀ v_it``: ``(b, *tok, c, r), (b, *tok, c) -> (b, *tok, r)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.losses import project
        >>> project(jnp.ones((2, 4, 3, 2)), jnp.ones((2, 4, 3))).shape
        (2, 4, 2)
    """
    return jnp.einsum("...cr,...c->...r", s, v)


def expand(s: Array, w: Array) -> Array:
    r"""Per-token ``S_it w_it``: ``(b, *tok, c, r), (b, *tok, r) -> (b, *tok, c)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.losses import expand
        >>> expand(jnp.ones((2, 4, 3, 2)), jnp.ones((2, 4, 2))).shape
        (2, 4, 3)
    """
    return jnp.einsum("...cr,...r->...c", s, w)


def token_scale(f: Array, weights: Array | None) -> Array | float | None:
    """``s_it`` of the module docstring: None when it is 1 (2-D, unweighted), else ``1/T`` or
    ``b w / Σw`` (shape ``(b, *tok)``)."""
    if weights is None:
        return None if f.ndim == 2 else 1.0 / num_tokens(f)
    return f.shape[0] * weights / jnp.sum(weights)


def reduce_tokens(l_tok: Array, f: Array, weights: Array | None) -> Array:
    """Per-example ``l_i = Σ_t s_it l_it`` from per-token values ``(b, *tok) -> (b,)``."""
    axes = tuple(range(1, f.ndim - 1))
    if weights is None:
        return l_tok if not axes else jnp.mean(l_tok, axis=axes)
    s = token_scale(f, weights)
    return jnp.sum(jnp.where(weights != 0, s * l_tok, 0), axis=axes)


def scale_tokens(x: Array, f: Array, weights: Array | None, power: float, trailing: int) -> Array:
    """``s_it^power · x_it`` for per-token blocks ``x`` of shape ``(b, *tok, *block)``.

    ``trailing`` is the number of block axes; tokens with weight 0 give exact zeros (whatever
    ``x`` holds there).
    """
    s = token_scale(f, weights)
    if s is None:
        return x
    if weights is None:
        return x * (s**power)
    pad = (...,) + (None,) * trailing
    return jnp.where((weights != 0)[pad], x * (s**power)[pad], 0)
