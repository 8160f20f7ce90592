r"""The exact LM direction solved in PARAMETER space, for models with few parameters (METHODS §2).

The EGN direction is defined in parameter space,

.. math:: d = -\Big(\tfrac1b A^\top A + λI\Big)^{-1} \nabla L, \qquad A = S^\top J \in
          \mathbb{R}^{(b r) \times D},\quad \nabla L = \tfrac1b J^\top g ,

(``S = I``, ``A = J``, for squared error; ``S`` the exact or sampled curvature factor otherwise).
The row-space solve (:mod:`gaussnewton.directions`) needs a ``(b r) x (b r)`` system; when the model
has FEWER parameters than rows (``D < b r``: quadratic LQR features with ``D = 36`` or ``105`` and
``b >= 128``; the sine MLP with ``D = 901`` and ``b = 1000``) the ``D x D`` system is smaller. Here
the per-example Jacobian ``J`` (``(b, c, D)``) is formed by ``jax.vmap`` over the examples of
``jax.jacrev`` of one example (``c`` reverse passes each: about ``6 b c D`` flops, linear in ``D``;
``jax.jacfwd`` over the ``D`` parameters would cost ``D`` batched forward passes, ``~4 b D²``, which
was 20x slower on the sine MLP), ``AᵀA / b`` by one product and the system by one damped Cholesky
(:func:`gaussnewton.linalg.solve_damped_spd`, which follows the library's BLAS policy).
Both solves give the same ``d`` up to rounding (push-through / Woodbury identity).

:func:`choose_space` is the cost rule ``solver="auto"`` can use to pick the space.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from gaussnewton.param_space import param_space_direction
    >>> fn = lambda p, x: x @ p["w"]
    >>> p, x = {"w": jnp.ones((3, 1))}, jnp.eye(4, 3)
    >>> g = fn(p, x) - 1.0  # squared error against y = 1
    >>> d = param_space_direction(fn, p, x, g, None, 1e-3)
    >>> d["w"].shape
    (3, 1)
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gaussnewton._sharding import NO_AXIS, BatchAxis, reduced
from gaussnewton._tree import compute_dtype
from gaussnewton.gram import as_2d
from gaussnewton.linalg import solve_damped_spd

PyTree = Any

__all__ = ["param_space_direction", "choose_space", "space_costs"]

_HI = jax.lax.Precision.HIGHEST


def param_space_direction(
    fn,
    params: PyTree,
    x: PyTree,
    g: jax.Array,
    s: jax.Array | None,
    lam: float | jax.Array,
    grad: PyTree | None = None,
    *,
    axis: BatchAxis = NO_AXIS,
) -> PyTree:
    r"""``d = −(AᵀA / b + λI)⁻¹ ∇L`` with ``A = SᵀJ``, by a ``D x D`` Cholesky (``D`` parameters).

    Args:
        fn: ``fn(params, x) -> (b, c)`` (or ``(b,)``) model outputs.
        params: any pytree of arrays (``D`` entries in all).
        x: the inputs (leading batch axis ``b``).
        g: ``(b, c)`` gradients of the per-example losses w.r.t. the outputs.
        s: ``(b, c, r)`` curvature factor (``Q_i = S_i S_iᵀ``; exact or sampled), or ``None`` for
            ``Q = I`` (squared error).
        lam: damping ``λ`` (``> 0``, or ``>= 0`` when ``AᵀA`` is non-singular).
        grad: ``∇L = Jᵀ g / b`` if already computed, else ``None`` (computed from ``J`` and ``g``).
        axis: the batch axis inside ``shard_map`` (``x``, ``g``, ``s``: this device's block;
            ``AᵀA`` and ``Jᵀg`` are summed over the devices, the ``D x D`` solve is replicated).

    Returns:
        ``d`` shaped like ``params``. Non-finite entries mean a singular system (``λ = 0``).

    The model must treat examples independently (a batch of one is evaluated per example).
    Cost: ``b c`` single-example reverse passes for ``J`` (``b c D`` entries), ``2 b r D²`` flops
    for ``AᵀA`` and ``D³/3`` for the Cholesky; memory ``b c D + D²``. See :func:`choose_space`.
    """
    fn2 = as_2d(fn)
    flat, unravel = ravel_pytree(params)
    dt = compute_dtype(flat.dtype)

    local = axis.varying(flat)  # this device's examples only (no implicit psum)

    def one(xi):  # the (c, D) Jacobian of one example: c reverse passes through a batch of 1
        xi = jax.tree_util.tree_map(lambda a: a[None], xi)
        return jax.jacrev(lambda w: fn2(unravel(w), xi)[0])(local)

    jac = jax.vmap(one)(x).astype(dt)  # (b, c, D)
    b = jac.shape[0] * axis.size()
    g = jnp.asarray(g, dt).reshape(jac.shape[:2])
    a = jac if s is None else jnp.einsum("bcr,bcd->brd", jnp.asarray(s, dt), jac, precision=_HI)
    a = a.reshape(-1, flat.size)
    if grad is None:
        gflat = axis.sum(jnp.einsum("bcd,bc->d", jac, g, precision=_HI, out_sharding=reduced()))
        gflat = gflat / b
    else:
        gflat = ravel_pytree(grad)[0].astype(dt)
    h = axis.sum(jnp.matmul(a.T, a, precision=_HI, out_sharding=reduced())) / b
    d = -solve_damped_spd(h, jnp.asarray(lam, dt), gflat)
    return unravel(d.astype(flat.dtype))


def space_costs(num_params: int, num_rows: int, gram_flops: float | None = None) -> dict:
    r"""Flop and memory estimates of one exact LM solve in each space.

    With ``D = num_params`` and ``n = num_rows`` (``b r``, the row-space order):

    * ``"row"``: the Gram (``gram_flops``; default ``n² D``, half of the ``2 n² D`` of a formed
      Jacobian, because the structured Gram of layered models is cheaper: a dense ``p x q``
      layer costs ``2 n² (p + q)``, not ``2 n² p q``) + Cholesky ``n³/3``; memory ``n²`` entries.
    * ``"param"``: ``AᵀA`` (``2 n D²``) + Cholesky ``D³/3``; memory ``n D + D²`` (``J``, ``AᵀA``).

    The per-example Jacobian (``~6 b c D`` flops) and the passes both spaces need (forward, VJP
    back) are left out: they are linear in ``D`` and ``n``.
    Returns ``{"row": (flops, entries), "param": (flops, entries)}``.
    """
    d, n = int(num_params), int(num_rows)
    gram = float(n * n * d) if gram_flops is None else float(gram_flops)
    return {"row": (gram + n**3 / 3, n * n), "param": (2 * n * d * d + d**3 / 3, n * d + d * d)}


def choose_space(
    num_params: int,
    num_rows: int,
    *,
    gram_flops: float | None = None,
    max_entries: float = 2**28,
) -> Literal["row", "param"]:
    r"""``"param"`` when the parameter-space solve needs fewer flops (:func:`space_costs`) and its
    memory (``n D + D²`` entries) fits ``max_entries``; else ``"row"``.

    With the default Gram estimate and ``t = D / n`` the rule compares ``t + 1/3`` (row) with
    ``2t² + t³/3`` (param): parameter space for ``D < 0.68 n``, never for ``D >= n``. Measured
    on the 2-core CPU here (``benchmarks/bench_gram.py --only "D="``, plain step, float32): LQR
    quadratic features ``D = 36, b = 256``: 0.33 ms (param) against 3.6 ms (row); ``D = 105,
    b = 128`` (``t = 0.82``): a tie (0.93 against 1.01 ms); the sine MLP ``D = 901, b = 1000``
    (``t = 0.9``): 181 ms (param) against 93 ms (row). Pass ``gram_flops`` when the row-space
    Gram cost is known (e.g. from the structured engine's cost model).

    Example:
        >>> from gaussnewton.param_space import choose_space
        >>> choose_space(36, 128), choose_space(105, 256), choose_space(901, 1000)
        ('param', 'param', 'row')
        >>> choose_space(235146, 1152)
        'row'
    """
    for name, value in (("num_params", num_params), ("num_rows", num_rows)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    c = space_costs(num_params, num_rows, gram_flops)
    if c["param"][1] > max_entries:
        return "row"
    return "param" if c["param"][0] < c["row"][0] else "row"
