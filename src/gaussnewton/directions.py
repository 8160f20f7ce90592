r"""The exact Gauss-Newton (Levenberg-Marquardt) direction, solved in the row space (docs/METHODS.md §2).

Parameter space (the definition, ``d`` unknowns):

.. math:: d = -(H + λI)^{-1} \nabla L, \qquad H = \tfrac1b J^\top Q J,\quad \nabla L = \tfrac1b J^\top g .

Row space (what is computed, ``b·c``, ``b·r`` or ``b·m`` unknowns):

* ``Q = I`` (squared error): push-through, ``d = -Jᵀ (K + bλI)^{-1} g`` — one Cholesky.
* any other curvature ``Q = S Sᵀ`` with ``S`` of shape ``(b, c, r)`` (the exact factor, ``r = rank Q``:
  ``c − 1`` for softmax, ``c`` otherwise; or the sampled factor, ``r = m``): Woodbury on ``λI + Jᵀ S Sᵀ J / b``,

  .. math:: d = -\tfrac{1}{λ} J^\top\Big(\tfrac{g}{b} - S v\Big), \qquad
            v = (S^\top K S + bλI)^{-1} S^\top J \nabla L ,

  which is exact for any ``S`` — also when ``g`` is not in the range of ``S`` (sampled curvature) —
  and needs only ``Sᵀ K S`` (the Gram of the projected outputs ``Sᵀ f``, ``(b r)²`` entries) and one
  JVP (``J ∇L``). The system matrix is SPD, so it is one Cholesky, never the non-symmetric ``QK``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 2)) * 0.1}
    >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
    >>> d, info = gn.egn_direction(fn, p, x, y, loss="squared_error", damping=1e-3)
    >>> jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(p)
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gaussnewton import _validate as v
from gaussnewton import linalg
from gaussnewton._sharding import NO_AXIS, BatchAxis, like_batch, replicate
from gaussnewton._tree import (
    any_traced,
    cached_eval_shape,
    compute_dtype,
    tree_norm,
    tree_signature,
    tree_vdot,
)
from gaussnewton.cg import row_space_cg
from gaussnewton.gram import as_2d, gram_factors, strategy_name
from gaussnewton.gram.structured._registry import RULES
from gaussnewton.linalg import num_tiles, solve_tiled_spd
from gaussnewton.linearization import linearize, with_output_axis
from gaussnewton.losses import Loss, LossLike, expand, get_loss, project
from gaussnewton.param_space import param_space_direction

PyTree = Any

__all__ = ["egn_direction", "DirectionInfo", "CURVATURES", "SOLVERS"]

CURVATURES = ("exact", "sampled")
#: "auto": the cheaper exact space (param_space.choose_space); "cholesky": the row space;
#: "param": the D x D parameter space; "cg": matrix-free row-space CG
SOLVERS = ("auto", "cholesky", "param", "cg")


class DirectionInfo(NamedTuple):
    """What :func:`egn_direction` reports: the batch loss, gradient and slope of the direction."""

    loss: jax.Array
    grad: PyTree
    grad_norm: jax.Array
    direction_norm: jax.Array
    directional_derivative: jax.Array


class _Linearization(NamedTuple):
    """Everything one step needs at the current point (internal)."""

    loss: jax.Array  # mean loss
    grad: PyTree  # ∇L
    direction: PyTree  # d (descent sign included)
    factor: jax.Array  # S, (b, *tok, c, r): the curvature used, for the ρ model
    identity: bool  # Q = q I (S not materialized; q = identity_scale)
    cg_iters: jax.Array | int = 0  # solver="cg" only
    cg_residual: jax.Array | float = 0.0  # solver="cg" only: row-space residual max-norm
    labels_ok: jax.Array | bool = True  # the labels passed the loss's checks (traced)
    identity_scale: float = 1.0  # q of Q = q I when identity (1/T for unweighted tokens)
    quad_direction: jax.Array | None = None  # ½ dᵀHd from row-space quantities (no JVP)
    # grad = None (need_grad=False): ∇Lᵀd and ‖∇L‖ from row-space quantities instead
    slope: jax.Array | None = None
    grad_norm: jax.Array | None = None


def _curvature_factor(
    loss: Loss, f, y, curvature: str, num_samples: int, key, axis: BatchAxis = NO_AXIS
):
    if curvature == "exact":
        return loss.factor(f, y)
    if key is None:
        raise ValueError(
            "curvature='sampled' needs a PRNG key: pass key=jax.random.key(...) (the optimizers draw it "
            "from their state when step(..., key=None))."
        )
    # on many devices: the draw of the whole batch (b·c numbers gathered), this device's block
    f_all, y_all = replicate(axis.gather((f, y)))
    s = jax.lax.stop_gradient(loss.sample_factor(f_all, y_all, key, num_samples))
    return like_batch(axis.local(s), f)


def _gram_solve(
    fn,
    params,
    x,
    strategy: str,
    shift: jax.Array,
    rhs: jax.Array,
    axis: BatchAxis = NO_AXIS,
    with_form: bool = False,
):
    """``u = (K + shift I)⁻¹ rhs`` for the Gram ``K`` of ``fn`` on ``x``; ``rhs``, ``u``: ``(b, k)``
    (or ``(b, k, m)``: ``m`` right-hand sides, one factorization). With ``with_form`` it returns
    ``(u, wᵀ K w)`` for ``w`` the (first) right-hand side of the whole batch, from the tiles the
    solve forms (``2 (bk)²`` flops: ``‖Jᵀ w‖²`` without a VJP).

    The Gram is built tile by tile over example blocks of about ``TILE_ROWS / k`` examples from
    one set of per-example factors (:func:`gaussnewton.gram.gram_factors`) and solved by the tile
    Cholesky of :func:`gaussnewton.linalg.solve_tiled_spd`: only the lower tiles are formed.

    On many devices the per-example factors are computed where the examples are, then gathered
    with the right-hand sides (never the Gram: :mod:`gaussnewton._sharding`); every device forms
    the Gram and solves the whole system, and keeps the rows of its own examples (``axis``).
    """
    factors, block = gram_factors(fn, axis.varying(params), x, strategy=strategy)
    local_rhs = rhs
    factors, rhs = axis.gather((factors, rhs))
    factors, rhs = replicate((factors, rhs))
    b, k = rhs.shape[:2]
    nt = min(num_tiles(b * k), b)
    edges = [round(i * b / nt) for i in range(nt + 1)]
    parts = [
        jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], factors)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    sizes = [(hi - lo) * k for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def tile(i: int, j: int) -> jax.Array:
        t = block(parts[i]) if i == j else block(parts[i], parts[j])
        return t.reshape(sizes[i], sizes[j]).astype(rhs.dtype)

    raw = [tile(i, i) for i in range(nt)]  # formed once, reused by the factorization
    diag = [_floored(t, shift) for t in raw]
    formed: dict[tuple[int, int], jax.Array] = {}

    def lower(i: int, j: int) -> jax.Array:
        if i == j:
            return diag[i]
        formed[i, j] = tile(i, j)
        return formed[i, j]

    flat = rhs.reshape((b * k,) + rhs.shape[2:])
    solved = solve_tiled_spd(lower, sizes, shift, flat)
    u = like_batch(axis.local(solved.reshape(rhs.shape)), local_rhs)
    if not with_form:
        return u
    w = flat if rhs.ndim == 2 else flat[:, 0]
    starts = [sum(sizes[:i]) for i in range(nt)]
    part = [w[a : a + n] for a, n in zip(starts, sizes, strict=True)]
    form = sum(part[i] @ (raw[i] @ part[i]) for i in range(nt))
    for (i, j), t_ij in formed.items():  # the lower tiles, each standing for itself and K_ji
        form = form + 2.0 * (part[i] @ (t_ij @ part[j]))
    # every device holds the same value; the mean over the axis types it as replicated
    return u, axis.mean(form)


#: the smallest shift of a row of a row-space system, in units of ``ε · K_ii`` (see _floored)
SHIFT_FLOOR = 16.0


def _floored(tile: jax.Array, shift: jax.Array) -> jax.Array:
    r"""A diagonal Gram tile with its shift floored row by row: ``K_ii + max(shift, 16 ε K_ii)``.

    The tile is returned as ``K_II + diag(max(0, 16 ε K_ii − shift))``, so that with the scalar
    ``shift`` of the solve every row gets at least ``16 ε K_ii`` (``ε`` the machine epsilon): a
    shift far below the rounding of the row's own entries makes the Cholesky break down (NaN, e.g.
    ``λ → 0`` on a rank-deficient ``K``: duplicated examples, ``b c > d``). Relative to each row, so
    rows of small scale (saturated examples) are not over-damped; in float64 the floor is
    ``3.6e-15 K_ii``, far below every λ the tests use.
    """
    d = jnp.diagonal(tile)
    eps = jnp.finfo(tile.dtype).eps
    extra = jnp.maximum(SHIFT_FLOOR * eps * jnp.maximum(d, 0.0) - shift, 0.0)
    return tile + jnp.diag(extra)


def _flat_outputs(fn):
    """``fn`` with per-example outputs flattened to one axis: ``(n, *tok, c) -> (n, T·c)``."""

    def flat(p, xx):
        out = fn(p, xx)
        return out.reshape(out.shape[0], -1)

    return flat


class SolveProblem(NamedTuple):
    """One batch's Levenberg-Marquardt system, as a solver object receives it (internal).

    ``model_fn`` already has its output axis (:func:`~gaussnewton.linearization.with_output_axis`);
    ``warm_start`` is the previous direction (a ``params``-shaped pytree) or ``None``.
    """

    model_fn: Any
    params: PyTree
    x: PyTree
    y: jax.Array
    loss: Loss
    damping: jax.Array
    gram_strategy: Any = "auto"
    curvature: str = "exact"
    num_samples: int = 1
    key: jax.Array | None = None
    warm_start: PyTree | None = None
    axis: BatchAxis = NO_AXIS  # the batch axis inside shard_map (x, y: this device's block)
    # False: the caller applies d as is (no momentum, no tx) and needs ∇L only through ∇Lᵀd and
    # ‖∇L‖; a solver may then return grad=None with slope and grad_norm from the row space
    need_grad: bool = True


def linearize_and_solve(
    model_fn,
    params: PyTree,
    x: PyTree,
    y: jax.Array,
    *,
    loss: Loss,
    damping: jax.Array,
    solver: Any,
    gram_strategy: Any = "auto",
    curvature: str = "exact",
    num_samples: int = 1,
    key: jax.Array | None = None,
    warm_start: PyTree | None = None,
    axis: BatchAxis = NO_AXIS,
    need_grad: bool = True,
) -> _Linearization:
    """batch → outputs, loss, g, S → Gram (or ``K v``) → solve → one VJP back (internal workhorse).

    ``solver`` is a solver object of :mod:`gaussnewton.solvers` (use
    :func:`gaussnewton.solvers.as_solver` for the string names): its ``solve`` method gets the
    :class:`SolveProblem` and does its part (:func:`solve_exact` or :func:`solve_row_cg`).
    ``axis``: the batch axis when run inside ``shard_map`` (``x``, ``y`` the local block; the
    direction, loss and gradient are those of the whole batch).
    """
    problem = SolveProblem(
        with_output_axis(model_fn),
        params,
        x,
        y,
        loss,
        damping,
        gram_strategy,
        curvature,
        num_samples,
        key,
        warm_start,
        axis,
        need_grad,
    )
    return solver.solve(problem)


def solve_row_cg(problem: SolveProblem, max_iters: int | None, tol: float) -> _Linearization:
    """The row-space system by CG with matrix-free ``K v`` products
    (:func:`gaussnewton.cg.row_space_cg`; ``problem.warm_start``: a previous direction or ``None``)."""
    fn = as_2d(problem.model_fn)  # row-space CG takes (b, c) outputs
    loss, curvature, damping, axis = problem.loss, problem.curvature, problem.damping, problem.axis
    lin = linearize(fn, loss, problem.params, problem.x, problem.y, mode="linearize", axis=axis)
    f = lin.outputs
    identity = curvature == "exact" and loss.identity_scale(f, lin.labels) == 1.0
    s = (
        None
        if identity
        else _curvature_factor(
            loss, f, lin.labels, curvature, problem.num_samples, problem.key, axis
        )
    )
    grad, direction, res = row_space_cg(
        lin.jvp,
        lin.vjp,
        lin.g,
        s,
        damping,
        warm_start=problem.warm_start,
        max_iters=max_iters,
        tol=tol,
        axis=axis,
    )
    s = jnp.zeros((f.shape[0], f.shape[1], 0), f.dtype) if identity else s
    return _Linearization(
        lin.loss, grad, direction, s, identity, res.iters, res.residual_max, lin.labels_ok
    )


#: ``use_parameter_space(fn, params, x, f, s, b) -> bool`` (static; ``b`` the whole batch's size)
#: or None: row space only
SpaceRule = Callable[..., bool] | None


def solve_exact(problem: SolveProblem, use_parameter_space: SpaceRule) -> _Linearization:
    """The exact direction by one Cholesky: in the ``D x D`` parameter space when
    ``use_parameter_space(fn, params, x, f, s, b)`` says so (static), else in the row space
    (tiled formed Gram, :func:`_gram_solve`): ``Q = qI``, the range form, or Woodbury."""
    fn, params, x, y = problem.model_fn, problem.params, problem.x, problem.y
    loss, damping, gram_strategy = problem.loss, problem.damping, problem.gram_strategy
    curvature, num_samples, key = problem.curvature, problem.num_samples, problem.key
    axis = problem.axis
    lin = linearize(fn, loss, params, x, y, tokens=True, axis=axis)
    f, g = lin.outputs, lin.g
    b = lin.batch_size  # the whole batch; f, g are this device's block (b_local = f.shape[0])
    bl = f.shape[0]
    dt = compute_dtype(f.dtype)
    lam = jnp.asarray(damping, dt)
    blam = b * lam
    flat_fn = _flat_outputs(fn)
    q = loss.identity_scale(f, lin.labels) if curvature == "exact" else None
    if use_parameter_space is not None:
        s = (
            None
            if q is not None
            else _curvature_factor(loss, f, lin.labels, curvature, num_samples, key, axis)
        )
        if use_parameter_space(fn, params, x, f, s, b):
            # d = −(AᵀA/b + λI)⁻¹ ∇L by a D x D Cholesky (A = SᵀJ; Q = I for 2-D squared error)
            grad = lin.grad()
            direction = param_space_direction(fn, params, x, g, s, lam, grad, axis=axis)
            if s is None:
                empty = jnp.zeros(f.shape + (0,), f.dtype)
                return _Linearization(
                    lin.loss, grad, direction, empty, True, labels_ok=lin.labels_ok
                )
            return _Linearization(lin.loss, grad, direction, s, False, labels_ok=lin.labels_ok)

    if q is not None:  # Q = q I: (qK + bλI) u = g, i.e. (K + (bλ/q) I) u = g / q
        gq = g.reshape(bl, -1).astype(dt) / q
        u, gkg = _gram_solve(flat_fn, params, x, gram_strategy, blam / q, gq, axis, True)
        # J d = −K u = (bλu − g)/q since (qK + bλI) u = g: ½ dᵀHd = ‖bλu − g‖² / (2 q b), no JVP
        jd = blam * u - g.reshape(bl, -1).astype(dt)
        if problem.need_grad:
            grad, direction = _grad_and_direction(lin.vjp, g / b, -u.reshape(f.shape))
            slope = grad_norm = None
        else:  # d alone; ∇Lᵀd = gᵀJd / b and ‖∇L‖² = q² (g/q)ᵀK(g/q) / b² from the row space
            direction, grad = lin.vjp(-u.reshape(f.shape).astype(f.dtype)), None
            slope = axis.sum(jnp.sum(g.reshape(bl, -1).astype(dt) * jd)) / (q * b)
            grad_norm = q * jnp.sqrt(jnp.maximum(gkg, 0.0)) / b
        empty = jnp.zeros(f.shape + (0,), f.dtype)
        return _Linearization(
            lin.loss,
            grad,
            direction,
            empty,
            True,
            labels_ok=lin.labels_ok,
            identity_scale=q,
            quad_direction=0.5 * axis.sum(jnp.sum(jnp.square(jd))) / (q * b),
            slope=slope,
            grad_norm=grad_norm,
        )

    s = _curvature_factor(loss, f, lin.labels, curvature, num_samples, key, axis)  # (b, *tok, c, r)
    sd = s.astype(dt)
    tok_r = s.shape[1:-2] + s.shape[-1:]

    def projected(p, xs):  # Sᵀ f, flattened: (n, T·r)
        xx, ss = xs
        out = project(ss, fn(p, xx))
        return out.reshape(out.shape[0], -1)

    s_fixed = (x, jax.lax.stop_gradient(s))
    in_range = _range_coefficients(loss, f, lin.labels) if curvature == "exact" else None
    if in_range is None:
        # Woodbury: d = −(1/λ) Jᵀ(g/b − S v), v = (SᵀKS + bλI)⁻¹ SᵀJ∇L
        grad = lin.grad()
        _, jgrad = jax.jvp(lambda p: fn(p, x), (params,), (grad,))  # J ∇L
        w = project(sd, jgrad.astype(dt)).reshape(bl, -1)  # Sᵀ J ∇L
        v = _gram_solve(projected, params, s_fixed, gram_strategy, blam, w, axis)
        cot = (g.astype(dt) / b - expand(sd, v.reshape((bl,) + tok_r))) / lam
        direction = lin.vjp(-cot.astype(f.dtype))
        # Sᵀ J d = −b v since (SᵀKS + bλI) v = SᵀJ∇L: ½ dᵀHd = b ‖v‖² / 2, no JVP
        quad_d = 0.5 * b * axis.sum(jnp.sum(jnp.square(v)))
        return _Linearization(
            lin.loss, grad, direction, s, False, labels_ok=lin.labels_ok, quad_direction=quad_d
        )

    # range form: g = S t + r per token (r = 0 where g ∈ range(S)); the part S t needs no 1/λ:
    #   d = −Jᵀ S (SᵀKS + bλI)⁻¹ t  −  (1/λ) Jᵀ(r/b − S v_r),  v_r = (SᵀKS + bλI)⁻¹ SᵀJJᵀ r / b
    t, r = in_range
    r = r.astype(f.dtype)

    def range_defect_rhs():  # Sᵀ J Jᵀ r / b and ‖Jᵀr/b‖²: one VJP, one JVP, only when r ≠ 0
        grad_r = lin.vjp(r / b)
        _, jgr = jax.jvp(lambda p: fn(p, x), (params,), (grad_r,))
        sq = jnp.square(tree_norm(grad_r)).astype(dt)
        return project(sd, jgr.astype(dt)).reshape(bl, -1), sq

    # r = 0 for every token whose label has p > tiny (the usual case): the branch is skipped at
    # run time (lax.cond), so the range form costs one solve and one VJP like the identity case
    # (the predicate is a psum over the batch axis: every device takes the same branch)
    tb = t.astype(dt).reshape(bl, -1)
    defect = axis.sum(jnp.sum(jnp.abs(r))) > 0
    rhs_r, grad_r_sq = jax.lax.cond(
        defect, range_defect_rhs, lambda: (jnp.zeros_like(tb), jnp.zeros((), dt))
    )
    rhs = jnp.stack([tb, rhs_r], axis=-1)
    v, tmt = _gram_solve(projected, params, s_fixed, gram_strategy, blam, rhs, axis, True)
    v_t, v_r = (v[..., i].reshape((bl,) + tok_r) for i in range(2))
    cot = expand(sd, v_t) + (r.astype(dt) / b - expand(sd, v_r)) / lam
    # Sᵀ J d = bλ v_t − t − b v_r (from M v_t = t, M v_r = SᵀJJᵀr/b): ½ dᵀHd without a JVP
    sjd = blam * v_t - t.astype(dt) - b * v_r
    quad_d = 0.5 * axis.sum(jnp.sum(jnp.square(sjd))) / b
    if problem.need_grad:
        grad, direction = _grad_and_direction(lin.vjp, g / b, -cot)
        return _Linearization(
            lin.loss, grad, direction, s, False, labels_ok=lin.labels_ok, quad_direction=quad_d
        )
    direction = lin.vjp(-cot.astype(f.dtype))
    # ∇L = Jᵀ(St + r)/b and d = −Jᵀc, c = S v_t + (r/b − S v_r)/λ: every term of ∇Lᵀd and ‖∇L‖²
    # is a row-space product, with SᵀKS v = rhs − bλ v, SᵀKr = b·rhs_r and rᵀKr = b²‖Jᵀr/b‖²
    # (r = 0: ∇Lᵀd = −(tᵀt − bλ tᵀv_t)/b, ‖∇L‖² = tᵀ(SᵀKS)t/b²)
    vt, vr = v_t.reshape(bl, -1), v_r.reshape(bl, -1)

    def dot(a, c):
        return axis.sum(jnp.sum(a * c))

    slope = (
        -(
            dot(tb, tb)
            - blam * dot(tb, vt)
            + b * dot(tb, vr)
            + b * dot(rhs_r, vt)
            + (b * grad_r_sq - b * dot(rhs_r, vr)) / lam
        )
        / b
    )
    grad_norm = jnp.sqrt(jnp.maximum(tmt / b**2 + 2 * dot(tb, rhs_r) / b + grad_r_sq, 0.0))
    return _Linearization(
        lin.loss,
        None,
        direction,
        s,
        False,
        labels_ok=lin.labels_ok,
        quad_direction=quad_d,
        slope=slope,
        grad_norm=grad_norm,
    )


def _grad_and_direction(vjp, grad_cot: jax.Array, direction_cot: jax.Array):
    """``(Jᵀ grad_cot, Jᵀ direction_cot)`` in one two-cotangent VJP (``∇L`` and ``d``)."""
    both = jax.vmap(vjp)(jnp.stack([grad_cot, direction_cot.astype(grad_cot.dtype)]))
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], both) for i in range(2))


def _range_coefficients(loss: Loss, f, labels):
    """``(t, r)`` with ``g = S t + r`` per token and ``r = 0`` where ``g ∈ range(S)``, or None
    when the loss has no closed form (then the Woodbury form is used)."""
    split = getattr(loss, "range_coefficients", None)
    return None if split is None else split(f, labels)


def egn_direction(
    model_fn,
    params: PyTree,
    x: PyTree,
    y: jax.Array,
    *,
    loss: LossLike,
    damping: float | jax.Array,
    gram: Any = "auto",
    curvature: str = "exact",
    num_samples: int = 1,
    key: jax.Array | None = None,
    solver: Any = "cholesky",
    max_cg_iters: int | None = None,
    cg_tol: float = 1e-6,
) -> tuple[PyTree, DirectionInfo]:
    r"""The EGN (Levenberg-Marquardt) direction ``d = −(H + λI)⁻¹ ∇L`` on one mini-batch.

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` (or ``(b,)``) outputs.
        params: any pytree of arrays.
        x: inputs, a pytree of arrays with leading batch axis ``b``.
        y: labels (see :mod:`gaussnewton.losses` for the shapes each loss takes).
        loss: a loss name or :class:`~gaussnewton.losses.Loss`.
        damping: ``λ > 0`` (``λ ≥ 0`` for squared error).
        gram: Gram strategy name (``"auto"``, ``"jacobian"``, ``"matvec"``, ...) or a registered
            strategy object (:func:`gaussnewton.gram.strategy_name`).
        curvature: ``"exact"`` (``Q``) or ``"sampled"`` (Monte-Carlo factor with ``num_samples``
            columns per example, needs ``key``).
        solver: a solver object of :mod:`gaussnewton.solvers` —
            :class:`~gaussnewton.RowCholesky` (formed Gram), :class:`~gaussnewton.ParamCholesky`
            (``D x D``), :class:`~gaussnewton.RowCG` (row-space CG with matrix-free ``K v``
            products) or :class:`~gaussnewton.AutoSolver` — or its name ``"cholesky"``,
            ``"param"``, ``"cg"``, ``"auto"``. With ``"cg"`` the flattened ``max_cg_iters`` /
            ``cg_tol`` are its ``RowCG(max_iters=..., tol=...)`` (kept for compatibility).

    Returns:
        ``(d, info)`` with ``d`` shaped like ``params`` (``params + d`` is the full LM step) and a
        :class:`DirectionInfo`.

    Called on concrete arrays (outside ``jax.jit``) it runs compiled: concrete labels are checked
    by value (ValueError), then one ``jax.jit`` per configuration (``model_fn``, loss, Gram
    strategy, curvature, samples, solver; the 32 most recent are kept, with what ``model_fn``
    holds) runs it. An unhashable configuration runs op by op. Under ``jax.jit`` it is traced
    inline.
    """
    loss_obj = get_loss(loss)
    if not isinstance(damping, jax.core.Tracer):
        v.check_number(
            "damping",
            damping,
            strict=not loss_obj.identity_curvature or curvature == "sampled",
            hint="λ must be > 0 for this loss (λ = 0 is allowed for squared error); e.g. 1e-3.",
        )
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r} is unknown; use one of {CURVATURES}.")
    from gaussnewton.solvers import as_solver  # solvers builds on this module

    solver_obj = as_solver(solver, max_cg_iters=max_cg_iters, cg_tol=cg_tol)
    static = (model_fn, loss_obj, strategy_name(gram), curvature, num_samples, solver_obj)
    args = (params, x, y, damping, key)
    if not any_traced(args):  # called eagerly: check concrete labels, then run compiled
        compiled = _compiled_direction(static, _trace_settings())
        if compiled is not None:
            shape_key = (model_fn, tree_signature((params, x)))
            f = cached_eval_shape(_OUTPUT_SHAPES, shape_key, with_output_axis(model_fn), params, x)
            loss_obj.check_labels(f, y)
            return compiled(*args)
    return _direction(static, *args)


def _direction(static: tuple, params, x, y, damping, key) -> tuple[PyTree, DirectionInfo]:
    model_fn, loss_obj, gram, curvature, num_samples, solver_obj = static
    lin = linearize_and_solve(
        model_fn,
        params,
        x,
        y,
        loss=loss_obj,
        damping=damping,
        gram_strategy=gram,
        curvature=curvature,
        num_samples=num_samples,
        key=key,
        solver=solver_obj,
    )
    info = DirectionInfo(
        loss=lin.loss,
        grad=lin.grad,
        grad_norm=tree_norm(lin.grad),
        direction_norm=tree_norm(lin.direction),
        directional_derivative=tree_vdot(lin.grad, lin.direction),
    )
    return lin.direction, info


def _compiled_direction(static: tuple, settings: tuple) -> Callable | None:
    """``jax.jit`` of :func:`_direction` for one static configuration (cached: a call with the
    same model function, loss, Gram strategy and solver, under the same :func:`_trace_settings`,
    reuses its compilations), or None when the configuration is not hashable (then the call runs
    op by op)."""
    try:
        return _jit_direction(static, settings)
    except TypeError:  # an unhashable model function, loss or solver
        return None


@functools.lru_cache(maxsize=32)
def _jit_direction(static: tuple, settings: tuple) -> Callable:
    return jax.jit(functools.partial(_direction, static))


def _trace_settings() -> tuple:
    """The module state a trace reads: the solve backend and block sizes of
    :mod:`gaussnewton.linalg` and the registered Gram rules (a change gives a new compilation)."""
    return (
        linalg.get_backend(),
        linalg.TILE_ROWS,
        linalg.LEAF_ROWS,
        linalg.MAX_TILES,
        tuple((name, id(rule)) for name, rule in RULES.items()),
    )


#: ``(model_fn, input signature) -> output shape`` of eager calls (:func:`cached_eval_shape`)
_OUTPUT_SHAPES: dict = {}
