"""Structured Gram engine: the empirical NTK ``J J^T`` of an ordinary JAX function, without ``J``.

The model is traced (per example) to a jaxpr; every parameter leaf is followed through views
(reshape, transpose, convert, broadcast, slice) to its uses, and calls (jit/pjit, closed_call,
checkpoint) are inlined. Rules, per leaf:

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

See METHODS.md section 3.3. The per-example trace means examples must not interact inside
``model_fn`` (no batch statistics), as for the materialized-Jacobian reference.

Public:
  structured_gram(model_fn, params, x1, x2=None) -> K (n1, k, n2, k)
  structured_factors(model_fn, params, x) -> (F, block)   (blocks of one Gram, passes run once)
  explain(model_fn, params, x1, x2=None) -> {leaf name: LeafPlan}   (introspection)

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

from collections.abc import Callable
from typing import Any

from ._assemble import make_plan, structured_factors, structured_gram
from ._cost import LeafPlan

__all__ = ["LeafPlan", "explain", "structured_factors", "structured_gram"]


def explain(
    model_fn: Callable, params: Any, x1: Any, x2: Any = None, *, dense_method: str = "auto"
) -> dict[str, LeafPlan]:
    """Report, per parameter leaf (by key path), the rule :func:`structured_gram` uses.

    ``LeafPlan.rule`` is the recognized rule (``"dense"``, ``"bias"``, ``"scale"``, ``"conv"``,
    ``"embedding"``, ``"mixed"``) or ``"fallback"`` (an unrecognized use, see ``reason``),
    ``"unused"``, ``"non-float"``; ``LeafPlan.method`` is ``"factored"`` (the dense, conv or
    embedding rule, or a bias merged into one), ``"per-example-gradient"`` (that leaf's
    per-example gradients) or ``"none"``. ``cost_dense`` / ``cost_pergrad`` are the flop
    estimates compared under ``dense_method="auto"``.
    """
    _, plans = make_plan(model_fn, params, x1, x2, dense_method)
    return {p.name: p for p in plans}
