r"""Losses with closed-form output derivatives, per token (docs/METHODS.md section 1).

Every loss acts on model outputs ``f`` of shape ``(b, c)``, or ``(b, *tok, c)`` with one or more
token axes (language models ``(b, T, V)``, sequence labelling, images ``(b, H, W, c)``), and on
labels ``y`` (or :class:`WeightedLabels` ``(labels, weights)`` with weights ``(b, *tok)``, ``≥ 0``).
With ``T`` tokens per example and ``l(f_it, y_it)`` the loss of one token (a ``c``-vector):

* the training loss is the weighted token mean
  ``L = Σ_{i,t} w_it l(f_it, y_it) / Σ_{i,t} w_it`` (no weights: the plain mean over examples
  and tokens), written as the MEAN over examples ``L = (1/b) Σ_i l_i`` of
  ``l_i = Σ_t s_it l(f_it, y_it)``, ``s_it = b w_it / Σw`` (no weights: ``s_it = 1/T``);
* ``value``: ``l_i`` (shape ``(b,)``),
* ``grad``: ``g_i = ∂l_i/∂f_i`` (f's per-example shape; per token ``s_it ∂l/∂f_it``),
* ``hessian``: the per-token blocks ``s_it Q_it`` of ``Q_i = blockdiag_t(s_it Q_it)``
  (shape ``(b, *tok, c, c)``; for 2-D ``f`` this is ``(b, c, c)``, the whole ``Q_i``),
* ``factor``: ``√s_it S_it`` with ``Q_it = S_it S_itᵀ`` (shape ``(b, *tok, c, r)``),
* ``sample_factor``: ``√s_it Ŝ_it`` with ``m`` draws per token and ``E[Ŝ_it Ŝ_itᵀ] = Q_it``
  (shape ``(b, *tok, c, m)``; the sampled Fisher / Gauss-Newton-Bartlett curvature).

Tokens of weight 0 give exact zeros in ``g`` and in the factors, and their labels are not checked.
For 2-D outputs without weights everything is the plain per-example loss (``s_i = 1``).
:func:`project` and :func:`expand` apply ``S_itᵀ`` and ``S_it`` token by token.

Labels are checked by :meth:`Loss.prepare_labels`: eagerly with a ValueError, and under jit by
:meth:`Loss.labels_valid` (invalid labels make the step rejected: params unchanged,
info.rejected = True).

| loss | l(f, y) per token | g | Q | S |
|---|---|---|---|---|
| squared error | ½‖f − y‖² (not optax's (f − y)²) | f − y | I | I |
| softmax CE | logsumexp(f) − ⟨y, f⟩ | p − y | diag(p) − ppᵀ | rank c − 1 (Householder) |
| sigmoid BCE (c = 1) | softplus(f) − y f | σ(f) − y | σ(1−σ) | √(σ(1−σ)) |
| :class:`ConvexLoss` | user function | autodiff | autodiff | eigh, negative eigenvalues clipped |

Example:
    >>> import jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> loss = gn.get_loss("softmax_cross_entropy")
    >>> f = jnp.zeros((2, 3)); y = jnp.array([0, 2])
    >>> loss.value(f, loss.prepare_labels(f, y)).shape
    (2,)
    >>> f = jnp.zeros((2, 5, 3)); y = jnp.zeros((2, 5), int)   # (b, T, c) logits, (b, T) labels
    >>> loss.factor(f, loss.prepare_labels(f, y)).shape
    (2, 5, 3, 2)
"""

from gaussnewton.losses._base import Loss
from gaussnewton.losses._builtin import (
    LOSSES,
    ConvexLoss,
    LossLike,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
    SquaredError,
    get_loss,
    row_tolerance,
)
from gaussnewton.losses._tokens import (
    WeightedLabels,
    expand,
    num_outputs,
    num_tokens,
    project,
    split_labels,
    token_shape,
)

__all__ = [
    "Loss",
    "SquaredError",
    "SoftmaxCrossEntropy",
    "SigmoidBinaryCrossEntropy",
    "ConvexLoss",
    "WeightedLabels",
    "get_loss",
    "LOSSES",
    "LossLike",
    "project",
    "expand",
    "num_outputs",
    "num_tokens",
    "token_shape",
    "split_labels",
    "row_tolerance",
]
