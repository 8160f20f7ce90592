r"""The exact LM direction solved in PARAMETER space, for models with few parameters (METHODS §2).

The EGN direction is defined in parameter space,

.. math:: d = -\Big(\tfrac1b A^\top A + λI\Big)^{-1} \nabla L, \qquad A = S^\top J \in
          \mathbb{R}^{(b r) \times D},\quad \nabla L = \tfrac1b J^\top g ,

(``S = I``, ``A = J``, for squared error; ``S`` the exact or sampled curvature factor otherwise).
The row-space solve (:mod:`gaussnewton.directions`) needs a ``(b r) x (b r)`` system; when the model
has FEWER parameters than rows (``D < b r``: quadratic LQR features with ``D = 36`` or ``105`` and
``b >= 128``; the sine MLP with ``D = 901`` and ``b = 1000``) the ``D x D`` system is smaller. Here
the per-example Jacobian ``J`` (``(b, c, D)``) is formed by ``D`` forward-mode passes
(``jax.jacfwd`` of the raveled parameters, cheaper than ``b c`` reverse passes when ``D < b c``),
``AᵀA / b`` by one product and the system by one damped Cholesky
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

    Returns:
        ``d`` shaped like ``params``. Non-finite entries mean a singular system (``λ = 0``).

    Cost: ``D`` JVPs for ``J`` (``b c D`` entries), ``2 b r D²`` flops for ``AᵀA`` and ``D³/3`` for
    the Cholesky; memory ``b c D + D²``. See :func:`choose_space`.
    """
    fn2 = as_2d(fn)
    flat, unravel = ravel_pytree(params)
    dt = compute_dtype(flat.dtype)
    jac = jax.jacfwd(lambda w: fn2(unravel(w), x))(flat).astype(dt)  # (b, c, D)
    b = jac.shape[0]
    g = jnp.asarray(g, dt).reshape(jac.shape[:2])
    a = jac if s is None else jnp.einsum("bcr,bcd->brd", jnp.asarray(s, dt), jac, precision=_HI)
    a = a.reshape(-1, flat.size)
    if grad is None:
        gflat = jnp.einsum("bcd,bc->d", jac, g, precision=_HI) / b
    else:
        gflat = ravel_pytree(grad)[0].astype(dt)
    h = jnp.matmul(a.T, a, precision=_HI) / b
    d = -solve_damped_spd(h, jnp.asarray(lam, dt), gflat)
    return unravel(d.astype(flat.dtype))


def space_costs(num_params: int, num_rows: int, num_outputs: int | None = None) -> dict:
    r"""Flop and memory estimates of one exact LM solve in each space.

    With ``D = num_params``, ``n = num_rows`` (``b r``: the row-space order) and ``m =
    num_outputs`` (``b c``, the rows of ``J``; default ``n``):

    * ``"row"``: Gram ``K = A Aᵀ`` (``2 n² D`` flops through a formed ``J``; the structured Gram is
      cheaper, never more) + Cholesky ``n³/3``; memory ``n²`` (+ ``m D`` when ``J`` is formed).
    * ``"param"``: ``J`` by ``D`` JVPs (about ``2 m D`` flops each, ``2 m D²``), ``AᵀA``
      (``2 n D²``) + Cholesky ``D³/3``; memory ``m D + D²``.

    Returns ``{"row": (flops, entries), "param": (flops, entries)}``.
    """
    d, n = int(num_params), int(num_rows)
    m = n if num_outputs is None else int(num_outputs)
    row = (2 * n * n * d + n**3 / 3, n * n)
    param = (2 * m * d * d + 2 * n * d * d + d**3 / 3, m * d + d * d)
    return {"row": row, "param": param}


def choose_space(
    num_params: int,
    num_rows: int,
    num_outputs: int | None = None,
    *,
    max_entries: float = 2**28,
) -> Literal["row", "param"]:
    r"""``"param"`` when the parameter-space solve is cheaper in flops (see :func:`space_costs`)
    and its memory (``b c D + D²`` entries) fits ``max_entries``; else ``"row"``.

    The flop ratio is ``(2 n² D + n³/3) / (2 (m + n) D² + D³/3)``, about ``n / (2 D)`` for
    ``D ≪ n = m``: the parameter space wins roughly when ``D < n / 2`` (the ``D`` forward passes
    for ``J`` count twice the products of the row-space Gram). Because the structured row-space
    Gram does fewer flops than ``2 n² D``, the rule leans to ``"row"``.

    Example:
        >>> from gaussnewton.param_space import choose_space
        >>> choose_space(36, 128), choose_space(901, 1000), choose_space(901, 4000)
        ('param', 'row', 'param')
        >>> choose_space(235146, 1152)
        'row'
    """
    for name, value in (("num_params", num_params), ("num_rows", num_rows)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    c = space_costs(num_params, num_rows, num_outputs)
    if c["param"][1] > max_entries:
        return "row"
    return "param" if c["param"][0] < c["row"][0] else "row"
