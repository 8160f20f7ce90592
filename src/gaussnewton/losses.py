r"""Losses with closed-form output derivatives (METHODS.md section 1).

Every loss acts on model outputs ``f`` of shape ``(b, c)`` and labels ``y`` and provides, per example,

* ``value``: :math:`l(f_i, y_i)` (shape ``(b,)``; the training loss is their MEAN),
* ``grad``: :math:`g_i = \partial l / \partial f_i` (shape ``(b, c)``),
* ``hessian``: :math:`Q_i = \partial^2 l / \partial f_i^2` (shape ``(b, c, c)``, PSD),
* ``factor``: :math:`S_i` with :math:`Q_i = S_i S_i^\top` (shape ``(b, c, r)``),
* ``sample_factor``: a Monte-Carlo factor :math:`\hat S_i` (shape ``(b, c, m)``) with
  :math:`\mathbb{E}[\hat S_i \hat S_i^\top] = Q_i` (the sampled Fisher / Gauss-Newton-Bartlett curvature).

| loss | l(f, y) | g | Q | S |
|---|---|---|---|---|
| squared error | ½‖f − y‖² | f − y | I | I |
| softmax CE | logsumexp(f) − ⟨y, f⟩ | p − y | diag(p) − ppᵀ | diag(√p) − p√pᵀ |
| sigmoid BCE (c = 1) | softplus(f) − y f | σ(f) − y | σ(1−σ) | √(σ(1−σ)) |
| :class:`ConvexLoss` | user function | autodiff | autodiff | eigh, negative eigenvalues clipped |

Example:
    >>> import jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> loss = gn.get_loss("softmax_cross_entropy")
    >>> f = jnp.zeros((2, 3)); y = jnp.array([0, 2])
    >>> loss.value(f, loss.prepare_labels(f, y)).shape
    (2,)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "Loss",
    "SquaredError",
    "SoftmaxCrossEntropy",
    "SigmoidBinaryCrossEntropy",
    "ConvexLoss",
    "get_loss",
    "LOSSES",
]


class Loss:
    """Base class of per-example losses of model outputs ``f`` (``(b, c)``) and labels.

    Subclasses implement :meth:`value`, :meth:`grad`, :meth:`hessian` and :meth:`factor`; they may
    override :meth:`sample_factor`. ``identity_curvature`` is True when ``Q_i = I`` for every example
    (squared error), which lets EGN solve ``(K + bλI) u = g`` by one Cholesky.
    """

    name: str = "loss"
    identity_curvature: bool = False
    supports_sampling: bool = False

    def prepare_labels(self, f: Array, y: Array) -> Array:
        """Check shapes against the outputs ``f`` (at trace time) and return labels in canonical form."""
        return y

    def value(self, f: Array, y: Array) -> Array:
        raise NotImplementedError

    def grad(self, f: Array, y: Array) -> Array:
        raise NotImplementedError

    def hessian(self, f: Array, y: Array) -> Array:
        s = self.factor(f, y)
        return jnp.einsum("bcr,bdr->bcd", s, s)

    def factor(self, f: Array, y: Array) -> Array:
        raise NotImplementedError

    def sample_factor(self, f: Array, y: Array, key: Array, num_samples: int) -> Array:
        raise ValueError(
            f"curvature='sampled' is not available for loss {self.name!r}; use curvature='exact'."
        )


def _check_same_shape(name: str, f: Array, y: Array) -> Array:
    if y.shape == f.shape:
        return y
    if f.ndim == 2 and f.shape[1] == 1 and y.shape == f.shape[:1]:
        return y[:, None]
    raise ValueError(
        f"loss {name!r}: labels y of shape {tuple(y.shape)} do not match model outputs of shape "
        f"{tuple(f.shape)}; pass y with shape {tuple(f.shape)} (or ({f.shape[0]},) for one output)."
    )


@dataclasses.dataclass(frozen=True)
class SquaredError(Loss):
    r"""``l(f, y) = ½‖f − y‖²``; ``g = f − y``, ``Q = I``."""

    name: str = "squared_error"
    identity_curvature: bool = True
    supports_sampling: bool = True

    def prepare_labels(self, f, y):
        return _check_same_shape(self.name, f, jnp.asarray(y)).astype(f.dtype)

    def value(self, f, y):
        return 0.5 * jnp.sum(jnp.square(f - y), axis=-1)

    def grad(self, f, y):
        return f - y

    def hessian(self, f, y):
        b, c = f.shape
        return jnp.broadcast_to(jnp.eye(c, dtype=f.dtype), (b, c, c))

    def factor(self, f, y):
        return self.hessian(f, y)

    def sample_factor(self, f, y, key, num_samples):
        # y_hat ~ N(f, I): S = (y_hat − f)/√m has E[S Sᵀ] = I.
        eps = jax.random.normal(key, f.shape + (num_samples,), f.dtype)
        return eps / jnp.sqrt(jnp.asarray(num_samples, f.dtype))


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
    r"""``l(f, y) = logsumexp(f) − ⟨y, f⟩`` for integer labels (``(b,)``) or one-hot / probability rows (``(b, c)``, rows summing to 1).

    ``g = p − y``, ``Q = diag(p) − p pᵀ`` with ``p = softmax(f)``. ``Q`` has rank ``c − 1``
    (``Q 1 = 0``), and the factor has ``c − 1`` columns, so the row space of EGN is ``b(c − 1)``:

    * ``S₀ = diag(√p) − p √pᵀ`` is a square factor (``S₀ S₀ᵀ = diag(p) − 2ppᵀ + p(√p·√p)pᵀ = Q``
      because ``Σ p = 1``) with ``S₀ √p = 0``;
    * the Householder reflection ``H = I − v vᵀ/(1 + √p_c)``, ``v = √p + e_c``, maps ``√p`` to
      ``−e_c`` (``‖v‖² = 2(1 + √p_c) ≥ 2``: no cancellation), so ``H e_c = −√p`` and
      ``S = (S₀ H)[:, :c−1]`` has ``S Sᵀ = S₀ (I − √p √pᵀ) S₀ᵀ = Q``. With ``S₀ v = S₀ e_c``:
      ``S[:, j] = √p_j (e_j − p − √p_c (e_c − p)/(1 + √p_c))``.

    For ``c = 1`` (a degenerate softmax, ``Q = 0``) the factor is the ``1 × 1`` zero.
    """

    name: str = "softmax_cross_entropy"
    supports_sampling: bool = True

    def prepare_labels(self, f, y):
        y = jnp.asarray(y)
        b, c = f.shape
        if y.shape == (b,):
            if not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(
                    f"loss {self.name!r}: labels of shape ({b},) must be integer class indices, got "
                    f"dtype {y.dtype}; pass int labels or one-hot rows of shape ({b}, {c})."
                )
            return jax.nn.one_hot(y, c, dtype=f.dtype)
        if y.shape == (b, c):
            return y.astype(f.dtype)
        raise ValueError(
            f"loss {self.name!r}: labels y of shape {tuple(y.shape)} do not fit outputs of shape "
            f"{(b, c)}; pass integer labels of shape ({b},) or one-hot rows of shape ({b}, {c})."
        )

    def value(self, f, y):
        return jax.nn.logsumexp(f, axis=-1) - jnp.sum(y * f, axis=-1)

    def grad(self, f, y):
        return jax.nn.softmax(f, axis=-1) - y

    def hessian(self, f, y):
        p = jax.nn.softmax(f, axis=-1)
        return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]

    def factor(self, f, y):
        b, c = f.shape
        p = jax.nn.softmax(f, axis=-1)
        if c == 1:
            return jnp.zeros((b, 1, 1), f.dtype)
        sp = jnp.sqrt(p)
        e = jnp.eye(c, dtype=f.dtype)
        last = (e[-1] - p) * (sp[:, -1:] / (1 + sp[:, -1:]))  # √p_c (e_c − p)/(1 + √p_c), (b, c)
        cols = e[None, :, : c - 1] - (p + last)[:, :, None]  # (b, c, c−1): e_j − p − last
        return cols * sp[:, None, : c - 1]

    def sample_factor(self, f, y, key, num_samples):
        # y_hat ~ Categorical(p): S = [p − e_ŷ1, ..., p − e_ŷm]/√m, E[(p − e)(p − e)ᵀ] = diag(p) − ppᵀ.
        b, c = f.shape
        labels = jax.random.categorical(key, f, axis=-1, shape=(num_samples, b))  # (m, b)
        p = jax.nn.softmax(f, axis=-1)
        e = jax.nn.one_hot(labels, c, dtype=f.dtype)  # (m, b, c)
        s = p[None] - e
        return jnp.transpose(s, (1, 2, 0)) / jnp.sqrt(jnp.asarray(num_samples, f.dtype))


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(Loss):
    r"""``l(f, y) = softplus(f) − y f`` for one logit (``c = 1``), ``y ∈ [0, 1]``.

    ``g = σ(f) − y``, ``Q = σ(1 − σ)``, ``S = √(σ(1 − σ))``.
    """

    name: str = "sigmoid_binary_cross_entropy"
    supports_sampling: bool = True

    def prepare_labels(self, f, y):
        if f.shape[1] != 1:
            raise ValueError(
                f"loss {self.name!r} needs one output per example (c = 1), but the model returns "
                f"c = {f.shape[1]}; use 'softmax_cross_entropy' for {f.shape[1]} classes."
            )
        return _check_same_shape(self.name, f, jnp.asarray(y)).astype(f.dtype)

    def value(self, f, y):
        return jnp.sum(jax.nn.softplus(f) - y * f, axis=-1)

    def grad(self, f, y):
        return jax.nn.sigmoid(f) - y

    def hessian(self, f, y):
        s = jax.nn.sigmoid(f)
        return (s * (1 - s))[:, :, None]

    def factor(self, f, y):
        # σ(1−σ) = σ(f) σ(−f): computed from both sides to avoid 1 − σ rounding to 0.
        return jnp.sqrt(jax.nn.sigmoid(f) * jax.nn.sigmoid(-f))[:, :, None]

    def sample_factor(self, f, y, key, num_samples):
        s = jax.nn.sigmoid(f)  # (b, 1)
        yhat = jax.random.bernoulli(key, s[..., None], s.shape + (num_samples,)).astype(f.dtype)
        return (s[..., None] - yhat) / jnp.sqrt(jnp.asarray(num_samples, f.dtype))


@dataclasses.dataclass(frozen=True)
class ConvexLoss(Loss):
    r"""A user-supplied per-example convex loss ``fn(f_i, y_i) -> scalar`` (``f_i`` a ``c``-vector).

    ``g`` and ``Q`` come from autodiff (``vmap(grad)``, ``vmap(hessian)``); the factor is
    ``S = V diag(√max(w, 0))`` from the eigendecomposition ``Q = V diag(w) Vᵀ`` (negative eigenvalues,
    which a convex loss only has through rounding, are clipped to 0).

    Example:
        >>> import jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> huber = gn.ConvexLoss(lambda f, y: jnp.sum(jnp.sqrt(1 + (f - y) ** 2) - 1), name="pseudo_huber")
    """

    fn: Callable[[Array, Array], Array] = None  # type: ignore[assignment]
    name: str = "convex_loss"

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"ConvexLoss(fn=...) needs a callable fn(f_i, y_i) -> scalar, got {self.fn!r}."
            )

    def prepare_labels(self, f, y):
        y = jnp.asarray(y)
        if y.ndim == 0 or y.shape[0] != f.shape[0]:
            raise ValueError(
                f"loss {self.name!r}: labels y of shape {tuple(y.shape)} need a leading batch axis of "
                f"size {f.shape[0]} (the model's batch)."
            )
        return y

    def value(self, f, y):
        return jax.vmap(self.fn)(f, y)

    def grad(self, f, y):
        return jax.vmap(jax.grad(self.fn))(f, y)

    def hessian(self, f, y):
        return jax.vmap(jax.hessian(self.fn))(f, y)

    def factor(self, f, y):
        q = self.hessian(f, y)
        q = 0.5 * (q + jnp.swapaxes(q, -1, -2))
        w, v = jnp.linalg.eigh(q)
        return v * jnp.sqrt(jnp.maximum(w, 0.0))[:, None, :]


LOSSES: dict[str, Loss] = {
    "squared_error": SquaredError(),
    "softmax_cross_entropy": SoftmaxCrossEntropy(),
    "sigmoid_binary_cross_entropy": SigmoidBinaryCrossEntropy(),
}

LossLike = Loss | Literal["squared_error", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


def get_loss(loss: LossLike) -> Loss:
    """Return the :class:`Loss` for a name in :data:`LOSSES` or a :class:`Loss` instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(
        f"loss={loss!r} is not a known loss; use one of {sorted(LOSSES)} or gn.ConvexLoss(fn)."
    )
