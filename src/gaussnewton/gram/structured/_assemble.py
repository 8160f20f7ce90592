"""Forward/backward passes with probes, and assembly of the Gram matrix from the per-leaf plans.

Generic over the rules: each factored use's rule (``LeafPlan.sites``) records its activation in
the forward pass (:meth:`GramRule.activation`), turns it and the probe cotangents into factors
(:meth:`GramRule.factor`) and forms the leaf's Gram block (:meth:`GramRule.block`); every other
float leaf contributes its per-example gradients ``V``, ``K_w = V Vᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gaussnewton._sharding import vary_like

from ._analysis import LeafUses, analyze
from ._cost import DENSE_METHODS, LeafPlan, plan_leaf
from ._jaxpr import Traced, evaluate, trace, walk
from ._registry import RULES
from ._rules import CONSTANT, DENSE, PERGRAD, GramRule

_HI = jax.lax.Precision.HIGHEST


def _batch_size(x: Any, name: str) -> int:
    sizes = {int(jnp.shape(a)[0]) for a in jax.tree_util.tree_leaves(x) if jnp.ndim(a) > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"structured_gram: the leaves of {name} must share one leading batch size; got sizes "
            f"{sorted(sizes)}. Give every input array the shape (n, ...)."
        )
    return sizes.pop()


def make_plan(
    model_fn: Callable, params: Any, x1: Any, x2: Any = None, dense_method: str = "auto"
) -> tuple[Traced, list[LeafPlan]]:
    """Trace ``model_fn`` on one example of ``x1`` and choose a rule for every parameter leaf."""
    if dense_method not in DENSE_METHODS:
        raise ValueError(
            f"structured_gram: dense_method={dense_method!r} is not one of {DENSE_METHODS}."
        )
    n1 = _batch_size(x1, "x1")
    n2 = n1 if x2 is None else _batch_size(x2, "x2")
    traced, _, _ = trace(model_fn, params, x1)
    named = jax.tree_util.tree_flatten_with_path(params)[0]
    floating = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for _, leaf in named]
    try:
        found = analyze(traced.jaxpr.jaxpr, traced.num_params, floating)
    except Exception as err:  # an analysis bug must not break training: stay exact
        found = [LeafUses(fallback=f"analysis failed ({type(err).__name__}: {err})") for _ in named]
    plans = []
    sizes = [int(np.prod(jnp.shape(leaf), dtype=np.int64)) for _, leaf in named]
    for (path, _), fl, f, size in zip(named, floating, found, sizes, strict=True):
        name = jax.tree_util.keystr(path)
        if not fl:
            plans.append(LeafPlan(name, CONSTANT))
            continue
        plans.append(plan_leaf(name, f, size, n1, n2, traced.num_outputs, dense_method))
    if dense_method != PERGRAD:  # e.g. a bias folds into the factored dot / conv before it
        for rule in list(RULES.values()):
            rule.refine(plans, found, sizes)
    return traced, plans


def _factored(plans: list[LeafPlan]) -> list[int]:
    """Indices of the leaves with a factored form."""
    return [p for p, pl in enumerate(plans) if pl.method == DENSE and pl.forms]


def _leaf_rules(plans: list[LeafPlan]) -> list[GramRule]:
    """The rule that forms each factored leaf's block (that of its first use)."""
    return [plans[p].sites[0][1] for p in _factored(plans)]


def _per_example(traced: Traced, leaves: list, plans: list[LeafPlan]) -> Callable:
    """Per-example map ``x_i -> (A per factored leaf, G per factored leaf, per-example gradients)``.

    One forward pass with a zero probe added to the output of every factored use (dense, conv,
    embedding, ...), recording what its rule's ``activation`` asks for, then one VJP per output
    column (vmapped over the k unit cotangents) w.r.t. the probes and the leaves that take
    per-example gradients; each rule's ``factor`` turns activation and cotangents into ``(A, G)``
    (a conv's activation becomes its input patches), merged per leaf along ``position_axes``.
    """
    closed = traced.jaxpr
    k = traced.num_outputs
    grad_idx = [p for p, pl in enumerate(plans) if pl.method == PERGRAD]
    dense_idx = _factored(plans)
    forms = [f for p in dense_idx for f in plans[p].forms]
    sites = [s for p in dense_idx for s in plans[p].sites]
    eqns = {path: eqn for path, eqn, _ in walk(closed.jaxpr)}
    out_avals = [eqns[path].outvars[0].aval for path, _ in sites]
    slot = {path: s for s, (path, _) in enumerate(sites)}

    def one(x_leaves):
        def fwd(probes, gleaves):
            full = list(leaves)
            for p, g in zip(grad_idx, gleaves, strict=True):
                full[p] = g
            acts = [None] * len(forms)

            def hook(path, eqn, invals, outs):
                s = slot.get(path)
                if s is None:
                    return outs
                acts[s] = sites[s][1].activation(forms[s], invals)
                return [outs[0] + probes[s]]

            (out,) = evaluate(closed.jaxpr, closed.consts, full + list(x_leaves), hook)
            return out, acts

        # inside shard_map the probes vary like the inputs: derivatives are this device's own
        probes0 = vary_like([jnp.zeros(a.shape, a.dtype) for a in out_avals], x_leaves[0])
        gleaves0 = [leaves[p] for p in grad_idx]
        out, vjp_fn, acts = jax.vjp(fwd, probes0, gleaves0, has_aux=True)
        g_probes, g_leaves = jax.vmap(vjp_fn)(vary_like(jnp.eye(k, dtype=out.dtype), out))
        A, G = [], []
        for a, g, f, (_, rule) in zip(acts, g_probes, forms, sites, strict=True):
            a, g = rule.factor(f, a, g, k)
            A.append(a)
            G.append(g)
        A_leaf, G_leaf, start = [], [], 0
        for p in dense_idx:  # merge the uses of one leaf along positions T
            m = len(plans[p].forms)
            ax_a, ax_g = plans[p].sites[0][1].position_axes
            A_leaf.append(jnp.concatenate(A[start : start + m], axis=ax_a))
            G_leaf.append(jnp.concatenate(G[start : start + m], axis=ax_g))
            start += m
        V = [g.reshape(k, -1) for g in g_leaves]
        V = jnp.concatenate(V, axis=1) if V else jnp.zeros((k, 0), out.dtype)
        return A_leaf, G_leaf, V

    return one


def structured_gram(
    model_fn: Callable, params: Any, x1: Any, x2: Any = None, *, dense_method: str = "auto"
) -> jax.Array:
    r"""Empirical NTK ``K = J(x1) J(x2)^T`` from the model's own structure, without ``J``.

    ``model_fn(params, x) -> (n, k)``; ``x1``/``x2`` are pytrees of arrays with a leading batch
    axis (``x2=None`` means ``x1``). Returns ``K`` of shape ``(n1, k, n2, k)`` with

    .. math:: K[i,k,j,l] = \sum_w \partial f_{ik}(x1_i)/\partial w \; \partial f_{jl}(x2_j)/\partial w.

    The sum over parameters is split by leaf (see :func:`gaussnewton.gram.structured.explain`):

    * dense leaves (``z = a W`` in any ``dot_general`` layout, positions ``t``)::

        K_W[(i,k),(j,l)] = sum_{t,s} (a_it . a_js) (G_ikt . G_jls),   G_ik = d f_ik / d z_i,

      with ``G`` from one backward pass per output column (a zero probe added to ``z``);
    * conv kernels (``conv_general_dilated``, any layout, strides, padding, dilations; not
      grouped): the same sum with ``a_it`` the input patch under output position ``t``
      (``jax.lax.conv_general_dilated_patches``) and ``G = df/dz`` at the conv output;
    * embedding tables (gathers of whole rows): ``sum_{t,s} [id_it == id_js] (G_ikt . G_jls)``;
    * a bias added right after a factored dot / conv: a column of ones in ``a``;
    * rules added with :func:`gaussnewton.register_rule`: their own factored form (or
      per-example gradients);
    * other leaves (bias, scale, grouped conv, unrecognized uses) and dense / conv / embedding
      leaves where the flop model prefers it: per-example gradients ``V_ik = d f_ik / d w`` of
      that leaf only, ``K_w = V V^T``.

    ``dense_method`` (``"auto"``, ``"factored"``, ``"per-example-gradient"``) overrides the flop
    model that picks, per dense / conv / embedding leaf, between the two forms. Works under
    ``jax.jit`` (the analysis uses shapes only), for any params pytree. The result dtype is at
    least float32.
    """
    traced, plans = make_plan(model_fn, params, x1, x2, dense_method)
    f1 = _factors(traced, plans, params, x1)
    f2 = f1 if x2 is None else _factors(traced, plans, params, x2)
    return _block(f1, f2, traced.num_outputs, _gram_dtype(traced), _leaf_rules(plans))


def structured_factors(
    model_fn: Callable, params: Any, x: Any, *, dense_method: str = "auto"
) -> tuple[Any, Callable]:
    """The per-example factors of :func:`structured_gram` on ``x``, and the block map.

    Returns ``(F, block)``: every leaf of ``F`` has the leading example axis of ``x``, and
    ``block(F[I], F[J])`` (``F`` sliced to example sets ``I``, ``J``; ``block(F[I])`` for ``J = I``)
    is ``K[I, :, J, :]`` of the Gram on ``x``, so blocks of one Gram never recompute the passes.
    The per-leaf rules are chosen once, for the whole ``x``.
    """
    traced, plans = make_plan(model_fn, params, x, None, dense_method)
    factors = _factors(traced, plans, params, x)
    k, dtype, rules = traced.num_outputs, _gram_dtype(traced), _leaf_rules(plans)

    def block(f1: Any, f2: Any = None) -> jax.Array:
        return _block(f1, f1 if f2 is None else f2, k, dtype, rules)

    return factors, block


def _gram_dtype(traced: Traced):
    return jnp.promote_types(traced.jaxpr.jaxpr.outvars[0].aval.dtype, jnp.float32)


def _factors(traced: Traced, plans: list[LeafPlan], params: Any, x: Any):
    """``(A per factored leaf, G per factored leaf, V)``, each with a leading example axis."""
    one = _per_example(traced, jax.tree_util.tree_leaves(params), plans)
    return jax.vmap(one)(jax.tree_util.tree_leaves(x))


def _block(f1, f2, k: int, dtype, rules: list[GramRule]) -> jax.Array:
    """``K`` of shape ``(n1, k, n2, k)`` from the factors of two example sets (products in >= f32):
    each factored leaf's block by its rule, plus ``V1 V2ᵀ`` of the per-example gradients."""
    (A1, G1, V1), (A2, G2, V2) = f1, f2
    n1, n2 = V1.shape[0], V2.shape[0]
    K = jnp.zeros((n1, k, n2, k), dtype)
    for rule, a1, g1, a2, g2 in zip(rules, A1, G1, A2, G2, strict=True):
        K = K + rule.block(a1, g1, a2, g2, dtype)
    if V1.shape[-1]:
        V1, V2 = V1.astype(dtype), V2.astype(dtype)
        V = jnp.matmul(V1.reshape(n1 * k, -1), V2.reshape(n2 * k, -1).T, precision=_HI)
        K = K + V.reshape(n1, k, n2, k)
    return K
