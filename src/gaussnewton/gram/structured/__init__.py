"""Structured Gram engine: the empirical NTK ``J J^T`` of an ordinary JAX function, without ``J``.

The model is traced (per example) to a jaxpr; every parameter leaf is followed through views
(reshape, transpose, convert, broadcast, slice) to its uses, and calls (jit/pjit, closed_call,
checkpoint) are inlined. Each use is matched by a *rule*, one small class per primitive family
(:class:`GramRule`: its analysis ``match``, its factored ``form`` and flop model ``cost``, its
assembly ``activation`` / ``factor`` / ``block``), looked up in a registry that
:func:`register_rule` extends (``_rules.py``, ``_dense.py``, ``_embedding.py``,
``_registry.py``). The built-in rules, per leaf:

* dense (``dot_general``, any layout, positions ``t``): ``sum_{t,s} (a_t . a_s)(G_t . G_s)`` with
  ``G = df/dz`` from zero probes on ``z`` and one backward pass per output column (vmapped);
  several uses with one layout are merged (cross terms); a bias added right after the dot folds
  in as a column of ones in ``a``;
* conv (``conv_general_dilated``, any dimension numbers, strides, padding, lhs / rhs dilation):
  the dense rule over output positions ``t`` with ``a_t`` the input patch under ``t``
  (``jax.lax.conv_general_dilated_patches``), the kernel laid out as (input feature x window,
  output feature); uses with one layout (also dense ones) merge, a bias right after folds in;
  grouped convs (``feature_group_count`` / ``batch_group_count`` > 1) take per-example gradients;
* embedding (gather of whole rows): ``sum_{t,s} [id_t == id_s] (G_t . G_s)``;
* bias / scale, dense, conv or embedding when the flop model prefers it, and anything not
  recognized (scan/while bodies, a parameter inside custom_jvp/custom_vjp, both operands of a
  product, ...): per-example gradients of THAT leaf only (exact; "fallback" when unrecognized).

See docs/METHODS.md section 3.3. The per-example trace is exact only when examples do not interact
inside ``model_fn``; :func:`structured_gram`, :func:`structured_factors` and :func:`explain` first
run :func:`gaussnewton.gram.batch_coupling` and, for a batch-coupled model (batch statistics,
attention across the batch, position-dependent masks), use the exact whole-batch Jacobian
instead (``explain`` then reports ``method="whole-batch-jacobian"`` / ``"whole-batch-matvec"``
for every float leaf, with the coupling reasons).

Public:
  structured_gram(model_fn, params, x1, x2=None) -> K (n1, k, n2, k)
  structured_factors(model_fn, params, x) -> (F, block)   (blocks of one Gram, passes run once)
  explain(model_fn, params, x1, x2=None) -> {leaf name: LeafPlan}   (introspection)
  GramRule, register_rule(rule), unregister_rule(name)   (a new primitive family: one class)

Example:
    >>> import jax.numpy as jnp
    >>> from gaussnewton.gram.structured import explain, structured_gram
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
    >>> p = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "v": jnp.ones((4, 2))}
    >>> structured_gram(fn, p, jnp.ones((5, 3))).shape
    (5, 2, 5, 2)
    >>> {name: (plan.rule, plan.method) for name, plan in explain(fn, p, jnp.ones((5, 3))).items()}
    {"['b']": ('bias', 'factored'), "['v']": ('dense', 'factored'), "['w']": ('dense', 'factored')}
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .. import _whole
from .._coupling import Coupling, batch_coupling
from . import _assemble
from ._analysis import Use
from ._assemble import _batch_size, make_plan
from ._cost import DENSE_METHODS, NONE, LeafPlan
from ._registry import register_rule, unregister_rule
from ._rules import GramRule

__all__ = [
    "GramRule",
    "LeafPlan",
    "Use",
    "explain",
    "register_rule",
    "structured_factors",
    "structured_gram",
    "unregister_rule",
]


def _limit() -> int:
    return sys.modules["gaussnewton.gram"]._JACOBIAN_BYTES_LIMIT


def _check(x1: Any, x2: Any, dense_method: str) -> None:
    if dense_method not in DENSE_METHODS:
        raise ValueError(
            f"structured_gram: dense_method={dense_method!r} is not one of {DENSE_METHODS}."
        )
    _batch_size(x1, "x1")
    if x2 is not None:
        _batch_size(x2, "x2")


def _coupling(model_fn: Callable, params: Any, x1: Any, x2: Any) -> Coupling:
    c = batch_coupling(model_fn, params, x1)
    return c if x2 is None or c.coupled else batch_coupling(model_fn, params, x2)


def structured_gram(
    model_fn: Callable, params: Any, x1: Any, x2: Any = None, *, dense_method: str = "auto"
) -> jax.Array:
    """``K = J(x1) J(x2)^T`` ``(n1, k, n2, k)`` by the structured engine (see
    :func:`gaussnewton.gram.structured._assemble.structured_gram` for the rules); a batch-coupled
    model gets the exact whole-batch Jacobian instead (rows of ``J(x1)`` from the batch ``x1``,
    of ``J(x2)`` from ``x2``)."""
    _check(x1, x2, dense_method)
    if _coupling(model_fn, params, x1, x2).coupled:
        return _whole.whole_batch_gram(model_fn, params, x1, x2, limit=_limit())
    return _assemble.structured_gram(model_fn, params, x1, x2, dense_method=dense_method)


def structured_factors(
    model_fn: Callable, params: Any, x: Any, *, dense_method: str = "auto"
) -> tuple[Any, Callable]:
    """``(F, block)`` of :func:`structured_gram` on ``x`` (see
    :func:`gaussnewton.gram.gram_factors`); whole-batch factors for a batch-coupled model."""
    _check(x, None, dense_method)
    if batch_coupling(model_fn, params, x).coupled:
        return _whole.whole_batch_factors(model_fn, params, x, limit=_limit())
    return _assemble.structured_factors(model_fn, params, x, dense_method=dense_method)


def explain(
    model_fn: Callable, params: Any, x1: Any, x2: Any = None, *, dense_method: str = "auto"
) -> dict[str, LeafPlan]:
    """Report, per parameter leaf (by key path), the rule :func:`structured_gram` uses.

    ``LeafPlan.rule`` is the name of the recognized rule (built in: ``"dense"``, ``"bias"``,
    ``"scale"``, ``"conv"``, ``"embedding"``; or one added by :func:`register_rule`),
    ``"mixed"`` (uses of several rules) or ``"fallback"`` (an unrecognized use, see ``reason``),
    ``"unused"``, ``"non-float"``; ``LeafPlan.method`` is ``"factored"`` (a rule's factored
    form: the dense, conv or embedding rule, or a bias merged into one), ``"per-example-gradient"``
    (that leaf's per-example gradients) or ``"none"``. ``cost_dense`` / ``cost_pergrad`` are the
    flop estimates (:meth:`GramRule.cost`) compared under ``dense_method="auto"``.

    For a batch-coupled model (:func:`gaussnewton.gram.batch_coupling`) every float leaf reports
    ``method="whole-batch-jacobian"`` (or ``"whole-batch-matvec"`` above the Jacobian byte limit),
    ``reason="batch coupled: ..."`` (the first reasons of the analysis) and ``coupling`` (the
    whole :class:`gaussnewton.gram.Coupling`); ``rule`` is what the per-example analysis
    recognized (``"whole-batch"`` where it could not run), non-float leaves keep ``"non-float"``.

    Example:
        >>> import jax.numpy as jnp
        >>> fn = lambda p, x: jnp.tanh((x - x.mean(0)) @ p["w"])
        >>> plan = explain(fn, {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))["['w']"]
        >>> plan.method, plan.reason.split(" (")[0]
        ('whole-batch-jacobian', 'batch coupled: reduce_sum reduces over the batch axis')
    """
    _check(x1, x2, dense_method)
    coupling = _coupling(model_fn, params, x1, x2)
    if not coupling.coupled:
        _, plans = make_plan(model_fn, params, x1, x2, dense_method)
        return {p.name: p for p in plans}
    method = _whole.whole_batch_method(model_fn, params, x1, _limit())
    if x2 is not None and _whole.whole_batch_method(model_fn, params, x2, _limit()) != method:
        method = _whole.MATVEC
    try:  # what the per-example engine would recognize: informative only
        rules = {p.name: p for p in make_plan(model_fn, params, x1, x2, dense_method)[1]}
    except Exception:
        rules = {}
    reason = "batch coupled: " + coupling.summary()
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        seen = rules.get(name)
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            out[name] = LeafPlan(name, "non-float", NONE, coupling=coupling)
            continue
        rule = seen.rule if seen is not None else "whole-batch"
        kinds = seen.kinds if seen is not None else ()
        out[name] = LeafPlan(name, rule, method, kinds, reason, coupling=coupling)
    return out
