r"""The built-in losses and :class:`ConvexLoss` (per-token closed forms, docs/METHODS.md section 1)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from gaussnewton.losses._base import Loss

Array = jax.Array


def row_tolerance(label_dtype, out_dtype, c: int) -> float:
    """Tolerance of the checks ``entries ≥ −tol`` and ``|Σ_k y_k − 1| ≤ tol`` on probability rows.

    ``tol = max(√ε, 4 c ε)`` with ``ε`` the machine epsilon of the coarser of the label and output
    dtypes (integer labels: the output dtype): ``√ε`` (1.5e-8 in float64, 3.5e-4 in float32)
    admits rows normalised in that precision, and ``4 c ε`` bounds the rounding of a ``c``-term sum.

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.losses import row_tolerance
        >>> f"{row_tolerance(jnp.float32, jnp.float64, 10):.1e}"
        '3.5e-04'
    """
    eps = float(jnp.finfo(out_dtype).eps)
    if jnp.issubdtype(label_dtype, jnp.floating):
        eps = max(eps, float(jnp.finfo(label_dtype).eps))
    return max(math.sqrt(eps), 4 * c * eps)


def _same_shape(name: str, f: Array, y: Array) -> Array:
    if y.shape == f.shape:
        return y
    if f.shape[-1] == 1 and y.shape == f.shape[:-1]:
        return y[..., None]
    raise ValueError(
        f"loss {name!r}: labels y of shape {tuple(y.shape)} do not match model outputs of shape "
        f"{tuple(f.shape)}; pass y with shape {tuple(f.shape)} (or {tuple(f.shape[:-1])} for one "
        f"output)."
    )


def _finite_rows(y, xp):
    return xp.all(xp.isfinite(y), axis=-1)


@dataclasses.dataclass(frozen=True)
class SquaredError(Loss):
    r"""``l(f, y) = ½‖f − y‖²`` per token; ``g = f − y``, ``Q = I``, ``S = I``.

    Note the ½: this is optax's ``l2_loss``, NOT optax's ``squared_error`` (which is ``(f − y)²``,
    twice this loss, with twice the gradient and curvature). Available as ``"squared_error"`` and
    ``"half_squared_error"``. Labels have the outputs' shape ``(b, *tok, c)`` (or ``(b, *tok)`` for
    ``c = 1``) and must be finite.

    Example:
        >>> import jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> loss = gn.get_loss("half_squared_error")
        >>> f = jnp.ones((2, 1))
        >>> loss.value(f, loss.prepare_labels(f, jnp.zeros(2))).tolist()
        [0.5, 0.5]
    """

    name: str = "squared_error"
    identity_curvature: bool = True
    supports_sampling: bool = True

    def _check_shape(self, f, y):
        return _same_shape(self.name, f, y)

    def _label_problems(self, f, y, xp):
        return [(_finite_rows(y, xp), "must be finite (no NaN or inf)")]

    def _canonical(self, f, y):
        return y.astype(f.dtype)

    def token_value(self, f, y):
        return 0.5 * jnp.sum(jnp.square(f - y), axis=-1)

    def token_grad(self, f, y):
        return f - y

    def token_hessian(self, f, y):
        c = f.shape[-1]
        return jnp.broadcast_to(jnp.eye(c, dtype=f.dtype), f.shape + (c,))

    def token_factor(self, f, y):
        return self.token_hessian(f, y)

    def token_range_coefficients(self, f, y):
        return f - y, jnp.ones(f.shape[:-1], bool)  # S = I: t = g

    def token_sample_factor(self, f, y, key, num_samples):
        # y_hat ~ N(f, I): S = (y_hat − f)/√m has E[S Sᵀ] = I.
        eps = jax.random.normal(key, f.shape + (num_samples,), f.dtype)
        return eps / jnp.sqrt(jnp.asarray(num_samples, f.dtype))


def _softmax_pivot(f):
    """``p``, ``√p``, the pivot ``e_k`` (bool, ``k = argmax p`` per token), ``√p_k`` (kept axis)
    and the ``c − 1`` kept classes ``j ≠ k`` in order (int, ``(..., c − 1)``) of the softmax factor."""
    c = f.shape[-1]
    p = jax.nn.softmax(f, axis=-1)
    sp = jnp.sqrt(p)
    k = jnp.argmax(f, axis=-1)[..., None]
    ek = jnp.arange(c) == k
    spk = jnp.take_along_axis(sp, k, axis=-1)
    m = jnp.arange(c - 1)
    keep = m + (m >= k)
    return p, sp, ek, spk, keep


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
    r"""``l(f, y) = logsumexp(f) − ⟨y, f⟩`` per token, for integer labels (``(b, *tok)``, in ``[0, c)``) or one-hot / probability rows (``(b, *tok, c)``, entries ``≥ 0`` summing to 1 within :func:`row_tolerance`).

    ``g = p − y``, ``Q = diag(p) − p pᵀ`` with ``p = softmax(f)``. ``Q`` has rank ``c − 1``
    (``Q 1 = 0``), and the factor has ``c − 1`` columns, so the row space of EGN is ``b(c − 1)``:

    * ``S₀ = diag(√p) − p √pᵀ`` is a square factor (``S₀ S₀ᵀ = diag(p) − 2ppᵀ + p(√p·√p)pᵀ = Q``
      because ``Σ p = 1``) with ``S₀ √p = 0``;
    * the Householder reflection ``H = I − v vᵀ/(1 + √p_k)``, ``v = √p + e_k``, maps ``√p`` to
      ``−e_k`` (``‖v‖² = 2(1 + √p_k) ≥ 2``: no cancellation), so ``H e_k = −√p`` and ``S``, the
      columns ``j ≠ k`` of ``S₀ H``, has ``S Sᵀ = S₀ (I − √p √pᵀ) S₀ᵀ = Q``. With
      ``S₀ v = S₀ e_k``: ``S[:, j] = √p_j (e_j − p − √p_k (e_k − p)/(1 + √p_k))``, ``j ≠ k``.
    * the pivot ``k`` is the most probable class of each token (``p_k ≥ 1/c``). In floating point
      this matters: the dropped column is the one with the cancellation ``1 − p_k`` (a saturated
      token has ``p_k ≈ 1``), ``1 − p_k`` itself is formed as ``Σ_{i≠k} p_i``, and the range
      coefficients ``t`` of ``S t = g`` stay of the size of ``a = −y/√p`` (a fixed pivot ``c``
      with ``p_c ≈ 0`` gives ``t_j = √p_j/√p_c`` when ``y = e_c``, and ``S t`` then cancels
      terms ``1/√p_c`` times larger than ``g``: float32 directions off by 1e-2 … 0.5).

    For ``c = 1`` (a degenerate softmax, ``Q = 0``) the factor is the ``1 × 1`` zero. Under jit an
    out-of-range class index gives a NaN label row (NaN loss for that example), never a clamped
    or wrapped class.
    """

    name: str = "softmax_cross_entropy"
    supports_sampling: bool = True

    def _check_shape(self, f, y):
        lead, c = tuple(f.shape[:-1]), f.shape[-1]
        if tuple(y.shape) == lead:
            if not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(
                    f"loss {self.name!r}: labels of shape {lead} must be integer class indices, "
                    f"got dtype {y.dtype}; pass int labels or one-hot rows of shape {lead + (c,)}."
                )
            return y
        if tuple(y.shape) == tuple(f.shape):
            return y
        raise ValueError(
            f"loss {self.name!r}: labels y of shape {tuple(y.shape)} do not fit outputs of shape "
            f"{tuple(f.shape)}; pass integer labels of shape {lead} or one-hot rows of shape "
            f"{tuple(f.shape)}."
        )

    def _label_problems(self, f, y, xp):
        c = f.shape[-1]
        if y.ndim == f.ndim - 1:
            ok = (y >= 0) & (y < c)
            return [(ok, f"are class indices and must lie in [0, {c}) (c = {c} outputs)")]
        tol = row_tolerance(y.dtype, f.dtype, c)
        entries = xp.all(xp.isfinite(y) & (y >= -tol), axis=-1)
        total = xp.abs(xp.sum(y, axis=-1) - 1) <= tol
        return [
            (
                entries,
                f"are one-hot / probability rows and need finite entries >= 0 (tol {tol:.1e})",
            ),
            (total, f"are one-hot / probability rows and must sum to 1 (tol {tol:.1e})"),
        ]

    def _canonical(self, f, y):
        if y.ndim == f.ndim - 1:
            return jax.nn.one_hot(y, f.shape[-1], dtype=f.dtype)
        return y.astype(f.dtype)

    def token_value(self, f, y):
        return jax.nn.logsumexp(f, axis=-1) - jnp.sum(y * f, axis=-1)

    def token_grad(self, f, y):
        return jax.nn.softmax(f, axis=-1) - y

    def token_hessian(self, f, y):
        p = jax.nn.softmax(f, axis=-1)
        eye = jnp.eye(f.shape[-1], dtype=f.dtype)
        return p[..., :, None] * eye - p[..., :, None] * p[..., None, :]

    def token_factor(self, f, y):
        c = f.shape[-1]
        if c == 1:
            return jnp.zeros(f.shape + (1,), f.dtype)
        p, sp, ek, spk, keep = _softmax_pivot(f)
        # e_k − p with its k-th entry 1 − p_k = Σ_{i≠k} p_i (no cancellation when p_k ≈ 1)
        ek_p = jnp.where(ek, jnp.sum(jnp.where(ek, 0, p), axis=-1, keepdims=True), -p)
        last = ek_p * (spk / (1 + spk))  # √p_k (e_k − p)/(1 + √p_k)
        cols = jnp.eye(c, dtype=f.dtype) - (p + last)[..., :, None]  # (..., c, c): e_j − p − last
        cols = cols * sp[..., None, :]
        return jnp.take_along_axis(cols, keep[..., None, :], axis=-1)  # columns j ≠ k

    def token_range_coefficients(self, f, y):
        # With Σy = 1, a = −y/√p solves S₀ a = √p⊙a − p(√p·a) = p − y = g, and since S₀H has
        # the zero column k and H² = I, t = (H a) without entry k solves S t = g. Tokens whose
        # label has p ≤ tiny (underflow) are not in the floating-point range: Woodbury part.
        c = f.shape[-1]
        if c == 1:
            return jnp.zeros(f.shape, f.dtype), jnp.ones(f.shape[:-1], bool)
        p, sp, ek, spk, keep = _softmax_pivot(f)
        tiny = jnp.finfo(p.dtype).tiny
        ok = jnp.all((y == 0) | (p > tiny), axis=-1)
        a = jnp.where(y == 0, 0.0, -y / jnp.where(p > tiny, sp, 1.0))
        v = sp + ek
        ha = a - v * (jnp.sum(v * a, axis=-1, keepdims=True) / (1 + spk))
        return jnp.take_along_axis(ha, keep, axis=-1), ok

    def token_sample_factor(self, f, y, key, num_samples):
        # ŷ ~ Categorical(p) per token: S = [p − e_ŷ1, ..., p − e_ŷm]/√m, E[(p − e)(p − e)ᵀ] = Q.
        c = f.shape[-1]
        labels = jax.random.categorical(key, f, axis=-1, shape=(num_samples,) + f.shape[:-1])
        p = jax.nn.softmax(f, axis=-1)
        s = p[None] - jax.nn.one_hot(labels, c, dtype=f.dtype)  # (m, ..., c)
        return jnp.moveaxis(s, 0, -1) / jnp.sqrt(jnp.asarray(num_samples, f.dtype))


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(Loss):
    r"""``l(f, y) = softplus(f) − y f`` for one logit per token (``c = 1``), ``y ∈ [0, 1]``.

    ``g = σ(f) − y``, ``Q = σ(1 − σ)``, ``S = √(σ(1 − σ))``. Labels ``(b, *tok, 1)`` or ``(b, *tok)``.
    """

    name: str = "sigmoid_binary_cross_entropy"
    supports_sampling: bool = True

    def _check_shape(self, f, y):
        if f.shape[-1] != 1:
            raise ValueError(
                f"loss {self.name!r} needs one output per example (c = 1), but the model returns "
                f"c = {f.shape[-1]}; use 'softmax_cross_entropy' for {f.shape[-1]} classes."
            )
        return _same_shape(self.name, f, y)

    def _label_problems(self, f, y, xp):
        ok = xp.all((y >= 0) & (y <= 1), axis=-1)
        return [(ok, "are probabilities of the positive class and must lie in [0, 1]")]

    def _canonical(self, f, y):
        return y.astype(f.dtype)

    def token_value(self, f, y):
        return jnp.sum(jax.nn.softplus(f) - y * f, axis=-1)

    def token_grad(self, f, y):
        return jax.nn.sigmoid(f) - y

    def token_hessian(self, f, y):
        s = jax.nn.sigmoid(f)
        return (s * (1 - s))[..., None]

    def token_factor(self, f, y):
        # σ(1−σ) = σ(f) σ(−f): computed from both sides to avoid 1 − σ rounding to 0.
        return jnp.sqrt(jax.nn.sigmoid(f) * jax.nn.sigmoid(-f))[..., None]

    def token_range_coefficients(self, f, y):
        s = self.token_factor(f, y)[..., 0]  # (..., 1): √(σ(1−σ))
        ok = s[..., 0] >= jnp.sqrt(jnp.finfo(s.dtype).tiny)
        return (jax.nn.sigmoid(f) - y) / jnp.where(s > 0, s, 1.0), ok

    def token_sample_factor(self, f, y, key, num_samples):
        s = jax.nn.sigmoid(f)  # (..., 1)
        yhat = jax.random.bernoulli(key, s[..., None], s.shape + (num_samples,)).astype(f.dtype)
        return (s[..., None] - yhat) / jnp.sqrt(jnp.asarray(num_samples, f.dtype))


@dataclasses.dataclass(frozen=True)
class ConvexLoss(Loss):
    r"""A user-supplied convex loss ``fn(f_t, y_t) -> scalar`` of one token's ``c`` outputs.

    ``g`` and ``Q`` come from autodiff (``vmap(grad)``, ``vmap(hessian)`` over examples and
    tokens); the factor is ``S = V diag(√max(w, 0))`` from the eigendecomposition
    ``Q = V diag(w) Vᵀ`` (negative eigenvalues, which a convex loss only has through rounding, are
    clipped to 0). Labels need the leading axes ``(b, *tok)`` of the outputs; their values are not
    checked (only weights are).

    Example:
        >>> import jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> huber = gn.ConvexLoss(lambda f, y: jnp.sum(jnp.sqrt(1 + (f - y) ** 2) - 1), name="pseudo_huber")
    """

    fn: Callable[[Array, Array], Array] = None  # type: ignore[assignment]
    name: str = "convex_loss"
    checks_labels = False  # a class attribute, not a field: user labels may be anything

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"ConvexLoss(fn=...) needs a callable fn(f_i, y_i) -> scalar, got {self.fn!r}."
            )

    def _check_shape(self, f, y):
        lead = tuple(f.shape[:-1])
        if tuple(y.shape[: len(lead)]) != lead:
            raise ValueError(
                f"loss {self.name!r}: labels y of shape {tuple(y.shape)} need the leading axes "
                f"{lead} of the model outputs {tuple(f.shape)} (batch, then token axes)."
            )
        return y

    def _per_token(self, fun, f, y):
        lead, c = f.shape[:-1], f.shape[-1]
        out = jax.vmap(fun)(f.reshape(-1, c), y.reshape((-1,) + y.shape[len(lead) :]))
        return out.reshape(lead + out.shape[1:])

    def token_value(self, f, y):
        return self._per_token(self.fn, f, y)

    def token_grad(self, f, y):
        return self._per_token(jax.grad(self.fn), f, y)

    def token_hessian(self, f, y):
        return self._per_token(jax.hessian(self.fn), f, y)

    def token_factor(self, f, y):
        q = self.token_hessian(f, y)
        q = 0.5 * (q + jnp.swapaxes(q, -1, -2))
        w, v = jnp.linalg.eigh(q)
        return v * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]


LOSSES: dict[str, Loss] = {
    "squared_error": SquaredError(),
    "softmax_cross_entropy": SoftmaxCrossEntropy(),
    "sigmoid_binary_cross_entropy": SigmoidBinaryCrossEntropy(),
}

_ALIASES = {"half_squared_error": "squared_error"}

LossLike = (
    Loss
    | Literal[
        "squared_error",
        "half_squared_error",
        "softmax_cross_entropy",
        "sigmoid_binary_cross_entropy",
    ]
)


def get_loss(loss: LossLike) -> Loss:
    """Return the :class:`Loss` for a name in :data:`LOSSES` (or an alias) or a :class:`Loss`.

    ``"squared_error"`` (alias ``"half_squared_error"``) is ``½‖f − y‖²``; optax's
    ``squared_error`` is ``(f − y)²``, twice it.

    Example:
        >>> import gaussnewton as gn
        >>> gn.get_loss("half_squared_error") is gn.get_loss("squared_error")
        True
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        loss_name = _ALIASES.get(loss, loss)
        if loss_name in LOSSES:
            return LOSSES[loss_name]
    names = sorted([*LOSSES, *_ALIASES])
    raise ValueError(f"loss={loss!r} is not a known loss; use one of {names} or gn.ConvexLoss(fn).")
