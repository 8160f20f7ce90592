r"""Gram-Gauss-Newton (Cai et al., 2019), docs/METHODS.md §4.3 — a preset over EGN (squared loss).

On each mini-batch

.. math:: w ← w − η\, J^\top (K + λ I)^{-1} (f − y),

the sum-of-squares convention (``Σ_i ½‖f_i − y_i‖²``, no ``1/b``). Since EGN solves
``(K + bλ_{EGN} I) u = g`` for the batch MEAN, GGN with ``λ`` is EGN with ``λ_{EGN} = λ / b``
(``b`` is read from the batch at trace time; ``info.damping`` reports the GGN ``λ``). ``λ → 0``
gives the minimum-norm Gauss-Newton step (``λ = 0`` is allowed; a singular ``K`` then gives a
non-finite direction, which the step rejects).

Example:
    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 1)) * 0.1}
    >>> from gaussnewton.gram_gauss_newton import gram_gauss_newton
    >>> opt = gram_gauss_newton(fn, learning_rate=1.0, damping=1e-2)
    >>> p, state, info = jax.jit(opt.step)(p, opt.init(p), jnp.ones((8, 3)), jnp.zeros((8,)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from gaussnewton.damping import AdaptiveDamping
from gaussnewton.egn import egn
from gaussnewton.linesearch import Armijo
from gaussnewton.optimizer import GaussNewtonOptimizer

__all__ = ["gram_gauss_newton"]


def gram_gauss_newton(
    model_fn: Callable,
    *,
    learning_rate: float | Callable = 1.0,
    damping: float | Callable = 1e-3,
    damping_policy: str | AdaptiveDamping | Callable = "constant",
    line_search: str | Armijo | None = None,
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    gram: str | Callable = "auto",
    solver: Any = "cholesky",
    max_cg_iters: int | None = None,
    cg_tol: float = 1e-6,
    axis_name: str | tuple[str, ...] | None = None,
) -> GaussNewtonOptimizer:
    r"""Gram-Gauss-Newton: ``w ← w − η Jᵀ(K + λI)⁻¹(f − y)`` (squared loss, sum convention).

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` or ``(b,)`` outputs.
        learning_rate: ``η`` (number or schedule; ``α_max`` if a line search is asked for).
        damping: the GGN ``λ ≥ 0`` (= ``b ·`` EGN's λ); number or schedule.
        damping_policy: ``"constant"`` (Cai et al.), or any policy of :func:`gaussnewton.egn`
            (it then adapts the GGN ``λ``).
        line_search: ``None`` (Cai et al.) or ``"armijo"`` / :class:`~gaussnewton.Armijo`.
        momentum, tx, gram, axis_name: as in :func:`gaussnewton.egn`.
        solver: a solver object of :mod:`gaussnewton.solvers` (e.g.
            :class:`~gaussnewton.RowCholesky`, the default ``"cholesky"``, or
            :class:`~gaussnewton.RowCG`) or its name, as in :func:`gaussnewton.egn`.
        max_cg_iters, cg_tol: the flattened sub-options of ``solver="cg"`` (see
            :func:`gaussnewton.egn`).
    """
    base = egn(
        model_fn,
        loss="squared_error",
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=damping_policy,
        line_search=line_search,
        momentum=momentum,
        tx=tx,
        gram=gram,
        solver=solver,
        max_cg_iters=max_cg_iters,
        cg_tol=cg_tol,
        axis_name=axis_name,
    )
    egn_direction_fn = base.direction_fn

    def direction_fn(fn, params, x, y, lam, key, method_state):
        b = jax.tree_util.tree_leaves(x)[0].shape[0] * base.batch_axis.size()
        return egn_direction_fn(fn, params, x, y, lam / b, key, method_state)

    return dataclasses.replace(base, direction_fn=direction_fn, name="gram_gauss_newton")
