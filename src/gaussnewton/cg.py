r"""Conjugate gradients for the Gauss-Newton family (docs/METHODS.md §4.1, §4.2).

:func:`cg_solve` solves ``A x = rhs`` for a symmetric positive definite operator given as a
function ``matvec`` on any pytree (parameter space: SGN; a ``(b, r)`` array: row-space EGN) inside
``jit`` (a ``lax.while_loop``). It stops when the residual max-norm ``max |rhs − A x| ≤ tol``,
after ``max_iters`` products, or when the curvature ``pᵀ A p`` along a search direction is not
positive and finite (rounding on a nearly singular operator); it reports the iterations used.

:func:`row_space_cg` is EGN's ``solver="cg"``: the row-space systems of §2 solved matrix-free
with ``K v = J (Jᵀ v)`` products from one ``jax.linearize`` (no forward pass per iteration):

* ``Q = I``: ``(K + bλI) u = g``, ``d = −Jᵀ u``;
* ``Q = S Sᵀ``: ``(Sᵀ K S + bλI) v = Sᵀ J ∇L``, ``d = −(1/λ) Jᵀ (g/b − S v)``.

Warm start: the previous step's direction ``d₀`` (a parameter pytree, so it fits any batch size)
maps to the row-space point that is exact when ``d₀`` is the solution on this batch — from
``J d = −K u = bλ u − g`` (``Q = I``) and ``Sᵀ J d = −b v`` (Woodbury) —

.. math:: u_0 = (g + J d_0) / (bλ), \qquad v_0 = −Sᵀ J d_0 / b ,

then scaled by ``s* = argmin_s φ(s u₀)`` (``φ`` the CG energy), so ``φ(x₀) ≤ φ(0)``: a stale
warm start can never be worse than the zero start in the energy norm. Cost: one JVP and one ``K v``.

Example:
    >>> import jax.numpy as jnp
    >>> from gaussnewton.cg import cg_solve
    >>> a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = cg_solve(lambda v: a @ v, jnp.array([1.0, 2.0]), max_iters=2, tol=1e-6)
    >>> bool(jnp.allclose(a @ res.x, jnp.array([1.0, 2.0]), atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gaussnewton._sharding import NO_AXIS, BatchAxis, sum_of_products
from gaussnewton._tree import tree_axpy, tree_zeros_like

PyTree = Any

__all__ = ["CGResult", "cg_solve", "tree_max_abs", "row_space_cg"]


class CGResult(NamedTuple):
    """``x``; ``residual = rhs − A x`` (recursively updated); ``iters``; ``residual_max`` = max |r|."""

    x: PyTree
    residual: PyTree
    iters: jax.Array
    residual_max: jax.Array


def tree_max_abs(tree: PyTree) -> jax.Array:
    """``max_i |tree_i|`` over all leaves (0 for an empty tree)."""
    leaves = [jnp.max(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(tree) if leaf.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())


def cg_solve(
    matvec: Callable[[PyTree], PyTree],
    rhs: PyTree,
    x0: PyTree | None = None,
    *,
    max_iters: int,
    tol: float,
    axis: BatchAxis = NO_AXIS,
) -> CGResult:
    r"""Conjugate gradients for ``A x = rhs`` (``A`` SPD, given by ``matvec``), jit-able.

    Standard CG (Hestenes-Stiefel): ``α = rᵀr / pᵀAp``, ``x ← x + α p``, ``r ← r − α A p``,
    ``p ← r + (r₊ᵀr₊ / rᵀr) p``. Started at ``x0 = 0`` every iterate is a descent direction for the
    quadratic ``½ xᵀAx − rhsᵀx`` and its energy decreases monotonically. Stops at
    ``max |r| ≤ tol`` (absolute, residual max-norm), at ``max_iters`` products, or on a search
    direction with ``pᵀAp ≤ 0`` / non-finite (the iterate is kept and the loop ends).

    Args:
        matvec: ``v -> A v`` on pytrees shaped like ``rhs``.
        rhs: right-hand side pytree.
        x0: start (default zeros).
        max_iters: at most this many ``matvec`` calls inside the loop (static int ``>= 0``).
        tol: absolute tolerance on the residual max-norm.
        axis: the batch axis when the vectors are split over devices inside ``shard_map`` (each
            holds the block of its examples): inner products and the max-norm are global.
    """

    def vdot(a, b):  # row-space vectors may be batch-sharded: a product and a reduction
        return axis.sum(sum_of_products(a, b))

    def max_abs(r):
        m = tree_max_abs(r)
        return m if not axis.sharded else jax.lax.pmax(m, axis.name)

    if x0 is None:
        x = tree_zeros_like(rhs)
        r = rhs
    else:
        x = x0
        r = jax.tree_util.tree_map(lambda a, b: a - b, rhs, matvec(x0))
    rr = vdot(r, r)
    dt = rr.dtype
    tol = jnp.asarray(tol, dt)

    def cond(carry):
        _, r, _, _, k, broken = carry
        return (k < max_iters) & (max_abs(r) > tol) & jnp.logical_not(broken)

    def body(carry):
        x, r, p, rr, k, _ = carry
        ap = matvec(p)
        pap = vdot(p, ap)
        broken = jnp.logical_not(jnp.isfinite(pap) & (pap > 0))
        alpha = jnp.where(broken, 0.0, rr / jnp.where(broken, 1.0, pap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rr_new = vdot(r, r)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        p = tree_axpy(beta, p, r)
        return x, r, p, rr_new, k + 1, broken

    init = (x, r, r, rr, jnp.asarray(0, jnp.int32), jnp.asarray(False))
    x, r, _, _, k, _ = jax.lax.while_loop(cond, body, init)
    return CGResult(x, r, k, max_abs(r).astype(dt))


def _scaled_start(matvec, rhs, u0, axis: BatchAxis = NO_AXIS):
    """``s u0`` with ``s = u0ᵀrhs / u0ᵀA u0`` (the best multiple; 0 when undefined)."""
    au = matvec(u0)
    den = axis.sum(sum_of_products(u0, au))
    ok = jnp.isfinite(den) & (den > 0)
    s = jnp.where(ok, axis.sum(sum_of_products(u0, rhs)) / jnp.where(ok, den, 1.0), 0.0)
    s = jnp.where(jnp.isfinite(s), s, 0.0)
    return jax.tree_util.tree_map(lambda a: (s * a).astype(a.dtype), u0)


def row_space_cg(
    jvp_fn: Callable[[PyTree], jax.Array],
    vjp_fn: Callable[[jax.Array], PyTree],
    g: jax.Array,
    factor: jax.Array | None,
    lam: jax.Array,
    *,
    warm_start: PyTree | None,
    max_iters: int | None,
    tol: float,
    axis: BatchAxis = NO_AXIS,
) -> tuple[PyTree, PyTree, CGResult]:
    r"""EGN's row-space solve by CG with matrix-free ``K v`` products (see the module docstring).

    Args:
        jvp_fn: ``v -> J v`` (``(b, c)``), from ``jax.linearize`` of the batch outputs.
        vjp_fn: ``u -> Jᵀ u`` (a parameter pytree, not a tuple), the transpose of ``jvp_fn``.
        g: output gradients ``(b, c)``.
        factor: ``S`` (``(b, c, r)``) or ``None`` for ``Q = I``.
        lam: damping ``λ`` (``> 0``; ``λ = 0`` allowed for ``Q = I`` on a full-rank ``K``).
        warm_start: previous direction (parameter pytree) or ``None`` (zero start).
        max_iters: CG iteration cap; ``None`` means the row-space dimension.
        tol: absolute tolerance on the row-space residual max-norm.
        axis: the batch axis inside ``shard_map``: ``g``, ``factor`` and the row-space vectors
            are this device's block, ``jvp_fn``/``vjp_fn`` those of :func:`gaussnewton.linearize`
            with the same axis (``vjp_fn`` sums over the devices).

    Returns:
        ``(grad, direction, cg_result)`` with ``grad = ∇L`` and ``direction = d``.
    """
    b = g.shape[0] * axis.size()
    dt = jnp.result_type(jnp.float32, g.dtype)
    blam = (b * jnp.asarray(lam, dt)).astype(g.dtype)
    grad = vjp_fn(g / b)

    def k_mv(u):  # u (b, c) -> K u
        t = vjp_fn(u)
        return jvp_fn(t)

    if factor is None:
        rhs = g

        def matvec(u):
            return k_mv(u) + blam * u

        def to_row(jd):
            return (g + jd) / blam

    else:
        s = factor.astype(g.dtype)
        rhs = jnp.einsum("bcr,bc->br", s, jvp_fn(grad))  # Sᵀ J ∇L

        def matvec(v):
            return jnp.einsum("bcr,bc->br", s, k_mv(jnp.einsum("bcr,br->bc", s, v))) + blam * v

        def to_row(jd):
            return -jnp.einsum("bcr,bc->br", s, jd) / b

    n = rhs.size
    x0 = None
    if warm_start is not None:
        u0 = to_row(jvp_fn(warm_start))
        u0 = jnp.where(jnp.isfinite(u0), u0, 0.0)
        x0 = _scaled_start(matvec, rhs, u0, axis)
    n = n * axis.size()
    res = cg_solve(
        matvec, rhs, x0, max_iters=n if max_iters is None else max_iters, tol=tol, axis=axis
    )
    if factor is None:
        direction = vjp_fn(-res.x)
    else:
        cot = (g / b - jnp.einsum("bcr,br->bc", s, res.x)) / jnp.asarray(lam, g.dtype)
        direction = vjp_fn(-cot)
    return grad, direction, res
