"""Structured Gram engine: the empirical NTK ``J J^T`` of an ordinary JAX function, without ``J``.

The model is traced (per example) to a jaxpr; every parameter leaf is followed through views to
its uses. Dense uses (``dot_general``) get the factored rule ``(a . a)(G . G)`` summed over
position pairs; other uses (bias, scale, conv, embedding) and anything unrecognized (scan bodies,
custom_vjp, ...) get per-example gradients of THAT leaf only. See METHODS.md section 3.3.

Public:
  structured_gram(model_fn, params, x1, x2=None) -> K (n1, k, n2, k)
  explain(model_fn, params, x1, x2=None) -> {leaf name: LeafPlan}   (introspection)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._assemble import make_plan, structured_gram
from ._cost import LeafPlan

__all__ = ["LeafPlan", "explain", "structured_gram"]


def explain(
    model_fn: Callable, params: Any, x1: Any, x2: Any = None, *, dense_method: str = "auto"
) -> dict[str, LeafPlan]:
    """Report, per parameter leaf (by key path), the rule :func:`structured_gram` uses.

    ``LeafPlan.rule`` is the recognized rule (``"dense"``, ``"bias"``, ``"scale"``, ``"conv"``,
    ``"embedding"``, ``"mixed"``) or ``"fallback"`` (an unrecognized use, see ``reason``),
    ``"unused"``, ``"non-float"``; ``LeafPlan.method`` is ``"factored"`` (dense rule),
    ``"per-example-gradient"`` (that leaf's per-example gradients) or ``"none"``.
    """
    _, plans = make_plan(model_fn, params, x1, x2, dense_method)
    return {p.name: p for p in plans}
