"""Dataflow analysis: where does each parameter leaf enter the per-example jaxpr?

A parameter leaf flows forward through *view* equations (reshape, transpose, broadcast, convert,
slice, ...). We follow it with an integer *index array*: the view applied to
``arange(P).reshape(leaf.shape)``, so that a derived value ``W'`` satisfies
``W'[...] = W.ravel()[index[...]]``. The first non-view equation that consumes ``W'`` is a *use*
when exactly one of its operands derives from one leaf and a registered rule matches it
(``_registry.find_rule``: the rule's ``primitives`` and ``match(eqn, operand)``); the built-ins:

* ``dot_general`` with exactly one parameter-derived operand  -> ``"dense"``
* ``add`` / ``sub`` with the parameter-derived operand         -> ``"bias"``
* ``mul`` with one parameter-derived operand                   -> ``"scale"``
* ``conv_general_dilated`` with a parameter-derived kernel     -> ``"conv"``
* ``gather`` from a parameter-derived table                     -> ``"embedding"``

Anything else (scan/while/cond bodies, custom_jvp/custom_vjp calls, both operands derived from
parameters, a parameter returned as output, primitives no rule matches) marks the leaf
``"fallback"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from jax.extend.core import Jaxpr, Literal

from ._jaxpr import Path, sub_jaxpr
from ._registry import find_rule, producer_primitives

_IDENTITY_VIEWS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})


@dataclass
class Use:
    """One equation that consumes a parameter leaf (through views).

    Attributes:
      kind: the name of the rule that matched (built in: "dense", "bias", "scale", "conv",
        "embedding").
      path: the equation's path in the (inlined) jaxpr.
      operand: position of the parameter-derived operand among the equation's inputs.
      index: integer index array (shape of the operand) into the flattened leaf.
      params: the equation's parameters (dimension numbers, ...).
      out_shape: per-example shape of the equation's output.
      other_shape: per-example shape of the other operand (the activation of a dense use, the
        input ``lhs`` of a conv use).
      other_producer: path of an equation of some rule's ``producers`` (``dot_general``,
        ``conv_general_dilated``; same scope) whose output, possibly through single-consumer
        transposes / reshapes (``other_chain``), is the other operand and has no other consumer:
        lets a bias merge into the dense / conv rule before it.
      other_chain: those views, as ``(primitive name, params, input shape)``.
    """

    kind: str
    path: Path
    operand: int
    index: np.ndarray
    params: dict
    out_shape: tuple[int, ...]
    other_shape: tuple[int, ...] = ()
    other_producer: Path | None = None
    other_chain: tuple = ()


@dataclass
class LeafUses:
    """All uses of one leaf, or the reason it needs the per-example-gradient fallback."""

    uses: list[Use] = field(default_factory=list)
    fallback: str | None = None

    def fail(self, reason: str) -> None:
        if self.fallback is None:
            self.fallback = reason


def _view(name: str, params: dict, idx: np.ndarray) -> np.ndarray | None:
    """Apply a view primitive to an index array (numpy); ``None`` if not a view."""
    if name in _IDENTITY_VIEWS:
        new_dtype = params.get("new_dtype")
        if new_dtype is not None and not np.issubdtype(np.dtype(new_dtype), np.inexact):
            return None
        return idx
    if name == "reshape":
        if params.get("dimensions") is not None:
            idx = np.transpose(idx, params["dimensions"])
        return np.reshape(idx, params["new_sizes"])
    if name == "transpose":
        return np.transpose(idx, params["permutation"])
    if name == "squeeze":
        return np.squeeze(idx, axis=tuple(params["dimensions"]))
    if name == "expand_dims":
        return np.expand_dims(idx, tuple(params["dimensions"]))
    if name == "broadcast_in_dim":
        shape = tuple(params["shape"])
        bdims = tuple(int(d) for d in params["broadcast_dimensions"])
        expanded = [1] * len(shape)
        for j, d in enumerate(bdims):
            expanded[d] = idx.shape[j]
        return np.broadcast_to(np.reshape(idx, expanded), shape)
    if name == "rev":
        return np.flip(idx, tuple(params["dimensions"]))
    if name == "slice":
        strides = params.get("strides") or (1,) * idx.ndim
        sl = tuple(
            slice(s, e, st)
            for s, e, st in zip(
                params["start_indices"], params["limit_indices"], strides, strict=True
            )
        )
        return idx[sl]
    return None


def analyze(jaxpr: Jaxpr, num_params: int, differentiable: list[bool]) -> list[LeafUses]:
    """Find the uses of every parameter leaf (the first ``num_params`` invars of ``jaxpr``).

    ``differentiable[p]`` is False for leaves that are not floating point (ignored).
    """
    result = [LeafUses() for _ in range(num_params)]
    origin: dict = {}
    for p, v in enumerate(jaxpr.invars[:num_params]):
        if differentiable[p]:
            size = int(np.prod(v.aval.shape, dtype=np.int64))
            dtype = np.int32 if size < 2**31 else np.int64
            origin[v] = (p, np.arange(size, dtype=dtype).reshape(v.aval.shape))
    _analyze(jaxpr, origin, result, (), producer_primitives())
    for v in jaxpr.outvars:
        if not isinstance(v, Literal) and v in origin:
            result[origin[v][0]].fail("parameter returned as model output")
    return result


_OUTPUT_VIEWS = frozenset({"transpose", "reshape", "convert_element_type", "copy", "copy_p"})


def _track_dot_output(
    eqn, here: Path, from_dot: dict, consumers: Counter, producers: frozenset[str]
) -> None:
    """Follow the outputs of ``producers`` (dot_general, conv_general_dilated) through
    single-consumer views."""
    name = eqn.primitive.name
    if name in producers:
        from_dot[eqn.outvars[0]] = (here, ())
    elif name in _OUTPUT_VIEWS and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
        v = eqn.invars[0]
        if not isinstance(v, Literal) and v in from_dot and consumers[v] == 1:
            if name == "reshape" and eqn.params.get("dimensions") is not None:
                return
            dot, chain = from_dot[v]
            step = (name, dict(eqn.params), tuple(v.aval.shape))
            from_dot[eqn.outvars[0]] = (dot, chain + (step,))


def _analyze(
    jaxpr: Jaxpr, origin: dict, result: list[LeafUses], path: Path, producers: frozenset[str]
) -> None:
    consumers = Counter(
        v for e in jaxpr.eqns for v in e.invars if not isinstance(v, Literal)
    ) + Counter(v for v in jaxpr.outvars if not isinstance(v, Literal))
    from_dot: dict = {}  # var -> (path of the dot_general / conv, views applied since)
    for i, eqn in enumerate(jaxpr.eqns):
        here = path + (i,)
        _track_dot_output(eqn, here, from_dot, consumers, producers)
        derived = [
            (pos, origin[v])
            for pos, v in enumerate(eqn.invars)
            if not isinstance(v, Literal) and v in origin
        ]
        if not derived:
            continue
        name = eqn.primitive.name
        sub = sub_jaxpr(eqn)
        if sub is not None:
            inner_origin = {
                iv: origin[ov]
                for iv, ov in zip(sub[0].invars, eqn.invars, strict=True)
                if not isinstance(ov, Literal) and ov in origin
            }
            _analyze(sub[0], inner_origin, result, here, producers)
            for ov, iv in zip(eqn.outvars, sub[0].outvars, strict=True):
                if not isinstance(iv, Literal) and iv in inner_origin:
                    origin[ov] = inner_origin[iv]
            continue
        if len(derived) == 1 and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
            leaf, idx = derived[0][1]
            new = _view(name, eqn.params, idx)
            if new is not None:
                origin[eqn.outvars[0]] = (leaf, new)
                continue
        leaves = {leaf for _, (leaf, _) in derived}
        rule = find_rule(eqn, derived[0][0]) if len(derived) == 1 else None
        if rule is None:
            for leaf in leaves:
                result[leaf].fail(f"'{name}' consumes it")
            continue
        pos, (leaf, idx) = derived[0]
        other = [v for j, v in enumerate(eqn.invars) if j != pos]
        other_shape = tuple(other[0].aval.shape) if other else ()
        other_producer, other_chain = None, ()
        if len(other) == 1 and not isinstance(other[0], Literal) and consumers[other[0]] == 1:
            other_producer, other_chain = from_dot.get(other[0], (None, ()))
        use = Use(
            rule.name,
            here,
            pos,
            idx,
            dict(eqn.params),
            tuple(eqn.outvars[0].aval.shape),
            other_shape,
            other_producer,
            other_chain,
        )
        result[leaf].uses.append(use)
