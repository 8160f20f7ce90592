"""The registry of structured Gram rules: the built-ins and those added by :func:`register_rule`.

The analysis asks :func:`find_rule` which rule an equation is (registered rules are tried newest
first, then the built-ins), the plan asks :func:`get_rule` by name, and ``make_plan`` lets every
rule :meth:`~GramRule.refine` the plans. Rules are read when a model is traced: register them
before the first ``jax.jit`` trace of a step that should use them.
"""

from __future__ import annotations

from typing import Any

from ._dense import ConvRule, DenseRule
from ._embedding import EmbeddingRule
from ._rules import RESERVED, BiasRule, GramRule, ScaleRule

_BUILTIN = (DenseRule(), BiasRule(), ScaleRule(), ConvRule(), EmbeddingRule())
_BUILTIN_NAMES = frozenset(r.name for r in _BUILTIN)
#: name -> rule, in registration order (built-ins first)
RULES: dict[str, GramRule] = {r.name: r for r in _BUILTIN}
#: the methods a rule with a factored form (``family`` not None) must define
_FACTORED_METHODS = ("form", "cost", "activation", "factor", "block")


def find_rule(eqn: Any, operand: int) -> GramRule | None:
    """The rule for ``eqn`` whose operand ``operand`` (only) derives from a parameter leaf."""
    name = eqn.primitive.name
    for rule in reversed(RULES.values()):  # newest first: a registered rule wins over a built-in
        if name in rule.primitives and rule.match(eqn, operand):
            return rule
    return None


def get_rule(name: str) -> GramRule:
    return RULES[name]


def producer_primitives() -> frozenset[str]:
    """Primitives whose outputs the analysis follows for a bias to fold into (``producers``)."""
    return frozenset().union(*(r.producers for r in RULES.values()))


def register_rule(rule: GramRule) -> GramRule:
    """Add a structured Gram rule (a :class:`GramRule` instance) to the engine; returns it.

    From the next trace on, :func:`gaussnewton.gram.structured.structured_gram` (``gram=
    "structured"`` / ``"auto"`` in every method), ``structured_factors`` and
    :func:`gaussnewton.explain_gram` try it on every equation that uses a parameter leaf, before
    the rules registered earlier and the built-ins (``"dense"``, ``"bias"``, ``"scale"``,
    ``"conv"``, ``"embedding"``). Remove it with :func:`unregister_rule`.

    Raises:
      TypeError: ``rule`` is not a ``GramRule`` instance (or is the class itself), its
        ``primitives`` is not a set of primitive names, or a factored rule (``family`` set)
        lacks one of ``form``, ``cost``, ``activation``, ``factor``, ``block``.
      ValueError: its ``name`` is empty, reserved or already registered.

    Example:
        >>> import gaussnewton as gn
        >>> class Reciprocal(gn.GramRule):  # 1 / w: per-example gradients, named in explain
        ...     name, primitives = "reciprocal", frozenset({"div"})
        ...     def match(self, eqn, operand):
        ...         return operand == 1
        >>> rule = gn.register_rule(Reciprocal())
        >>> _ = gn.unregister_rule("reciprocal")
    """
    if isinstance(rule, type):
        raise TypeError(
            f"register_rule: rule must be a GramRule instance, got the class {rule.__name__}; "
            f"pass {rule.__name__}()."
        )
    if not isinstance(rule, GramRule):
        raise TypeError(
            f"register_rule: rule must be an instance of a gaussnewton.GramRule subclass, got "
            f"{type(rule).__name__} ({rule!r}). Subclass gaussnewton.GramRule."
        )
    name = rule.name
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"register_rule: rule.name must be a non-empty string, got {name!r}; set the class "
            f"attribute name on {type(rule).__name__}."
        )
    if name in RESERVED:
        raise ValueError(
            f"register_rule: rule.name={name!r} is reserved (it means something else in "
            f"LeafPlan.rule: {sorted(RESERVED)}); choose another name."
        )
    if name in RULES:
        fix = (
            "it is built in; choose another name"
            if name in _BUILTIN_NAMES
            else (f"call gaussnewton.unregister_rule({name!r}) first or choose another name")
        )
        raise ValueError(f"register_rule: a rule named {name!r} is already registered; {fix}.")
    prims = rule.primitives
    if (
        not isinstance(prims, (set, frozenset))
        or not prims
        or not all(isinstance(p, str) for p in prims)
    ):
        raise TypeError(
            f"register_rule: rule.primitives of {name!r} must be a non-empty set of jaxpr "
            f"primitive names (e.g. frozenset({{'mul'}})), got {prims!r}."
        )
    if rule.family is not None:
        missing = [m for m in _FACTORED_METHODS if getattr(type(rule), m) is getattr(GramRule, m)]
        if missing:
            raise TypeError(
                f"register_rule: rule {name!r} has family={rule.family!r} (a factored form) but "
                f"does not define {missing}; define them, or set family = None for per-example "
                "gradients."
            )
    RULES[name] = rule
    return rule


def unregister_rule(name: str) -> GramRule:
    """Remove the rule registered as ``name`` (see :func:`register_rule`) and return it.

    Raises:
      ValueError: ``name`` is a built-in rule (they cannot be removed; a registered rule on the
        same primitives takes precedence instead).
      KeyError: no rule of that name is registered.

    Example:
        >>> import gaussnewton as gn
        >>> class Tangent(gn.GramRule):
        ...     name, primitives = "tangent", frozenset({"tan"})
        >>> _ = gn.register_rule(Tangent())
        >>> gn.unregister_rule("tangent")
        Tangent(name='tangent')
    """
    if name in _BUILTIN_NAMES:
        raise ValueError(
            f"unregister_rule: {name!r} is a built-in rule and cannot be removed; register a "
            "rule on the same primitives instead (it is tried first)."
        )
    if name not in RULES:
        raise KeyError(
            f"unregister_rule: no rule named {name!r} is registered (registered: {sorted(RULES)})."
        )
    return RULES.pop(name)
