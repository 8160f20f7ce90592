"""Per-leaf plan: which rule, and factored form or per-example gradients (the flop model).

For every parameter leaf the analysis lists its uses, each matched by a registered rule
(``_registry.py``). The leaf is factored when every use's rule has a factored form of one
``family`` (the dense and conv rules share ``"linear"``), each use has a form
(:meth:`GramRule.form`: a grouped conv or a gather of partial rows has none), the first use's
canonical index array is a bijection onto the leaf and every use has the same one (the uses are
then merged along positions, which adds their cross terms). Otherwise, and when the flop model of
the first use's rule (:meth:`GramRule.cost`) prefers it, the leaf takes per-example gradients
(exact). The factored form is also avoided when its intermediates would exceed ``MEMORY_CAP``
entries (long sequences, large feature maps) and per-example gradients are smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._analysis import LeafUses
from ._registry import get_rule
from ._rules import DENSE, FALLBACK, MIXED, NONE, PERGRAD, UNUSED, is_bijection


@dataclass
class LeafPlan:
    """What the engine does for one parameter leaf.

    Attributes:
      name: the leaf's key path (``jax.tree_util.keystr``).
      rule: the structured rule recognized for all uses of the leaf (a registered rule's name:
        built in ``"dense"``, ``"bias"``, ``"scale"``, ``"conv"``, ``"embedding"``), ``"mixed"``
        (uses of several rules), or ``"fallback"`` (some use is not recognized), ``"unused"``,
        ``"non-float"``.
      method: how its Gram block is computed: ``"factored"`` (a rule's factored form: dense,
        conv, embedding, or a bias merged into one), ``"per-example-gradient"``, ``"none"``.
      kinds: rule names of the recognized uses.
      reason: why a per-example gradient or the fallback was chosen.
      cost_dense / cost_pergrad: flop estimates (``None`` when not applicable).
      forms: the factored forms of the uses (each rule's own layout record).
      coupling: for a batch-coupled model, the :class:`gaussnewton.gram.Coupling` that sent every
        leaf to the whole-batch method (``method`` ``"whole-batch-jacobian"`` or
        ``"whole-batch-matvec"``); ``None`` for per-example models.
      sites: for a factored leaf, ``(equation path, rule)`` of each use (parallel to ``forms``):
        where the assembly records the use's factors and which rule forms them.
    """

    name: str
    rule: str
    method: str = NONE
    kinds: tuple[str, ...] = ()
    reason: str = ""
    cost_dense: float | None = None
    cost_pergrad: float | None = None
    forms: list[Any] = field(default_factory=list, repr=False)
    coupling: Any = field(default=None, repr=False)  # Coupling of a batch-coupled model, else None
    sites: list[tuple[tuple[int, ...], Any]] = field(default_factory=list, repr=False)


#: the factored form's intermediates are avoided above this many entries when the per-example
#: gradients are smaller (2^27 float32 entries = 512 MiB).
MEMORY_CAP = 1 << 27


def _pergrad_better(cost_dense: float, cost_pergrad: float, mem_dense: int, mem_pergrad: int):
    """Per-example gradients win on flops, or when the factored form alone would blow memory."""
    if mem_dense > MEMORY_CAP and mem_pergrad < mem_dense:
        return True
    return cost_dense > cost_pergrad


DENSE_METHODS = ("auto", DENSE, PERGRAD)


def plan_leaf(
    name: str, found: LeafUses, size: int, n1: int, n2: int, k: int, dense_method: str = "auto"
) -> LeafPlan:
    """Choose the rule for one leaf of ``size`` entries (batch sizes ``n1``, ``n2``, ``k`` outputs).

    ``dense_method`` overrides the flop model for leaves with a factored form (``"factored"``
    or ``"per-example-gradient"``); ``"auto"`` picks the cheaper. Uses of one leaf share the
    factored form (merged along positions) when their rules share a family and their canonical
    layouts agree.
    """
    kinds = tuple(sorted({u.kind for u in found.uses}))
    if found.fallback is not None:
        return LeafPlan(name, FALLBACK, PERGRAD, kinds, found.fallback)
    if not found.uses:
        return LeafPlan(name, UNUSED)
    rule = kinds[0] if len(kinds) == 1 else MIXED
    rules = [get_rule(u.kind) for u in found.uses]
    lead = rules[0]
    if lead.family is None or any(r.family != lead.family for r in rules):
        return LeafPlan(name, rule, PERGRAD, kinds, "per-example gradient of the leaf (exact)")
    got = []
    for r, u in zip(rules, found.uses, strict=True):
        g = r.form(u)
        if isinstance(g, str):  # this use has no factored form: g is why
            return LeafPlan(name, rule, PERGRAD, kinds, g)
        got.append(g)
    forms, canons = zip(*got, strict=True)
    if not is_bijection(canons[0], size):
        return LeafPlan(name, rule, PERGRAD, kinds, lead.layout_reason(kinds, bijective=False))
    if any(c.shape != canons[0].shape or not np.array_equal(c, canons[0]) for c in canons[1:]):
        return LeafPlan(name, rule, PERGRAD, kinds, lead.layout_reason(kinds, bijective=True))
    cost_dense, cost_pergrad, *mem = lead.cost(forms, size, n1, n2, k)
    cost_dense, cost_pergrad = float(cost_dense), float(cost_pergrad)
    plan = LeafPlan(name, rule, DENSE, kinds, "", cost_dense, cost_pergrad, list(forms))
    plan.sites = [(u.path, r) for r, u in zip(rules, found.uses, strict=True)]
    if dense_method == PERGRAD or (
        dense_method == "auto" and _pergrad_better(cost_dense, cost_pergrad, *mem)
    ):
        plan.method, plan.forms, plan.sites = PERGRAD, [], []
        plan.reason = (
            "per-example gradients requested"
            if dense_method == PERGRAD
            else "per-example gradients are cheaper (flop model)"
        )
    return plan
