"""Tracing a model to a per-example jaxpr, and a small interpreter with a per-equation hook.

The structured Gram engine works on the jaxpr of ONE example: ``f1(leaves, x_i) -> (k,)`` is the
user's ``model_fn`` applied to a batch of one. Activations in that jaxpr carry no batch axis of
their own (only a leading axis of size 1), so every parameter use can be read per example; the
batch is restored by ``jax.vmap`` around the interpreter.

Call-like equations (``jit``/``pjit``, ``closed_call``, ``core_call``, ``remat2``/``checkpoint``)
are inlined: both the analysis and the interpreter walk into their sub-jaxprs, and equations are
named by their *path* (tuple of equation indices, one per nesting level). Everything else is
bound as is (``custom_jvp_call``, ``custom_vjp_call``, ``scan``, ``while``, ``cond``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

Path = tuple[int, ...]

#: primitives whose sub-jaxpr is a plain function call: inlined by analysis and interpreter.
INLINE_PRIMITIVES = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
)


@dataclass(frozen=True)
class Traced:
    """The per-example jaxpr of a model and what is needed to evaluate it.

    Attributes:
      jaxpr: closed jaxpr of ``f1(*param_leaves, *x_leaves) -> out`` with ``out.size == k``.
      num_params: number of parameter leaves (the first ``num_params`` invars).
      num_outputs: ``k``, the number of model outputs per example.
    """

    jaxpr: ClosedJaxpr
    num_params: int
    num_outputs: int


def per_example_fn(model_fn: Callable, treedef: Any, x_treedef: Any) -> Callable:
    """``f1(*param_leaves, *x_leaves_of_one_example) -> (k,)`` for a batched ``model_fn``."""

    n_params = treedef.num_leaves

    def f1(*flat):
        params = jax.tree_util.tree_unflatten(treedef, flat[:n_params])
        x1 = jax.tree_util.tree_unflatten(x_treedef, [a[None] for a in flat[n_params:]])
        return jnp.reshape(model_fn(params, x1), (-1,))

    return f1


def trace(model_fn: Callable, params: Any, x: Any) -> tuple[Traced, Any, Any]:
    """Trace ``model_fn`` on one example (shapes only; works on tracers inside ``jit``).

    Returns the :class:`Traced` jaxpr, the params treedef and the x treedef.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_treedef = jax.tree_util.tree_flatten(x)
    for leaf in x_leaves:
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                "structured_gram: every leaf of x must have a leading batch axis; got a scalar "
                "leaf. Pass inputs shaped (n, ...)."
            )
    specs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves]
    specs += [jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)) for a in x_leaves]
    f1 = per_example_fn(model_fn, treedef, x_treedef)
    closed = jax.make_jaxpr(f1)(*specs)
    (out_aval,) = [v.aval for v in closed.jaxpr.outvars]
    return Traced(closed, len(leaves), int(out_aval.shape[0])), treedef, x_treedef


def sub_jaxpr(eqn: JaxprEqn) -> tuple[Jaxpr, Sequence[Any]] | None:
    """The inlinable sub-jaxpr (and its consts) of a call-like equation, else ``None``."""
    if eqn.primitive.name not in INLINE_PRIMITIVES:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, ClosedJaxpr):
        return inner.jaxpr, inner.consts
    if isinstance(inner, Jaxpr):
        return inner, ()
    return None


def walk(jaxpr: Jaxpr, path: Path = ()) -> Iterator[tuple[Path, JaxprEqn, Jaxpr | None]]:
    """Yield ``(path, eqn, inlined_sub_jaxpr_or_None)`` for every equation, depth first."""
    for i, eqn in enumerate(jaxpr.eqns):
        sub = sub_jaxpr(eqn)
        yield path + (i,), eqn, None if sub is None else sub[0]
        if sub is not None:
            yield from walk(sub[0], path + (i,))


Hook = Callable[[Path, JaxprEqn, list, list], list]


def evaluate(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], hook: Hook, path=()):
    """Evaluate ``jaxpr`` like ``jax.core.eval_jaxpr``, inlining call-like equations.

    ``hook(path, eqn, invals, outvals) -> outvals`` is called after every bound (non-inlined)
    equation and may replace its outputs (e.g. add a zero probe) or record its inputs.
    """
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
        p = path + (i,)
        invals = [read(v) for v in eqn.invars]
        sub = sub_jaxpr(eqn)
        if sub is not None:
            outs = evaluate(sub[0], sub[1], invals, hook, p)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **bind_params)
            outs = list(ans) if eqn.primitive.multiple_results else [ans]
            outs = hook(p, eqn, invals, outs)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]
