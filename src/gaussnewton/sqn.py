r"""SQN — stochastic L-BFGS with same-batch curvature pairs (Byrd et al. 2016; Wang et al.), METHODS §4.6.

Direction: the L-BFGS two-loop recursion ``d = −H_k ∇L`` on the mini-batch gradient, with the
last ``history`` curvature pairs and ``H_0 = γ I``, ``γ = sᵀy / yᵀy`` of the newest pair. Without
any pair (first step, or after only rejected pairs) ``d = −∇L / max(1, ‖∇L‖)``.

Curvature pairs use the SAME mini-batch at both points: after the step ``Δ`` is chosen (line
search included), ``s = Δ`` and ``y = ∇L_B(w + Δ) − ∇L_B(w)`` — one extra gradient on the batch
``B`` per step (the optimizer's ``after_step`` hook). Because both gradients see the same batch,
``y`` measures curvature and not batch-to-batch noise. A pair is stored only if
``sᵀy > curvature_eps · sᵀs`` (and finite), which keeps every ``H_k`` positive definite, so ``d`` is
always a descent direction. The history is a ring buffer in ``method_state`` (flat vectors).

Example:
    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: x @ p["w"]
    >>> p = {"w": jnp.zeros((3, 1))}
    >>> from gaussnewton.sqn import sqn
    >>> opt = sqn(fn, loss="squared_error", history=5)
    >>> p, state, info = jax.jit(opt.step)(p, opt.init(p), jnp.ones((8, 3)), jnp.ones((8,)))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from gaussnewton._family import assemble, check_axis_name, check_common, check_int
from gaussnewton._sharding import BatchAxis
from gaussnewton.linearization import linearize
from gaussnewton.linesearch import Armijo
from gaussnewton.losses import LossLike
from gaussnewton.optimizer import GaussNewtonOptimizer, Linearization

PyTree = Any

__all__ = ["sqn", "LBFGSHistory", "two_loop"]


class LBFGSHistory(NamedTuple):
    """Ring buffer of curvature pairs: ``s``, ``y`` ``(m, n)``; ``num`` stored (≤ m); ``head`` next slot."""

    s: jax.Array
    y: jax.Array
    num: jax.Array
    head: jax.Array


def two_loop(grad: jax.Array, hist: LBFGSHistory) -> jax.Array:
    r"""``H_k grad`` by the L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4), newest first."""
    m = hist.s.shape[0]
    dt = grad.dtype
    sy = jnp.sum(hist.s * hist.y, axis=1)
    rho = jnp.where(sy > 0, 1.0 / jnp.where(sy > 0, sy, 1.0), 0.0).astype(dt)

    def slot(i):  # i-th newest pair
        return (hist.head - 1 - i) % m

    def first(i, carry):
        q, alphas = carry
        k = slot(i)
        a = jnp.where(i < hist.num, rho[k] * jnp.dot(hist.s[k], q), 0.0).astype(dt)
        return q - a * hist.y[k], alphas.at[k].set(a)

    q, alphas = jax.lax.fori_loop(0, m, first, (grad, jnp.zeros((m,), dt)))
    newest = slot(0)
    yy = jnp.dot(hist.y[newest], hist.y[newest])
    gamma = jnp.where((hist.num > 0) & (yy > 0), sy[newest] / jnp.where(yy > 0, yy, 1.0), 1.0)
    r = gamma.astype(dt) * q

    def second(j, r):  # oldest to newest
        i = m - 1 - j
        k = slot(i)
        beta = rho[k] * jnp.dot(hist.y[k], r)
        return r + jnp.where(i < hist.num, alphas[k] - beta, 0.0).astype(dt) * hist.s[k]

    return jax.lax.fori_loop(0, m, second, r)


def sqn(
    model_fn: Callable,
    *,
    loss: LossLike,
    learning_rate: float | Callable = 1.0,
    history: int = 10,
    line_search: str | Armijo | None = "armijo",
    curvature_eps: float = 1e-10,
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> GaussNewtonOptimizer:
    r"""Stochastic L-BFGS whose curvature pairs use the same mini-batch at both points.

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` or ``(b,)`` outputs.
        loss: a loss name or :class:`~gaussnewton.Loss`.
        learning_rate: step size (``α_max`` of the line search); number or schedule.
        history: number ``m ≥ 1`` of curvature pairs kept.
        line_search: ``"armijo"`` (default, METHODS §2.1), :class:`~gaussnewton.Armijo` or ``None``.
        curvature_eps: a pair is skipped unless ``sᵀy > curvature_eps · sᵀs``.
        momentum, tx, axis_name: as in :func:`gaussnewton.egn` (inside ``shard_map`` the gradients
            are summed over the devices; the L-BFGS history is global and replicated).

    There is no damping: ``info.damping`` is 0 and ``info.rho`` NaN.
    """
    loss_obj = check_common(model_fn, loss, learning_rate, 0.0, momentum, tx, damping_strict=False)
    check_int("history", history, 1)
    if not curvature_eps >= 0:
        raise ValueError(f"curvature_eps={curvature_eps!r} must be >= 0, e.g. 1e-10.")

    axis = BatchAxis(check_axis_name(axis_name))

    def loss_and_grad(fn, params, x, y):
        """``(L, labels ok, ∇L = Jᵀg/b)`` of the whole batch (one VJP; summed over ``axis``)."""
        lin = linearize(fn, loss_obj, params, x, y, axis=axis)
        return lin.loss, lin.labels_ok, lin.grad()

    def init_method_state(params):
        flat, _ = ravel_pytree(params)
        z = jnp.zeros((history, flat.size), flat.dtype)
        zero = jnp.zeros((), jnp.int32)
        return LBFGSHistory(z, z, zero, zero)

    def direction_fn(fn, params, x, y, lam, key, hist):
        del lam, key
        value, labels_ok, grad = loss_and_grad(fn, params, x, y)
        g, unravel = ravel_pytree(grad)
        hg = two_loop(g, hist)
        scale = jnp.where(hist.num > 0, 1.0, 1.0 / jnp.maximum(1.0, jnp.linalg.norm(g)))
        direction = unravel(-(scale * hg).astype(g.dtype))

        def after_step(delta):
            s, _ = ravel_pytree(delta)
            new_params = jax.tree_util.tree_map(jnp.add, params, delta)
            g_new, _ = ravel_pytree(loss_and_grad(fn, new_params, x, y)[2])
            yv = (g_new - g).astype(s.dtype)
            sy, ss = jnp.dot(s, yv), jnp.dot(s, s)
            keep = (
                (sy > curvature_eps * ss) & (ss > 0) & jnp.isfinite(sy) & jnp.all(jnp.isfinite(yv))
            )
            k = hist.head
            stored = LBFGSHistory(
                hist.s.at[k].set(s),
                hist.y.at[k].set(yv),
                jnp.minimum(hist.num + 1, history),
                (k + 1) % history,
            )
            return jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), stored, hist)

        return Linearization(
            value,
            grad,
            direction,
            lambda d: jnp.zeros(()),
            0,
            0.0,
            hist,
            after_step,
            labels_ok=labels_ok,
        )

    return assemble(
        "sqn",
        model_fn,
        loss_obj,
        direction_fn,
        learning_rate=learning_rate,
        damping=0.0,
        damping_policy="constant",
        line_search=line_search,
        momentum=momentum,
        tx=tx,
        init_method_state=init_method_state,
        axis_name=axis_name,
    )
