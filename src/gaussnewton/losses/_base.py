r"""The :class:`Loss` base class: per-token closed forms lifted to per-example quantities.

A subclass defines the per-token loss on the last axis (``token_value``, ``token_grad``,
``token_hessian``, ``token_factor``, optionally ``token_sample_factor``) and its labels
(``_check_shape``, ``_label_problems``, ``_canonical``); the base class applies the token scale
``s_it`` of :mod:`gaussnewton.losses._tokens` and the label checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gaussnewton.losses._tokens import (
    WeightedLabels,
    reduce_tokens,
    scale_tokens,
    split_labels,
    token_scale,
)

Array = jax.Array

_MAX_SHOWN = 3  # offending labels quoted in an error message


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _pad_like(mask, x):
    """``mask`` of shape ``(b, *tok)`` broadcast against ``x`` of shape ``(b, *tok, ...)``."""
    return mask[(...,) + (None,) * (x.ndim - mask.ndim)]


def _describe(bad: np.ndarray, values: np.ndarray) -> str:
    idx = np.argwhere(bad)
    shown = ", ".join(
        f"{np.asarray(values[tuple(i)]).tolist()} at index {tuple(int(j) for j in i)}"
        for i in idx[:_MAX_SHOWN]
    )
    more = f" (and {len(idx) - _MAX_SHOWN} more)" if len(idx) > _MAX_SHOWN else ""
    return f"got {shown}{more}, {len(idx)} of {bad.size} tokens"


class Loss:
    """Base class of losses of model outputs ``f`` (``(b, c)`` or ``(b, *tok, c)``) and labels.

    Public methods take the canonical labels ``y = prepare_labels(f, y_raw)`` (a
    :class:`WeightedLabels` when weights were given) and return per-example quantities:
    ``value (b,)``, ``grad (b, *tok, c)``, ``hessian (b, *tok, c, c)`` (the per-token blocks of
    ``Q_i``), ``factor (b, *tok, c, r)``, ``sample_factor (b, *tok, c, m)``, all with the token
    scale ``s_it`` folded in (module docstring of :mod:`gaussnewton.losses`).

    Subclasses implement the per-token forms ``token_value (...,)``, ``token_grad (..., c)``,
    ``token_factor (..., c, r)`` (and may override ``token_hessian``, ``token_sample_factor``) on
    outputs ``(..., c)``. ``identity_curvature`` is True when every per-token ``Q_it = I``
    (squared error); see :meth:`identity_scale` for what that means for the whole ``Q_i``.
    """

    name: str = "loss"
    identity_curvature: bool = False
    supports_sampling: bool = False
    checks_labels: bool = True  # labels_valid also requires finite labels

    # ----- labels ---------------------------------------------------------------------------

    def _check_shape(self, f: Array, y: Array) -> Array:
        """Raise on labels whose shape does not fit ``f``; return them (maybe reshaped)."""
        return y

    def _label_problems(self, f: Array, y, xp) -> list[tuple[Array, str]]:
        """``[(ok, message)]``: per-token validity masks ``(b, *tok)`` computed with ``xp``
        (numpy eagerly, jax.numpy under jit) and what is wrong plus the fix."""
        return []

    def _canonical(self, f: Array, y: Array) -> Array:
        """Labels in canonical form (e.g. one-hot rows in ``f.dtype``)."""
        return y

    def prepare_labels(self, f: Array, y) -> Array | WeightedLabels:
        """Check labels against the outputs ``f`` and return them in canonical form.

        ``y`` are labels or :class:`WeightedLabels` ``(labels, weights)``. Shapes are checked at
        trace time (ValueError). Concrete labels and weights are also checked by value and a
        ValueError names the offending entries and the fix. Under ``jax.jit`` (traced labels)
        invalid labels of tokens with nonzero weight become NaN in the canonical labels (so the
        loss value of that example is NaN, never a silently clamped class), invalid weights
        become NaN, and :meth:`labels_valid` is False: under jit, invalid labels make the step
        rejected: params unchanged, info.rejected = True.

        Example:
            >>> import jax.numpy as jnp
            >>> import gaussnewton as gn
            >>> loss = gn.get_loss("softmax_cross_entropy")
            >>> loss.prepare_labels(jnp.zeros((2, 3)), jnp.array([0, 2])).shape
            (2, 3)
        """
        labels, weights, active, traced = self._checked(f, y)
        canonical = jnp.asarray(self._canonical(f, labels))
        if traced:
            ok = None
            for ok_t, _ in self._label_problems(f, labels, jnp):
                ok = ok_t if ok is None else ok & ok_t
            if ok is not None:
                if active is not None:
                    ok = ok | ~active
                canonical = jnp.where(_pad_like(ok, canonical), canonical, jnp.nan)
        if active is not None and jnp.issubdtype(canonical.dtype, jnp.floating):
            canonical = jnp.where(_pad_like(active, canonical), canonical, 0)
        return canonical if weights is None else WeightedLabels(canonical, jnp.asarray(weights))

    def check_labels(self, f: Array | jax.ShapeDtypeStruct, y) -> None:
        """The checks of :meth:`prepare_labels` alone, without building the canonical labels:
        shapes always, values when ``y`` is concrete (ValueError naming the offending entries).
        ``f`` may be a ``jax.ShapeDtypeStruct`` of the outputs (only its shape and dtype are read).

        Example:
            >>> import jax, jax.numpy as jnp, numpy as np
            >>> import gaussnewton as gn
            >>> f = jax.ShapeDtypeStruct((2, 3), jnp.float32)
            >>> gn.get_loss("softmax_cross_entropy").check_labels(f, np.array([0, 3]))
            Traceback (most recent call last):
            ...
            ValueError: loss 'softmax_cross_entropy': labels y are class indices and must lie in [0, 3) (c = 3 outputs); got 3 at index (1,), 1 of 2 tokens. Fix these labels, or mask their tokens out with weight 0 via gaussnewton.losses.WeightedLabels(labels, weights).
        """
        self._checked(f, y)

    def _checked(self, f, y):
        """``(labels, weights, active, traced)`` after the shape checks and, for concrete inputs,
        the value checks (ValueError)."""
        labels, weights = split_labels(y)
        if f.ndim < 2:
            raise ValueError(
                f"loss {self.name!r}: model outputs f of shape {tuple(f.shape)} need a batch axis "
                f"and an output axis, (b, c) or (b, *tok, c); reshape a scalar output to (b, 1)."
            )
        # Concrete labels and weights stay numpy arrays until checked: inside a jit trace every
        # jax.numpy op (even on constants) returns a tracer, whose values cannot be read.
        traced = _is_traced(labels, weights)
        xp = jnp if traced else np
        labels = self._check_shape(f, xp.asarray(labels))
        if weights is not None:
            weights = self._check_weights(f, xp.asarray(weights), traced)
        active = None if weights is None else weights != 0
        if not traced:
            self._raise_on_bad_labels(f, labels, active)
        return labels, weights, active, traced

    def _check_weights(self, f: Array, weights, traced: bool) -> Array:
        want = tuple(f.shape[:-1])
        if tuple(weights.shape) != want:
            raise ValueError(
                f"loss {self.name!r}: weights of shape {tuple(weights.shape)} do not match the "
                f"outputs of shape {tuple(f.shape)}; pass WeightedLabels(labels, weights) with "
                f"weights of shape {want} (one per example and token)."
            )
        if not (jnp.issubdtype(weights.dtype, jnp.number) or weights.dtype == jnp.bool_):
            raise ValueError(f"loss {self.name!r}: weights of dtype {weights.dtype} must be real.")
        weights = weights.astype(f.dtype)
        if traced:
            good = jnp.isfinite(weights) & (weights >= 0)
            good = good & (jnp.sum(jnp.where(good, weights, 0)) > 0)
            return jnp.where(good, weights, jnp.nan)
        w = np.asarray(weights)
        bad = ~(np.isfinite(w) & (w >= 0))
        if bad.any():
            raise ValueError(
                f"loss {self.name!r}: weights must be finite and >= 0; {_describe(bad, w)}; "
                f"use weight 0 to mask a token out."
            )
        if not w.sum() > 0:
            raise ValueError(
                f"loss {self.name!r}: weights are all 0, so the weighted mean loss is undefined; "
                f"give at least one token a positive weight (or drop the batch)."
            )
        return weights

    def _raise_on_bad_labels(self, f: Array, labels: Array, active: np.ndarray | None) -> None:
        y = np.asarray(labels)
        for ok, message in self._label_problems(f, y, np):
            bad = ~np.asarray(ok) if active is None else ~np.asarray(ok) & active
            if bad.any():
                raise ValueError(
                    f"loss {self.name!r}: labels y {message}; {_describe(bad, y)}. Fix these "
                    f"labels, or mask their tokens out with weight 0 via "
                    f"gaussnewton.losses.WeightedLabels(labels, weights)."
                )

    def labels_valid(self, f: Array, y) -> Array:
        """True (bool scalar) when the canonical labels ``y = prepare_labels(f, y_raw)`` are valid.

        Works under ``jax.jit``: :meth:`prepare_labels` turns invalid labels (of tokens with
        nonzero weight) and invalid weights into NaN, which this detects. Under jit, invalid labels
        make the step rejected: params unchanged, info.rejected = True.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> import gaussnewton as gn
            >>> loss = gn.get_loss("softmax_cross_entropy")
            >>> f = jnp.zeros((2, 3))
            >>> check = jax.jit(lambda f, y: loss.labels_valid(f, loss.prepare_labels(f, y)))
            >>> bool(check(f, jnp.array([0, 2]))), bool(check(f, jnp.array([0, 3])))
            (True, False)
        """
        labels, weights = split_labels(y)
        ok = jnp.asarray(True)
        if weights is not None:
            ok = ok & jnp.all(jnp.isfinite(weights))
        if self.checks_labels:
            for leaf in jax.tree_util.tree_leaves(labels):
                if jnp.issubdtype(leaf.dtype, jnp.inexact):
                    ok = ok & jnp.all(jnp.isfinite(leaf))
        return ok

    # ----- per-token forms (subclasses) -----------------------------------------------------

    def token_value(self, f: Array, y: Array) -> Array:
        raise NotImplementedError

    def token_grad(self, f: Array, y: Array) -> Array:
        raise NotImplementedError

    def token_factor(self, f: Array, y: Array) -> Array:
        raise NotImplementedError

    def token_hessian(self, f: Array, y: Array) -> Array:
        s = self.token_factor(f, y)
        return jnp.einsum("...cr,...dr->...cd", s, s)

    def token_sample_factor(self, f: Array, y: Array, key: Array, num_samples: int) -> Array:
        raise ValueError(
            f"curvature='sampled' is not available for loss {self.name!r}; use curvature='exact'."
        )

    # ----- per-example quantities -----------------------------------------------------------

    def value(self, f: Array, y) -> Array:
        """Per-example losses ``l_i = Σ_t s_it l(f_it, y_it)``, shape ``(b,)``; ``L`` is their mean."""
        labels, weights = split_labels(y)
        return reduce_tokens(self.token_value(f, labels), f, weights)

    def grad(self, f: Array, y) -> Array:
        """``g_i = ∂l_i/∂f_i``: per token ``s_it ∂l/∂f_it``, shape ``(b, *tok, c)``."""
        labels, weights = split_labels(y)
        return scale_tokens(self.token_grad(f, labels), f, weights, 1.0, 1)

    def hessian(self, f: Array, y) -> Array:
        """Per-token blocks ``s_it Q_it`` of ``Q_i = ∂²l_i/∂f_i²``, shape ``(b, *tok, c, c)``."""
        labels, weights = split_labels(y)
        return scale_tokens(self.token_hessian(f, labels), f, weights, 1.0, 2)

    def factor(self, f: Array, y) -> Array:
        """``√s_it S_it`` with ``S_it S_itᵀ = Q_it``, shape ``(b, *tok, c, r)``."""
        labels, weights = split_labels(y)
        return scale_tokens(self.token_factor(f, labels), f, weights, 0.5, 2)

    def sample_factor(self, f: Array, y, key: Array, num_samples: int) -> Array:
        """``√s_it Ŝ_it``, ``m = num_samples`` draws PER TOKEN, ``E[Ŝ_it Ŝ_itᵀ] = Q_it``;
        shape ``(b, *tok, c, m)``."""
        labels, weights = split_labels(y)
        s = self.token_sample_factor(f, labels, key, num_samples)
        return scale_tokens(s, f, weights, 0.5, 2)

    def token_range_coefficients(self, f: Array, y: Array) -> tuple[Array, Array] | None:
        """``(t, ok)`` per token with ``S_it t_it = g_it`` where ``ok`` (unscaled token forms), or
        None when the loss has no closed form (subclasses)."""
        return None

    def range_coefficients(self, f: Array, y) -> tuple[Array, Array] | None:
        r"""``g = S t + r`` per token: ``(t, r)`` with ``r = 0`` wherever ``g_it ∈ range(S_it)``.

        EGN's row-space solve uses it to avoid the ``1/λ`` of the Woodbury form (the float32
        "range form"): ``d = −Jᵀ S (SᵀKS + bλI)⁻¹ t`` for the part of ``g`` in the range of the
        curvature, and the Woodbury form only for ``r`` (tokens where ``g ∉ range(S)`` in floating
        point, e.g. a softmax probability of the label that underflowed to 0). ``t`` has the
        factor's shape without the output axis, ``(b, *tok, r)``; None when the loss has no
        closed form (then the Woodbury form is used for all of ``g``).
        """
        labels, weights = split_labels(y)
        out = self.token_range_coefficients(f, labels)
        if out is None:
            return None
        t_tok, ok = out
        g = self.grad(f, y)
        t = scale_tokens(t_tok, f, weights, 0.5, 1)
        keep = ok[..., None]
        return jnp.where(keep, t, 0), jnp.where(keep, 0, g)

    def identity_scale(self, f: Array, y) -> float | None:
        """``σ`` when ``Q_i = σ I`` for every example is known at trace time, else None.

        For an ``identity_curvature`` loss: 1 for 2-D unweighted outputs, ``1/T`` for unweighted
        per-token outputs; None with weights (then ``Q_i = blockdiag(s_it I)`` varies).
        """
        if not self.identity_curvature or split_labels(y)[1] is not None:
            return None
        s = token_scale(f, None)
        return 1.0 if s is None else float(s)
