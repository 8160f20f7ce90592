r"""Solver objects: how EGN solves its Levenberg-Marquardt system (docs/METHODS.md §2, §4.1).

Every solver computes the same direction ``d = −(H + λI)⁻¹ ∇L`` of the mini-batch GGN
``H = JᵀQJ / b`` (exactly, or to a CG tolerance); they differ in the system they factor:

=========================  ==========================================  ==========================
object                     system                                      cost (``n = b·r`` rows)
=========================  ==========================================  ==========================
:class:`RowCholesky`       row space, formed Gram: ``(K + bλI) u = g``  ``n²`` Gram entries (tiled)
                           or ``(SᵀKS + bλI) v = SᵀJ∇L``               + ``n³/3`` Cholesky
:class:`ParamCholesky`     parameter space ``(AᵀA/b + λI) d = −∇L``    ``n D²`` + ``D³/3``
                           (``A = SᵀJ``, ``D`` parameters)
:class:`RowCG`             the row-space system by CG, matrix-free     ``≤ max_iters`` JVP+VJP
                           ``K v`` products                            pairs, no ``n²`` memory
:class:`AutoSolver`        the cheaper exact space of the two          the smaller of the first
                           Cholesky forms (:func:`~gaussnewton.        two (the model's examples
                           param_space.choose_space`)                  must be independent)
=========================  ==========================================  ==========================

The constructors accept a solver object or its name (``"cholesky"``, ``"param"``, ``"cg"``,
``"auto"``, see :func:`as_solver`); the flattened ``max_cg_iters`` / ``cg_tol`` /
``cg_warm_start`` of the string form are folded into :class:`RowCG`.

A solver is one class: a frozen dataclass with ``name`` (a string), ``carries_direction`` (whether
the method keeps the last direction as the next solve's warm start) and
``solve(problem: directions.SolveProblem) -> directions._Linearization`` (internal protocol: it
calls :func:`gaussnewton.directions.solve_exact` with its space rule, or its own solve).

Example:
    >>> import jax.numpy as jnp
    >>> import gaussnewton as gn
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 2)) * 0.1}
    >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
    >>> d1, _ = gn.egn_direction(fn, p, x, y, loss="squared_error", damping=1e-3, solver=gn.RowCholesky())
    >>> d2, _ = gn.egn_direction(fn, p, x, y, loss="squared_error", damping=1e-3, solver="cholesky")
    >>> bool(jnp.allclose(d1["w1"], d2["w1"]))
    True
    >>> gn.RowCG(max_iters=20, tol=1e-8)
    RowCG(max_iters=20, tol=1e-08, warm_start=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from gaussnewton import _validate as v
from gaussnewton._tree import tree_size
from gaussnewton.directions import SOLVERS, SolveProblem, solve_exact, solve_row_cg
from gaussnewton.gram import batch_coupling
from gaussnewton.param_space import choose_space

__all__ = ["RowCholesky", "ParamCholesky", "RowCG", "AutoSolver", "as_solver", "SOLVER_CLASSES"]


@dataclasses.dataclass(frozen=True)
class RowCholesky:
    r"""The row-space Cholesky with the Gram formed tile by tile (METHODS §2).

    Solves ``(K + bλI) u = g`` when ``Q = I`` (``d = −Jᵀu``), else the ``S``-projected system
    ``(SᵀKS + bλI) v = SᵀJ∇L`` (Woodbury, or the range form when the loss splits
    ``g = St + r``): ``n = b·r`` unknowns. Cost: ``n²`` Gram entries from per-example factors
    (the ``gram=`` strategy), only the lower tiles, and one ``n³/3`` tiled Cholesky; memory ``n²``.

    Example:
        >>> import gaussnewton as gn
        >>> opt = gn.egn(lambda p, x: x @ p, loss="squared_error", solver=gn.RowCholesky())
    """

    name: ClassVar[str] = "cholesky"
    carries_direction: ClassVar[bool] = False

    def solve(self, problem: SolveProblem):
        return solve_exact(problem, None)


@dataclasses.dataclass(frozen=True)
class ParamCholesky:
    r"""The ``D x D`` parameter-space Cholesky: ``(AᵀA/b + λI) d = −∇L`` with ``A = SᵀJ``.

    The same exact direction as :class:`RowCholesky`, factored in the parameter space: cost
    ``b·r·D²`` to form ``AᵀA`` from per-example Jacobians plus ``D³/3``; memory ``D²``. Cheaper
    when ``D`` is well below ``b·r``. Needs ``(b, c)`` outputs (no per-token outputs) and a model
    whose examples are independent (raises otherwise, naming the coupling).

    Example:
        >>> import gaussnewton as gn
        >>> opt = gn.egn(lambda p, x: x @ p, loss="squared_error", solver=gn.ParamCholesky())
    """

    name: ClassVar[str] = "param"
    carries_direction: ClassVar[bool] = False

    def use_parameter_space(self, fn, params, x, f, s, b: int | None = None) -> bool:
        """Always (static); raises for per-token outputs or batch-coupled models."""
        if f.ndim != 2:
            raise ValueError(
                "solver='param' takes (b, c) outputs; use solver='cholesky' for per-token outputs."
            )
        coupling = batch_coupling(fn, params, x)
        if coupling.coupled:
            raise ValueError(
                "solver='param' forms per-example Jacobians, but this model couples the examples "
                f"of a batch ({coupling.summary()}); use solver='auto' or 'cholesky'."
            )
        return True

    def solve(self, problem: SolveProblem):
        return solve_exact(problem, self.use_parameter_space)


@dataclasses.dataclass(frozen=True)
class AutoSolver:
    r"""The cheaper exact space: :class:`ParamCholesky` when
    :func:`~gaussnewton.param_space.choose_space` models it cheaper (``D`` well below ``b·r``) and
    the examples are independent, else :class:`RowCholesky`. The decision is static (shapes and
    the model's jaxpr), so it costs nothing at run time; the direction is the same either way.

    Example:
        >>> import gaussnewton as gn
        >>> opt = gn.egn(lambda p, x: x @ p, loss="squared_error", solver=gn.AutoSolver())
    """

    name: ClassVar[str] = "auto"
    carries_direction: ClassVar[bool] = False

    def use_parameter_space(self, fn, params, x, f, s, b: int | None = None) -> bool:
        """Whether ``D x D`` is cheaper and allowed (per-example rows, independent examples)."""
        if f.ndim != 2:
            return False
        rows = (f.shape[0] if b is None else b) * (f.shape[1] if s is None else s.shape[-1])
        if choose_space(tree_size(params), rows) != "param":
            return False
        # the per-example Jacobians of a batch-coupled model are not rows of the batch Jacobian
        return not batch_coupling(fn, params, x).coupled

    def solve(self, problem: SolveProblem):
        return solve_exact(problem, self.use_parameter_space)


@dataclasses.dataclass(frozen=True)
class RowCG:
    r"""The row-space system by conjugate gradients with matrix-free ``K v`` products (METHODS §4.1).

    Solves the :class:`RowCholesky` system without forming ``K``: each iteration is one JVP and
    one VJP of the batch (``K v = J Jᵀ v``), memory ``O(b·c + D)``. Stops after ``max_iters``
    iterations (``None``: the row-space dimension ``b·c``, exact in exact arithmetic) or when the
    residual max-norm is ``<= tol``. With ``warm_start`` an optimizer starts each solve from the
    previous step's direction mapped to the row space (:mod:`gaussnewton.cg`); the ``gram=``
    strategy is not used. ``info.cg_iters`` / ``info.cg_residual`` report the solve.

    Args:
        max_iters: ``None`` or an integer ``>= 0``.
        tol: residual max-norm tolerance, a finite number ``>= 0``.
        warm_start: ``True`` / ``False``.

    Example:
        >>> import gaussnewton as gn
        >>> opt = gn.egn(lambda p, x: x @ p, loss="squared_error", solver=gn.RowCG(max_iters=20))
    """

    max_iters: int | None = None
    tol: float = 1e-6
    warm_start: bool = True

    name: ClassVar[str] = "cg"

    def __post_init__(self) -> None:
        if self.max_iters is not None:
            _check_iters("RowCG: max_iters", self.max_iters)
        if callable(self.tol):
            raise TypeError(f"RowCG(tol={self.tol!r}) must be a number, not a schedule.")
        v.check_number("RowCG: tol", self.tol, strict=False, hint="e.g. RowCG(tol=1e-6).")
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"RowCG(warm_start={self.warm_start!r}) must be True or False.")

    @property
    def carries_direction(self) -> bool:  # type: ignore[override]
        return self.warm_start

    def solve(self, problem: SolveProblem):
        return solve_row_cg(problem, self.max_iters, self.tol)


#: the solver classes by their string name (the ``solver=`` strings)
SOLVER_CLASSES: dict[str, type] = {
    cls.name: cls for cls in (AutoSolver, RowCholesky, ParamCholesky, RowCG)
}
assert set(SOLVER_CLASSES) == set(SOLVERS)


def _check_iters(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name}={value!r} must be None or an integer >= 0 (e.g. 50; None: the row-space "
            "dimension)."
        )


def as_solver(
    solver: Any,
    *,
    max_cg_iters: int | None = None,
    cg_tol: float = 1e-6,
    cg_warm_start: bool = True,
) -> Any:
    """The solver object of a ``solver=`` argument: an object is returned as is, a name
    (``"auto"``, ``"cholesky"``, ``"param"``, ``"cg"``) gives its class, with the flattened
    ``max_cg_iters`` / ``cg_tol`` / ``cg_warm_start`` folded into :class:`RowCG` (they are
    validated for every solver, as before, and must keep their defaults with a solver object).

    Example:
        >>> from gaussnewton.solvers import as_solver
        >>> as_solver("cg", max_cg_iters=30)
        RowCG(max_iters=30, tol=1e-06, warm_start=True)
    """
    if max_cg_iters is not None:
        _check_iters("max_cg_iters", max_cg_iters)
    v.check_number("cg_tol", cg_tol, strict=False, hint="e.g. cg_tol=1e-6.")
    if isinstance(solver, str):
        if solver not in SOLVER_CLASSES:
            raise ValueError(
                f"solver={solver!r} is unknown; use one of {SOLVERS} or a solver object "
                "(gn.RowCholesky(), gn.ParamCholesky(), gn.RowCG(...), gn.AutoSolver())."
            )
        if solver == "cg":
            return RowCG(max_iters=max_cg_iters, tol=cg_tol, warm_start=bool(cg_warm_start))
        return SOLVER_CLASSES[solver]()
    if not (callable(getattr(solver, "solve", None)) and hasattr(solver, "carries_direction")):
        raise TypeError(
            f"solver={solver!r} is not a solver; use one of {SOLVERS} or a solver object "
            "(gn.RowCholesky(), gn.ParamCholesky(), gn.RowCG(...), gn.AutoSolver())."
        )
    flattened = {"max_cg_iters": (max_cg_iters, None), "cg_tol": (cg_tol, 1e-6)}
    flattened["cg_warm_start"] = (cg_warm_start, True)
    for name, (value, default) in flattened.items():
        if value != default:
            raise ValueError(
                f"{name}={value!r} is a sub-option of the string solver='cg'; with the solver "
                f"object {solver!r} set it on the object, e.g. solver=gn.RowCG(max_iters=..., "
                "tol=..., warm_start=...)."
            )
    return solver
