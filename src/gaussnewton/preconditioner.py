r"""The damped GGN of a batch as an optax preconditioner: it transforms the INCOMING update.

:func:`egn_preconditioner` maps any gradient-like update ``u`` (the raw gradient, a clipped one,
one with weight decay added, an accumulated one, ...) to

.. math:: P u = (H + λI)^{-1} u, \qquad H = \tfrac1b J^\top Q J = \tfrac1b A^\top A,
          \quad A = S^\top J \;(b·r \times d),

where ``Q = S Sᵀ`` is the output Hessian of the loss on the batch (``S = I`` for squared error;
the exact factor, ``r = c − 1`` for softmax CE; or the sampled factor, ``r = m``). Woodbury moves
the solve into the ``b·r`` row space, exactly:

.. math:: P u = \tfrac1λ \Big(u - A^\top (A A^\top + bλI)^{-1} A u\Big),
          \qquad A A^\top = S^\top K S ,

with ``A u = Sᵀ (J u)`` one JVP, ``AAᵀ`` the Gram of the projected outputs ``Sᵀ f`` (one tiled
Cholesky, as in :func:`gaussnewton.egn_direction`) and ``Aᵀ v = Jᵀ (S v)`` one VJP. For
``u = ∇L`` on the same batch, ``−P u`` is the EGN direction :func:`gaussnewton.egn_direction`.

Sign conventions are optax's: the input is gradient-like and so is the output, so descend with
``optax.chain(egn_preconditioner(...), optax.scale(-lr))`` or ``optax.sgd(lr)`` after it.

**Masked parameters** (``optax.masked``, ``optax.multi_transform``). There the transform receives
``updates`` and ``params`` whose masked-out leaves are :class:`optax.MaskedNode`; the model cannot
run on those, so pass the full parameters as the extra argument ``full_params=params``. The
preconditioner is then the damped GGN *restricted to the unmasked leaves* ``a``, evaluated at the
full parameters:

.. math:: P_a u_a = (J_a^\top Q J_a / b + λI)^{-1} u_a ,

the ``a × a`` block of ``H`` (not the ``a``-block of ``(H + λI)^{-1}``); the masked leaves stay
untouched. In ``optax.multi_transform`` with one preconditioner per group this is the
block-diagonal GGN.

**Accumulation** (``optax.MultiSteps``). MultiSteps calls its inner transform at every micro-step
with the running mean of the gradients and THAT call's extra arguments, and keeps the result only
at the last micro-step. So the emitted update is the mean gradient of the ``k`` micro-batches
preconditioned with the curvature (and ``λ``) of the LAST micro-batch ``x, y``; the state (step
count for a ``λ`` schedule) advances once per emitted update. The inner solve runs at every
micro-step (MultiSteps' design), so the cost is ``k`` solves per emitted update. MultiSteps
accumulates in float32 unless given ``accumulator_dtype``.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gaussnewton as gn
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 2)) * 0.1}
    >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
    >>> tx = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     gn.egn_preconditioner(fn, loss="squared_error", damping=1e-2),
    ...     optax.sgd(0.5),
    ... )
    >>> state = tx.init(p)
    >>> grads = jax.grad(lambda q: 0.5 * jnp.mean(jnp.sum((fn(q, x) - y) ** 2, -1)))(p)
    >>> updates, state = jax.jit(tx.update)(grads, state, p, x=x, y=y)
    >>> p = optax.apply_updates(p, updates)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gaussnewton import _validate
from gaussnewton._tree import compute_dtype
from gaussnewton.directions import _gram_solve
from gaussnewton.gram import STRATEGIES, as_2d
from gaussnewton.losses import Loss, LossLike, get_loss

PyTree = Any

__all__ = ["egn_preconditioner", "EGNPreconditionerState", "precondition"]

_CURVATURES = ("exact", "sampled")


class EGNPreconditionerState(NamedTuple):
    """State of :func:`egn_preconditioner`: ``count``, the number of updates so far (the argument
    of a ``λ`` schedule)."""

    count: jax.Array


def _is_masked(node: Any) -> bool:
    return isinstance(node, optax.MaskedNode)


def _has_masked(tree: PyTree) -> bool:
    return any(_is_masked(n) for n in jax.tree_util.tree_leaves(tree, is_leaf=_is_masked))


def _restrict(updates: PyTree, full_params: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """The active parameters (``full_params`` where ``updates`` has arrays, MaskedNode where it has
    MaskedNode) and ``merge(active) -> full`` that puts them back among the frozen leaves."""
    try:
        active = jax.tree_util.tree_map(
            lambda u, p: u if _is_masked(u) else p, updates, full_params, is_leaf=_is_masked
        )
    except ValueError as err:
        raise ValueError(
            "egn_preconditioner: the updates do not match the parameter tree "
            f"({jax.tree_util.tree_structure(updates, is_leaf=_is_masked)} vs "
            f"{jax.tree_util.tree_structure(full_params)}); pass the parameters the model takes "
            "(params=..., or full_params=... under optax.masked / multi_transform)."
        ) from err

    def merge(a: PyTree) -> PyTree:
        return jax.tree_util.tree_map(
            lambda ai, p: p if _is_masked(ai) else ai, a, full_params, is_leaf=_is_masked
        )

    return active, merge


def precondition(
    model_fn: Callable,
    params: PyTree,
    updates: PyTree,
    x: PyTree,
    y: jax.Array,
    *,
    loss: LossLike,
    damping: float | jax.Array,
    gram: str = "auto",
    curvature: str = "exact",
    num_samples: int = 1,
    key: jax.Array | None = None,
) -> PyTree:
    r"""``P u = (J_aᵀ Q J_a / b + λI)⁻¹ u`` on one batch, by Woodbury in the row space.

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` (or ``(b,)``) outputs.
        params: the full parameters the model is evaluated at (no MaskedNode leaves).
        updates: ``u``, a pytree like ``params``; leaves that are :class:`optax.MaskedNode` (whole
            subtrees allowed) are left out: ``a`` are the remaining leaves and ``J_a`` their
            Jacobian columns.
        x, y: the batch whose curvature is used.
        loss: a loss name or :class:`~gaussnewton.losses.Loss`.
        damping: ``λ > 0``.
        gram: Gram strategy name.
        curvature: ``"exact"`` or ``"sampled"`` (needs ``key``; ``num_samples`` columns per example).

    Returns:
        ``P u`` with the structure and dtypes of ``updates``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gaussnewton.preconditioner import precondition
        >>> fn = lambda p, x: x @ p
        >>> x = 2 * jnp.eye(4)  # J = 2I, H = JᵀJ/4 = I: P u = u / (1 + λ)
        >>> u = precondition(fn, jnp.zeros(4), jnp.ones(4), x, jnp.zeros(4), loss="squared_error",
        ...                  damping=1.0)
        >>> [round(v, 12) for v in u.tolist()]
        [0.5, 0.5, 0.5, 0.5]
    """
    loss_obj = get_loss(loss)
    fn = as_2d(model_fn)
    active, merge = _restrict(updates, params)

    def fn_active(a, xx):
        return fn(merge(a), xx)

    u = jax.tree_util.tree_map(lambda ui, p: ui.astype(p.dtype), updates, active)
    f, jvp_fn = jax.linearize(lambda a: fn_active(a, x), active)
    vjp_fn = jax.linear_transpose(jvp_fn, active)
    y = loss_obj.prepare_labels(f, y)
    b = f.shape[0]
    dt = compute_dtype(f.dtype, *(leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)))
    lam = jnp.asarray(damping, dt)
    ju = jvp_fn(u).astype(dt)  # J u, (b, c)

    if curvature == "exact" and loss_obj.identity_scale(f, y) == 1.0:  # Q = I (unweighted)
        cot = _gram_solve(fn_active, active, x, gram, b * lam, ju)  # (K + bλI)⁻¹ J u
    else:
        if curvature == "exact":
            s = loss_obj.factor(f, y)
        elif key is None:
            raise ValueError(
                "egn_preconditioner(curvature='sampled') needs a PRNG key: call "
                "tx.update(updates, state, params, x=x, y=y, key=jax.random.key(...))."
            )
        else:
            s = loss_obj.sample_factor(f, y, key, num_samples)
        s = jax.lax.stop_gradient(s).astype(dt)  # (b, c, r)

        def projected(a, xs):
            xx, ss = xs
            return jnp.einsum("bc,bcr->br", fn_active(a, xx).astype(dt), ss)

        w = jnp.einsum("bcr,bc->br", s, ju)  # A u = Sᵀ J u
        v = _gram_solve(projected, active, (x, s), gram, b * lam, w)  # (SᵀKS + bλI)⁻¹ A u
        cot = jnp.einsum("bcr,br->bc", s, v)  # S v
    (jt,) = vjp_fn(cot.astype(f.dtype))  # Aᵀ v = Jᵀ S v
    return jax.tree_util.tree_map(
        lambda ui, ji: ((ui.astype(dt) - ji.astype(dt)) / lam).astype(ui.dtype), updates, jt
    )


def _check(loss_obj: Loss, damping, gram, curvature, num_samples) -> None:
    _validate.check_number("damping", damping, low=0.0, hint="λ > 0 (e.g. 1e-3) or a schedule.")
    _validate.check_choice("curvature", curvature, _CURVATURES)
    if not isinstance(gram, str) or (gram != "auto" and gram not in STRATEGIES):
        raise ValueError(f"gram={gram!r} is unknown; use 'auto' or one of {sorted(STRATEGIES)}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1 (e.g. 1).")
    if curvature == "sampled" and not loss_obj.supports_sampling:
        raise ValueError(
            f"curvature='sampled' is not available for loss {loss_obj.name!r}; use "
            "curvature='exact'."
        )


def egn_preconditioner(
    model_fn: Callable,
    *,
    loss: LossLike,
    damping: float | Callable[[jax.Array], jax.Array] = 1e-3,
    gram: str = "auto",
    curvature: str = "exact",
    num_samples: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""The damped batch GGN as a composable optax transform: ``u ↦ (JᵀQJ/b + λI)⁻¹ u``.

    ``update(updates, state, params, *, x, y, key=None, full_params=None)`` preconditions the
    INCOMING ``updates`` with the curvature of the batch ``(x, y)`` at ``params`` (see the module
    docstring for the math, masked parameters and ``optax.MultiSteps``). With ``updates = ∇L`` of
    the same batch the output is ``−egn_direction(...)``; chain a step size after it
    (``optax.scale(-lr)``, ``optax.sgd(lr)``, momentum, ...), clipping or weight decay before or
    after it. Unlike :func:`gaussnewton.as_optax` (a whole EGN step that ignores its input), this
    is the form that composes with the rest of an optax chain.

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` (or ``(b,)``) outputs.
        loss: a loss name or :class:`~gaussnewton.losses.Loss`.
        damping: ``λ > 0``, or a schedule ``count -> λ`` of the update count kept in the state.
        gram: Gram strategy name (``"auto"``, ``"jacobian"``, ``"structured"``, ...).
        curvature: ``"exact"`` (``Q``) or ``"sampled"`` (Monte-Carlo factor with ``num_samples``
            columns per example; ``update`` then needs ``key=``).
        num_samples: columns of the sampled factor.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` with state
        :class:`EGNPreconditionerState`. Extra arguments of ``update``: ``x``, ``y`` (required),
        ``key`` (sampled curvature), ``full_params`` (the full parameter tree, required when
        ``params`` has :class:`optax.MaskedNode` leaves, i.e. inside ``optax.masked`` /
        ``optax.multi_transform``); other extra arguments are ignored.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import gaussnewton as gn
        >>> fn = lambda p, x: x @ p["w"]
        >>> p = {"w": jnp.zeros((3, 2))}
        >>> x, y = jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
        >>> tx = optax.chain(gn.egn_preconditioner(fn, loss="softmax_cross_entropy"),
        ...                  optax.scale(-1.0))
        >>> grads = {"w": jnp.ones((3, 2))}
        >>> updates, state = tx.update(grads, tx.init(p), p, x=x, y=y)
    """
    loss_obj = get_loss(loss)
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a callable model_fn(params, x), got {model_fn!r}.")
    _check(loss_obj, damping, gram, curvature, num_samples)

    def init_fn(params: PyTree) -> EGNPreconditionerState:
        del params
        return EGNPreconditionerState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, x=None, y=None, key=None, full_params=None, **kw):
        del kw
        model_params = params if full_params is None else full_params
        if model_params is None or x is None or y is None:
            raise ValueError(
                "egn_preconditioner needs params and the batch: call "
                "tx.update(grads, state, params, x=x, y=y)."
            )
        if _has_masked(model_params):
            raise ValueError(
                "egn_preconditioner got params with optax.MaskedNode leaves (it runs inside "
                "optax.masked / multi_transform): the model needs all parameters, so pass them "
                "as tx.update(grads, state, params, x=x, y=y, full_params=params) (and leave "
                "mask_compatible_extra_args=False, or optax masks full_params too)."
            )
        lam = damping(state.count) if callable(damping) else damping
        out = precondition(
            model_fn,
            model_params,
            updates,
            x,
            y,
            loss=loss_obj,
            damping=lam,
            gram=gram,
            curvature=curvature,
            num_samples=num_samples,
            key=key,
        )
        return out, EGNPreconditionerState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
