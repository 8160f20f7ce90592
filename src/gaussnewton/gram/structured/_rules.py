r"""The rule protocol of the structured Gram engine: one class per primitive family.

A :class:`GramRule` says, for one family of jaxpr primitives, (a) whether an equation uses a
parameter leaf in this family's way (:meth:`GramRule.match`, the analysis), (b) the factored
layout of such a use and the flop / memory model that chooses between it and per-example gradients
(:meth:`GramRule.form`, :meth:`GramRule.cost`), and (c) the assembly: the per-example factors
recorded in one forward pass with zero probes and one backward pass per output column
(:meth:`GramRule.activation`, :meth:`GramRule.factor`) and the Gram block formed from them
(:meth:`GramRule.block`). A rule without a factored form (``family = None``, the base class'
behaviour) sends its leaf to per-example gradients of that leaf, ``K_w = V Vᵀ``: the exact
fallback.

The built-in rules are ``"dense"``, ``"conv"`` (``_dense.py``), ``"embedding"``
(``_embedding.py``), ``"bias"`` and ``"scale"`` (here); :func:`gaussnewton.gram.register_rule`
adds one (``_registry.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:  # annotations only: the analysis imports the registry, not the reverse
    from ._analysis import LeafUses, Use
    from ._cost import LeafPlan

#: methods reported by :func:`gaussnewton.gram.structured.explain` (``LeafPlan.method``).
DENSE = "factored"  # a rule's factored form (the (a . a)(G . G) form of the dense rule, ...)
PERGRAD = "per-example-gradient"  # per-example gradients of this leaf only, K_w = V V^T
NONE = "none"  # contributes nothing
#: rules (``LeafPlan.rule``) that are no registered rule: several rules ("mixed"), or one of these.
MIXED = "mixed"
FALLBACK = "fallback"  # unrecognized use: per-example Jacobian of this leaf
UNUSED = "unused"
CONSTANT = "non-float"
#: names a rule may not take (they mean something else in ``LeafPlan.rule``).
RESERVED = frozenset({MIXED, FALLBACK, UNUSED, CONSTANT, "whole-batch"})


def is_bijection(canon: np.ndarray, size: int) -> bool:
    """True when the index array ``canon`` holds every entry ``0 .. size - 1`` exactly once."""
    if canon.size != size:
        return False
    return bool(np.all(np.bincount(canon.ravel().astype(np.int64), minlength=size) == 1))


class GramRule:
    r"""One primitive family of the structured Gram engine: its analysis, cost and assembly.

    Subclass it, set the class attributes, override the methods below and register an instance
    with :func:`gaussnewton.register_rule`. The engine calls the methods with static (numpy /
    python) values at trace time, except :meth:`activation`, :meth:`factor` and :meth:`block`,
    which run on arrays inside the per-example pass (``jax.vmap`` over examples) and the block
    product.

    Attributes:
      name: the rule's name, reported by :func:`gaussnewton.explain_gram` (``LeafPlan.rule``,
        ``LeafPlan.kinds``).
      primitives: jaxpr primitive names the rule may match (``{"mul"}``).
      family: ``None`` (the default) for a rule without a factored form: its leaf takes
        per-example gradients (exact). Otherwise the name of its factored form: the uses of one
        leaf are factored together (merged along positions, which adds their cross terms) only
        when all their rules share one family (the dense and conv rules share ``"linear"``).
      position_axes: the axes of the factors ``(A, G)`` of :meth:`factor` along which the uses of
        one leaf are concatenated (positions ``t``).
      producers: primitives whose output a bias added right after may fold into this rule's
        factored form (:meth:`fold_bias`); the analysis records them as ``Use.other_producer``.

    The factored contract, for a leaf ``w`` whose uses are ``z_u = op_u(w, ...)`` with output
    cotangents ``G_ik = d f_ik / d z`` (one backward pass per output column ``k``):
    ``block(A1, G1, A2, G2)`` must equal
    ``Σ_w (d f_ik(x1_i) / d w)(d f_jl(x2_j) / d w)``, shape ``(n1, k, n2, k)``.

    Example (the elementwise scale ``z = h * γ``, ``γ`` of shape ``(c,)`` broadcast over the
    positions ``t`` of ``h``, factored as ``d f_ik / d γ = Σ_t G_ikt ⊙ h_it``; a fuller one with
    its test is ``ChannelScale`` in tests/gram/test_rules.py):
        >>> import jax.numpy as jnp, numpy as np
        >>> import gaussnewton as gn
        >>> class VectorScale(gn.GramRule):
        ...     name, primitives, family = "vector_scale", frozenset({"mul"}), "vector_scale"
        ...     def form(self, use):  # ((operand of h, T, c), γ's layout), or why not
        ...         idx = np.broadcast_to(use.index, use.out_shape).reshape(-1, use.out_shape[-1])
        ...         if use.other_shape != use.out_shape or not np.all(idx == idx[:1]):
        ...             return "not a scale of the last axis"
        ...         return (1 - use.operand, *idx.shape), idx[0]
        ...     def cost(self, forms, size, n1, n2, k):
        ...         T = sum(f[1] for f in forms)
        ...         flops = n1 * n2 * k * k * size + (n1 + n2) * k * T * size
        ...         return flops, 2 * flops, n1 * n2 * k * k, (n1 + n2) * k * size
        ...     def activation(self, form, invals):
        ...         return invals[form[0]]
        ...     def factor(self, form, act, g, k):
        ...         return act.reshape(form[1:]), g.reshape(k, *form[1:])
        ...     def block(self, A1, G1, A2, G2, dtype):
        ...         v1 = jnp.einsum("itc,iktc->ikc", A1, G1).astype(dtype)
        ...         v2 = jnp.einsum("itc,iktc->ikc", A2, G2).astype(dtype)
        ...         return jnp.einsum("ikc,jlc->ikjl", v1, v2)
        >>> rule = gn.register_rule(VectorScale())
        >>> fn = lambda p, x: jnp.tanh(x @ p["w"] * p["g"]) @ p["v"]
        >>> p = {"w": jnp.ones((3, 4)), "g": jnp.ones(4), "v": jnp.ones((4, 2))}
        >>> plan = gn.explain_gram(fn, p, jnp.ones((5, 3)))["['g']"]
        >>> plan.rule, plan.method
        ('vector_scale', 'factored')
        >>> _ = gn.unregister_rule("vector_scale")
    """

    name: str = ""
    primitives: frozenset[str] = frozenset()
    family: str | None = None
    position_axes: tuple[int, int] = (0, 1)
    producers: frozenset[str] = frozenset()

    # --- (a) analysis ---------------------------------------------------------------------------

    def match(self, eqn: Any, operand: int) -> bool:
        """Does ``eqn`` (a primitive in :attr:`primitives`) use the parameter in this way?

        Called only for equations of which exactly one operand (position ``operand``) derives
        from a parameter leaf (through views: reshape, transpose, broadcast, slice, convert, ...).
        The analysis then records a ``Use`` (:class:`gaussnewton.gram.structured.Use`): the
        equation's path, params and shapes and the leaf's index array. Default: every such
        equation.
        """
        return True

    # --- (b) factored form and cost -------------------------------------------------------------

    def form(self, use: Use) -> tuple[Any, np.ndarray] | str:
        """The factored layout of one use, or the reason (a string) it has none.

        Returns ``(form, canon)``: ``form`` is whatever :meth:`activation` and :meth:`factor`
        read (built-in rules use dataclasses, reported by ``LeafPlan.forms``); ``canon`` is the
        leaf's index array (``use.index``, entries of the flattened leaf) in the layout the factors
        use: the engine factors the leaf only when ``canon`` of its first use is a bijection onto
        the leaf and every use has the same ``canon``. Used attributes of ``use``: ``index``,
        ``operand``, ``params`` (the equation's), ``out_shape``, ``other_shape`` (the other
        operand's shape, per example).
        """
        raise NotImplementedError(f"rule {self.name!r}: a factored rule must define form()")

    def layout_reason(self, kinds: tuple[str, ...], bijective: bool) -> str:
        """Why a leaf is not factored: ``canon`` is no bijection (``bijective=False``) or the
        uses' layouts differ (``bijective=True``); ``kinds`` are the leaf's rule names."""
        if not bijective:
            return "the parameter is broadcast or sliced before its use"
        return "uses with different layouts of the parameter"

    def cost(
        self, forms: Sequence[Any], size: int, n1: int, n2: int, k: int
    ) -> tuple[float, float, int, int]:
        """``(flops_factored, flops_per_example_gradient, memory_factored, memory_per_example)``.

        ``forms`` are the leaf's forms (one per use), ``size`` its number of entries, ``n1``,
        ``n2`` the two batch sizes, ``k`` the outputs per example. ``dense_method="auto"`` takes
        per-example gradients when they need fewer flops, or when the factored intermediates
        exceed ``MEMORY_CAP`` entries and per-example gradients need less memory.
        """
        raise NotImplementedError(f"rule {self.name!r}: a factored rule must define cost()")

    # --- (c) assembly ---------------------------------------------------------------------------

    def activation(self, form: Any, invals: list) -> jax.Array:
        """What the forward pass records of one example at the use (``invals``: the equation's
        inputs, one example)."""
        raise NotImplementedError(f"rule {self.name!r}: a factored rule must define activation()")

    def factor(self, form: Any, act: jax.Array, g: jax.Array, k: int) -> tuple[Any, Any]:
        """The factors ``(A, G)`` of one use and one example from the recorded activation ``act``
        and ``g`` of shape ``(k, *out_shape)``, the cotangent of the use's output for each of the
        ``k`` output columns. The factors of several uses are concatenated along
        :attr:`position_axes`."""
        raise NotImplementedError(f"rule {self.name!r}: a factored rule must define factor()")

    def block(self, A1: Any, G1: Any, A2: Any, G2: Any, dtype: Any) -> jax.Array:
        """The leaf's Gram block ``(n1, k, n2, k)`` in ``dtype`` from the factors of two example
        sets (leading example axes ``n1``, ``n2``)."""
        raise NotImplementedError(f"rule {self.name!r}: a factored rule must define block()")

    def fold_bias(self, form: Any, use: Use, size: int) -> bool:
        """Fold the bias use ``use`` (an add right after this rule's use ``form``, on its output
        only) into ``form``; return True when done. Default: never."""
        return False

    def refine(self, plans: list[LeafPlan], found: list[LeafUses], sizes: list[int]) -> None:
        """Revise the plans of every leaf once all are made (unless per-example gradients are
        requested); ``found``: each leaf's uses, ``sizes``: its number of entries. Default:
        nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class BiasRule(GramRule):
    """``z = h + b`` / ``h - b``: per-example gradients, or folded into the factored rule of the
    equation that produced ``h`` (a dot or conv output used only by the add, see :meth:`refine`)."""

    name = "bias"
    primitives = frozenset({"add", "add_any", "sub"})

    def refine(self, plans: list[LeafPlan], found: list[LeafUses], sizes: list[int]) -> None:
        """Fold a bias leaf into the factored rule of the ``dot_general`` / conv it is added to.

        For ``z = a W + b`` (the dot's or conv's output used only by the add, ``b`` broadcast
        over positions) ``dz/db`` is ``G`` summed over positions, so
        ``K_W + K_b = sum_{t,s} (a_t . a_s + 1)(G_t . G_s)``: the target rule's
        :meth:`GramRule.fold_bias` appends a column of ones to ``A``, replacing the bias' own
        per-example gradients.
        """
        factored_at = {
            pl.sites[0][0]: pl for pl in plans if pl.method == DENSE and len(pl.sites) == 1
        }
        for pl, f, size in zip(plans, found, sizes, strict=True):
            if pl.rule != self.name or len(f.uses) != 1:
                continue
            use = f.uses[0]  # add / sub: the sign of dz/db cancels in the Gram
            target = factored_at.get(use.other_producer)
            if target is None:
                continue
            if target.sites[0][1].fold_bias(target.forms[0], use, size):
                pl.method, pl.reason = DENSE, f"merged into the {target.rule} rule of {target.name}"


class ScaleRule(GramRule):
    """``z = h * s`` (one operand derived from the leaf): per-example gradients of the leaf."""

    name = "scale"
    primitives = frozenset({"mul"})
