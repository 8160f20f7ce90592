r"""Batch-coupling detection: does row ``i`` of ``model_fn(params, x)`` depend on other examples?

The per-example Gram strategies (``"jacobian"``, ``"structured"``) evaluate the model on a batch
of ONE example, ``f_i = model_fn(params, x[i:i+1])[0]``. That is the batched function's row ``i``
only when examples do not interact: no batch statistics (train-mode batch norm, ``x - x.mean(0)``),
no attention across the batch, and no dependence on an example's *position* (a ``(b, h)`` dropout
mask drawn from a closed-over key, ``iota`` along the batch axis). :func:`batch_coupling` decides
this from the jaxpr of the BATCHED function by a dataflow analysis of the batch axis.

Every value gets one state:

* ``int a``: it carries the batch axis at dimension ``a`` (per example along ``a``);
* ``frozenset C``: it has no batch axis (depends on parameters / constants only) and is known to
  be constant along the dimensions ``C`` (plus every size-1 dimension): a ``broadcast_in_dim`` of a
  bias is constant along its new dimensions, ``iota`` along all but its own;
* ``MIXED``: it depends on several examples (after a coupling was found; propagates silently).

Equations move the batch axis (transpose, reshape, broadcast, dot_general free dimensions, conv
batch dimension, gathers with batched indices, ...) and the analysis reports a *reason* wherever
the axis is mixed (reductions, contractions, cumulative ops, sorts, slices, pads, reversals,
concatenations along it, reshapes merging it, gathers / scatters across it, scans over it) or
where a batched value meets a batch-free one that is not constant along the batch axis
(position dependence). Sub-jaxprs (jit/pjit, closed_call, remat, custom_jvp_call,
custom_vjp_call, scan, while, cond) are analyzed recursively, loop carries to a fixpoint. Where
the analysis is unsure (an unknown primitive with a batched input) it reports coupling: exact
beats fast.

Example:
    >>> import jax.numpy as jnp
    >>> from gaussnewton.gram import batch_coupling
    >>> p = {"w": jnp.ones((3, 2))}
    >>> batch_coupling(lambda p, x: jnp.tanh(x @ p["w"]), p, jnp.ones((4, 3))).coupled
    False
    >>> c = batch_coupling(lambda p, x: (x - x.mean(0)) @ p["w"], p, jnp.ones((4, 3)))
    >>> c.coupled, c.reasons[0].split(" (")[0]
    (True, 'reduce_sum reduces over the batch axis')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal

__all__ = ["Coupling", "batch_coupling"]


@dataclass(frozen=True)
class Coupling:
    """Result of :func:`batch_coupling`.

    Attributes:
      coupled: ``True`` when row ``i`` of the batched model may differ from the model applied to
        example ``i`` alone (or the analysis could not rule it out).
      reasons: one line per place found, naming the primitive, what it did to the batch axis and
        (when known) the source line.
    """

    coupled: bool
    reasons: tuple[str, ...] = ()

    def summary(self, limit: int = 3) -> str:
        """The first ``limit`` reasons joined by ``"; "`` (``""`` when not coupled)."""
        more = len(self.reasons) - limit
        text = "; ".join(self.reasons[:limit])
        return text + (f"; and {more} more" if more > 0 else "")


class _Mixed:
    def __repr__(self) -> str:
        return "MIXED"


MIXED = _Mixed()
FREE = frozenset()  # batch-free, no known constant dimensions

#: elementwise primitives (outputs have the operands' common shape; rank-0 operands broadcast)
ELEMENTWISE = frozenset(
    """
    abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil
    clamp clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv
    erfc exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le
    lgamma log log1p logistic lt max min mul ne neg nextafter not or polygamma population_count
    pow random_gamma_grad real reduce_precision regularized_incomplete_beta rem round rsqrt
    select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
    stop_gradient sub tan tanh threefry2x32 xor zeta optimization_barrier sharding_constraint
    mesh_cast reshard pvary
    """.split()
)
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin"
    " reduce".split()
)
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


#: primitives analyzed even without batched inputs (sub-jaxprs, or constant dimensions tracked)
_TRACKED = (
    frozenset(CALLS)
    | {"scan", "while", "cond", "iota", "broadcast_in_dim", "transpose", "reshape"}
    | ELEMENTWISE
)


def _where(eqn: JaxprEqn) -> str:
    try:
        from jax._src import source_info_util

        loc = source_info_util.summarize(eqn.source_info)
    except Exception:  # source info is a courtesy: never let it break the analysis
        return ""
    return "" if not loc or loc.startswith("unknown") else f" (at {loc})"


def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _same_dim(shape: Sequence[int], out: Sequence[int], a: int) -> int | None:
    """The dimension of a reshape's output that is dimension ``a`` of its input, if any."""
    pre = int(np.prod(shape[:a], dtype=np.int64))
    acc = 1
    for j, s in enumerate(out):
        if acc == pre and s == shape[a]:
            return j
        acc *= s
        if acc > pre:
            break
    return None


def _const_along(state, shape: Sequence[int], axis: int) -> bool:
    """Is a batch-free value of ``shape`` constant along ``axis``?"""
    if len(shape) == 0:
        return True
    return axis in state or shape[axis] == 1


def _consts(state, shape) -> frozenset:
    return frozenset(state) | frozenset(i for i, s in enumerate(shape) if s == 1)


class _Analysis:
    def __init__(self, b: int):
        self.b = b
        self.reasons: list[str] = []
        self.calls: list[str] = []  # source lines of the enclosing call equations

    def flag(self, eqn: JaxprEqn, what: str):
        where = _where(eqn) or next((w for w in reversed(self.calls) if w), "")
        line = f"{eqn.primitive.name} {what}{where}"
        if line not in self.reasons:
            self.reasons.append(line)
        return MIXED

    # ---- jaxpr walk ---------------------------------------------------------------------------
    def run(self, jaxpr: Jaxpr, consts_states: Sequence, in_states: Sequence) -> list:
        env: dict[Any, Any] = {}

        def read(v):
            if isinstance(v, Literal):
                return frozenset(range(len(_shape(v))))
            return env[v]

        for v, s in zip(jaxpr.constvars, consts_states, strict=True):
            env[v] = s
        for v, s in zip(jaxpr.invars, in_states, strict=True):
            env[v] = s
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if any(s is MIXED for s in ins):
                outs = [MIXED] * len(eqn.outvars)
            elif not any(isinstance(s, int) for s in ins) and eqn.primitive.name not in _TRACKED:
                outs = [FREE] * len(eqn.outvars)  # batch-free in, batch-free out
            else:
                outs = self.eqn(eqn, ins)
            for v, s in zip(eqn.outvars, outs, strict=True):
                env[v] = s
        return [read(v) for v in jaxpr.outvars]

    def closed(self, closed: ClosedJaxpr | Jaxpr, in_states: Sequence, eqn=None) -> list:
        if isinstance(closed, ClosedJaxpr):
            jaxpr, consts = closed.jaxpr, closed.consts
        else:
            jaxpr, consts = closed, ()
        self.calls.append("" if eqn is None else _where(eqn))
        try:
            return self.run(jaxpr, [FREE] * len(consts), in_states)
        finally:
            self.calls.pop()

    # ---- one equation -------------------------------------------------------------------------
    def eqn(self, eqn: JaxprEqn, ins: list) -> list:
        name = eqn.primitive.name
        prm = eqn.params
        shapes = [_shape(v) for v in eqn.invars]
        nout = len(eqn.outvars)
        batched = [(i, s) for i, s in enumerate(ins) if isinstance(s, int)]

        if name in CALLS:
            sub = prm.get(CALLS[name])
            if sub is None:
                return self.unknown(eqn, ins)
            return self.closed(sub, ins, eqn)
        if name in ELEMENTWISE:
            return self.elementwise(eqn, ins, shapes)
        if name == "iota":
            d = prm["dimension"]
            return [frozenset(i for i in range(len(prm["shape"])) if i != d)]
        if name == "broadcast_in_dim":
            (s,), (shape,) = ins[:1], shapes[:1]
            bdims = tuple(prm["broadcast_dimensions"])
            if isinstance(s, int):
                return [bdims[s]]
            new = set(range(len(prm["shape"]))) - set(bdims)
            return [frozenset(new | {bdims[i] for i in _consts(s, shape)})]
        if name == "transpose":
            perm = tuple(prm["permutation"])
            s = ins[0]
            if isinstance(s, int):
                return [perm.index(s)]
            return [frozenset(i for i, p in enumerate(perm) if p in _consts(s, shapes[0]))]
        if name in ("reshape",):
            return [self.reshape(eqn, ins[0], shapes[0], _shape(eqn.outvars[0]))]
        if name == "squeeze":
            a = ins[0]
            dims = set(prm["dimensions"])
            if a in dims:
                return [self.flag(eqn, "squeezes the batch axis")]
            return [a - sum(1 for d in dims if d < a)]
        if name in REDUCTIONS:
            axes = set(prm["axes"])
            for _, a in batched:
                if a in axes:
                    return [self.flag(eqn, "reduces over the batch axis")] * nout
            a = batched[0][1]
            return [a - sum(1 for d in axes if d < a)] * nout
        if name in CUMULATIVE:
            if ins[0] == prm["axis"]:
                return [self.flag(eqn, "accumulates along the batch axis")]
            return [ins[0]]
        if name == "sort":
            return self.along(eqn, ins, shapes, prm["dimension"], "sorts along the batch axis")
        if name == "top_k":
            a = ins[0]
            if a == len(shapes[0]) - 1:
                return [self.flag(eqn, "takes top-k along the batch axis")] * nout
            return [a] * nout
        if name == "split":
            return self.along(eqn, ins, shapes, prm["axis"], "splits the batch axis", nout)
        if name == "concatenate":
            return self.along(
                eqn, ins, shapes, prm["dimension"], "concatenates along the batch axis"
            )
        if name == "stack":  # new axis `axis` in front of operand dimension `axis`
            ax = prm["axis"]
            (a,) = self.along(eqn, ins, shapes, -1, "", 1)
            return [a if not isinstance(a, int) else a + (a >= ax)]
        if name == "rev":
            if ins[0] in set(prm["dimensions"]):
                return [self.flag(eqn, "reverses the batch axis")]
            return [ins[0]]
        if name == "slice":
            a = ins[0]
            st, lim = prm["start_indices"][a], prm["limit_indices"][a]
            strides = prm["strides"]
            step = 1 if strides is None else strides[a]
            if (st, lim, step) != (0, shapes[0][a], 1):
                return [self.flag(eqn, f"slices the batch axis ({st}:{lim}:{step})")]
            return [a]
        if name == "pad":
            a = ins[0]
            if not isinstance(a, int):
                return [self.flag(eqn, "pads with a batch-dependent value")]
            if tuple(prm["padding_config"][a]) != (0, 0, 0):
                return [self.flag(eqn, "pads the batch axis")]
            return [a]
        if name == "dynamic_slice":
            a = ins[0]
            if not isinstance(a, int) or any(isinstance(s, int) for s in ins[1:]):
                return [self.flag(eqn, "slices at a batch-dependent index")]
            if prm["slice_sizes"][a] != shapes[0][a]:
                return [self.flag(eqn, "slices the batch axis")]
            return [a]
        if name == "dynamic_update_slice":
            return [self.dynamic_update_slice(eqn, ins, shapes)]
        if name == "dot_general":
            return [self.dot_general(eqn, ins, shapes)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins)]
        if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"):
            return self.reduce_window(eqn, ins, shapes, nout)
        if name == "gather":
            return [self.gather(eqn, ins, shapes)]
        if name.startswith("scatter"):
            return [self.scatter(eqn, ins, shapes)]
        if name in (
            "random_wrap",
            "random_unwrap",
            "random_bits",
            "random_split",
            "random_fold_in",
        ):
            return self.keys(eqn, ins, shapes, nout)
        if name in ("cholesky", "triangular_solve", "lu", "qr", "svd", "eigh", "eig"):
            for i, a in batched:
                if a >= len(shapes[i]) - 2:
                    return [self.flag(eqn, "acts on a matrix spanning the batch axis")] * nout
            return [batched[0][1] if len(_shape(o)) > batched[0][1] else FREE for o in eqn.outvars]
        if name == "scan":
            return self.scan(eqn, ins, shapes)
        if name == "while":
            return self.while_loop(eqn, ins)
        if name == "cond":
            return self.cond(eqn, ins)
        return self.unknown(eqn, ins)

    def unknown(self, eqn, ins):
        if any(isinstance(s, int) for s in ins):
            return [self.flag(eqn, "(not analyzed) has a batched input")] * len(eqn.outvars)
        return [FREE] * len(eqn.outvars)

    def elementwise(self, eqn, ins, shapes):
        axes = {s for s in ins if isinstance(s, int)}
        out_shapes = [_shape(o) for o in eqn.outvars]
        if eqn.primitive.name in ("optimization_barrier",):  # per operand identity
            return list(ins)
        if not axes:
            c = None
            for s, sh in zip(ins, shapes, strict=True):
                if len(sh):
                    c = _consts(s, sh) if c is None else c & _consts(s, sh)
            r = len(out_shapes[0]) if out_shapes else 0
            c = frozenset(range(r)) if c is None else frozenset(i for i in c if i < r)
            return [c] * len(eqn.outvars)
        if len(axes) > 1:
            return [self.flag(eqn, f"combines values batched on different axes {sorted(axes)}")] * (
                len(eqn.outvars)
            )
        (a,) = axes
        for s, sh in zip(ins, shapes, strict=True):
            if isinstance(s, frozenset) and not _const_along(s, sh, a):
                what = "combines a batched value with a batch-free value that varies along the "
                what += "batch axis (depends on the example's position in the batch)"
                return [self.flag(eqn, what)] * len(eqn.outvars)
        return [a] * len(eqn.outvars)

    def along(self, eqn, ins, shapes, dim, what, nout=None):
        nout = len(eqn.outvars) if nout is None else nout
        axes = {s for s in ins if isinstance(s, int)}
        if len(axes) > 1:
            return [self.flag(eqn, f"mixes batch axes {sorted(axes)}")] * nout
        (a,) = axes
        if a == dim:
            return [self.flag(eqn, what)] * nout
        for s, sh in zip(ins, shapes, strict=True):
            if isinstance(s, frozenset) and not _const_along(s, sh, a):
                return [self.flag(eqn, "joins batched data with position-dependent data")] * nout
        return [a] * nout

    def reshape(self, eqn, a, shape, out):
        if eqn.params.get("dimensions") is not None:
            return self.flag(eqn, "reshapes with a transpose") if isinstance(a, int) else FREE
        if not isinstance(a, int):  # keep the constant dimensions that survive unmerged
            kept = (_same_dim(shape, out, i) for i in _consts(a, shape) if shape[i] != 1)
            return frozenset(j for j in kept if j is not None)
        j = _same_dim(shape, out, a)
        if j is None:
            return self.flag(eqn, f"merges or splits the batch axis ({shape} -> {out})")
        return j

    def dot_general(self, eqn, ins, shapes):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
        sl, sr = ins
        nl, nr = len(shapes[0]), len(shapes[1])
        lf = [d for d in range(nl) if d not in lc + lb]
        rf = [d for d in range(nr) if d not in rc + rb]
        if isinstance(sl, int) and isinstance(sr, int):
            if sl in lb and sr in rb and lb.index(sl) == rb.index(sr):
                return lb.index(sl)
            return self.flag(eqn, "contracts or pairs examples of two batched operands")
        if isinstance(sr, int):  # swap roles
            sl, sr, lc, rc, lb, rb, lf, rf = sr, sl, rc, lc, rb, lb, rf, lf
            shapes = shapes[::-1]
            offset_free = len(rb) + len(rf)  # output = (batch, lhs free, rhs free)
        else:
            offset_free = len(lb)
        a = sl
        if a in lc:
            return self.flag(eqn, "contracts the batch axis")
        if a in lb:
            other = rb[lb.index(a)]
            if not _const_along(sr, shapes[1], other):
                return self.flag(
                    eqn, "pairs the batch axis with a batch-free operand's axis (position)"
                )
            return lb.index(a)
        return offset_free + lf.index(a)

    def conv(self, eqn, ins):
        dn = eqn.params["dimension_numbers"]
        sl, sr = ins
        if isinstance(sr, int):
            return self.flag(eqn, "has a batched kernel")
        if eqn.params.get("batch_group_count", 1) != 1:
            return self.flag(eqn, "groups over the batch dimension (batch_group_count > 1)")
        if sl != dn.lhs_spec[0]:
            return self.flag(eqn, "convolves along the batch axis")
        return dn.out_spec[0]

    def reduce_window(self, eqn, ins, shapes, nout):
        p = eqn.params
        axes = {s for s in ins if isinstance(s, int)}
        if len(axes) != 1:
            return [self.flag(eqn, "mixes batch axes")] * nout
        (a,) = axes
        window = (
            p["window_dimensions"][a],
            p["window_strides"][a],
            tuple(p["padding"][a]),
            p.get("base_dilation", (1,) * (a + 1))[a],
            p.get("window_dilation", (1,) * (a + 1))[a],
        )
        if window != (1, 1, (0, 0), 1, 1):
            return [self.flag(eqn, "pools across the batch axis")] * nout
        return [a] * nout

    def dynamic_update_slice(self, eqn, ins, shapes):
        so, su = ins[0], ins[1]
        if any(isinstance(s, int) for s in ins[2:]):
            return self.flag(eqn, "updates at a batch-dependent index")
        a = so if isinstance(so, int) else su
        if isinstance(so, int) and isinstance(su, int) and so != su:
            return self.flag(eqn, "mixes batch axes")
        if shapes[1][a] != shapes[0][a]:
            return self.flag(eqn, "updates part of the batch axis")
        if isinstance(so, frozenset) and not _const_along(so, shapes[0], a):
            return self.flag(eqn, "writes batched data into position-dependent data")
        return a

    def gather(self, eqn, ins, shapes):
        dn = eqn.params["dimension_numbers"]
        so, si = ins
        offset = tuple(dn.offset_dims)
        collapsed = tuple(dn.collapsed_slice_dims)
        start_map = tuple(dn.start_index_map)
        ob = tuple(getattr(dn, "operand_batching_dims", ()))
        ib = tuple(getattr(dn, "start_indices_batching_dims", ()))
        out_rank = len(_shape(eqn.outvars[0]))
        out_batch = [d for d in range(out_rank) if d not in offset]  # = indices dims but last
        ni = len(shapes[1])
        if isinstance(si, int):
            if si == ni - 1:
                return self.flag(eqn, "indexes with the batch axis as the index vector")
            res = out_batch[si]
            if isinstance(so, int):
                if so in ob and si in ib and ob.index(so) == ib.index(si):
                    return res
                return self.flag(eqn, "gathers across the batch axis (batched operand)")
            # batch-free table looked up by batched indices: the operand must not be indexed
            # per position along a dimension it pairs with the batch (operand batching dims)
            if si in ib and not _const_along(so, shapes[0], ob[ib.index(si)]):
                return self.flag(eqn, "pairs batched indices with a position-dependent operand")
            return res
        a = so  # batched operand, batch-free indices
        if a in ob and _const_along(si, shapes[1], ib[ob.index(a)]):
            return out_batch[ib[ob.index(a)]]  # same indices for every example (take_along_axis)
        if a in start_map or a in collapsed or a in ob:
            return self.flag(eqn, "gathers across the batch axis (indexes it)")
        if eqn.params["slice_sizes"][a] != shapes[0][a]:
            return self.flag(eqn, "gathers part of the batch axis")
        window = [d for d in range(len(shapes[0])) if d not in collapsed and d not in ob]
        return offset[window.index(a)]

    def scatter(self, eqn, ins, shapes):
        dn = eqn.params["dimension_numbers"]
        so, si, su = ins[0], ins[1], ins[2]
        uwd = tuple(dn.update_window_dims)
        inserted = tuple(dn.inserted_window_dims)
        sd = tuple(dn.scatter_dims_to_operand_dims)
        ob = tuple(getattr(dn, "operand_batching_dims", ()))
        ib = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
        if len(ins) > 3 or isinstance(si, int):
            if isinstance(si, int) and isinstance(so, int) and so in ob and si in ib:
                if ob.index(so) == ib.index(si):
                    return so
            return self.flag(eqn, "scatters across the batch axis")
        a = so if isinstance(so, int) else None
        window = [d for d in range(len(shapes[0])) if d not in inserted and d not in ob]
        if a is None:  # batch-free operand, batched updates: find the operand axis of the batch
            upd = [d for d in range(len(shapes[2])) if d in uwd]
            if su not in upd:
                return self.flag(eqn, "scatters batched updates across the operand")
            a = window[upd.index(su)]
            if not _const_along(so, shapes[0], a):
                return self.flag(eqn, "scatters batched data into position-dependent data")
        if a in sd or a in inserted or a in ob or a not in window:
            return self.flag(eqn, "scatters across the batch axis")
        expect = uwd[window.index(a)]
        if isinstance(su, int) and su != expect:
            return self.flag(eqn, "scatters updates batched on another axis")
        if isinstance(su, frozenset) and not _const_along(su, shapes[2], expect):
            return self.flag(eqn, "scatters position-dependent updates into batched data")
        if shapes[2][expect] != shapes[0][a]:
            return self.flag(eqn, "scatters into part of the batch axis")
        return a

    def keys(self, eqn, ins, shapes, nout):
        a = ins[0]
        if not isinstance(a, int) or any(isinstance(s, int) for s in ins[1:]):
            if eqn.primitive.name == "random_fold_in" and isinstance(ins[1], int):
                return self.elementwise(eqn, ins, shapes)
            if not isinstance(a, int):
                return self.unknown(eqn, ins)
        return [a] * nout

    # ---- control flow -------------------------------------------------------------------------
    def join(self, eqn, x, y, shape):
        if x is MIXED or y is MIXED:
            return MIXED
        if isinstance(x, int) and isinstance(y, int):
            return x if x == y else self.flag(eqn, "moves the batch axis of a loop carry")
        if isinstance(x, int) or isinstance(y, int):
            a, f = (x, y) if isinstance(x, int) else (y, x)
            if _const_along(f, shape, a):
                return a
            return self.flag(eqn, "carries position-dependent batch-free data with batched data")
        return _consts(x, shape) & _consts(y, shape)

    def fixpoint(self, eqn, body, fixed: list, carry: list, shapes: list, extra: list, n_out):
        """Iterate ``body(fixed + carry + extra) -> carry' + rest`` until the carry states settle."""
        saved = list(self.reasons)
        for _ in range(8):
            self.reasons = list(saved)
            outs = self.closed(body, fixed + carry + extra, eqn)
            new = [
                self.join(eqn, c, o, sh)
                for c, o, sh in zip(carry, outs[: len(carry)], shapes, strict=True)
            ]
            if new == carry:
                return outs
            carry = new
        self.reasons = saved
        return [self.flag(eqn, "loop carry analysis did not settle")] * n_out

    def scan(self, eqn, ins, shapes):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        xs = []
        for s, sh in zip(ins[nc + nk :], shapes[nc + nk :], strict=True):
            if s == 0:
                return [self.flag(eqn, "scans over the batch axis")] * len(eqn.outvars)
            if isinstance(s, int):
                xs.append(s - 1)
            else:
                xs.append(frozenset(i - 1 for i in _consts(s, sh) if i > 0))
        outs = self.fixpoint(
            eqn,
            p["jaxpr"],
            list(ins[:nc]),
            list(ins[nc : nc + nk]),
            shapes[nc : nc + nk],
            xs,
            len(eqn.outvars),
        )
        ys = []
        for o in outs[nk:]:
            if isinstance(o, int):
                ys.append(o + 1)
            elif isinstance(o, frozenset):
                ys.append(frozenset(i + 1 for i in o))
            else:
                ys.append(o)
        return list(outs[:nk]) + ys

    def while_loop(self, eqn, ins):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        carry = list(ins[cn + bn :])
        shapes = [_shape(v) for v in eqn.invars[cn + bn :]]
        outs = self.fixpoint(
            eqn, p["body_jaxpr"], list(ins[cn : cn + bn]), carry, shapes, [], len(eqn.outvars)
        )
        carry = [self.join(eqn, c, o, sh) for c, o, sh in zip(carry, outs, shapes, strict=True)]
        (pred,) = self.closed(p["cond_jaxpr"], list(ins[:cn]) + carry, eqn)
        if pred is MIXED or isinstance(pred, int):
            self.flag(eqn, "loops on a batch-dependent condition")
        return carry

    def cond(self, eqn, ins):
        if isinstance(ins[0], int):
            self.flag(eqn, "branches on a batched index")
            return [MIXED] * len(eqn.outvars)
        results = [self.closed(br, ins[1:], eqn) for br in eqn.params["branches"]]
        outs = results[0]
        for r in results[1:]:
            outs = [
                self.join(eqn, u, v, _shape(o))
                for u, v, o in zip(outs, r, eqn.outvars, strict=True)
            ]
        return outs


def _specs(params: Any, x: Any, b: int | None):
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    p_specs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in p_leaves]
    x_specs = []
    for a in x_leaves:
        shape = tuple(jnp.shape(a))
        if b is not None and len(shape):
            shape = (b,) + shape[1:]
        x_specs.append(jax.ShapeDtypeStruct(shape, jnp.result_type(a)))
    return p_def, x_def, p_specs, x_specs


def _analyze(model_fn: Callable, params: Any, x: Any, b: int | None) -> Coupling:
    p_def, x_def, p_specs, x_specs = _specs(params, x, b)
    n_p = len(p_specs)

    def flat_fn(*leaves):
        p = jax.tree_util.tree_unflatten(p_def, leaves[:n_p])
        xx = jax.tree_util.tree_unflatten(x_def, leaves[n_p:])
        return model_fn(p, xx)

    closed = jax.make_jaxpr(flat_fn)(*p_specs, *x_specs)
    sizes = {s.shape[0] for s in x_specs if len(s.shape)}
    if len(sizes) != 1:
        return Coupling(True, (f"inputs do not share one leading batch size ({sorted(sizes)})",))
    an = _Analysis(sizes.pop())
    in_states = [FREE] * n_p + [0 if len(s.shape) else FREE for s in x_specs]
    outs = an.run(closed.jaxpr, [FREE] * len(closed.consts), in_states)
    for v, s in zip(closed.jaxpr.outvars, outs, strict=True):
        shape = _shape(v)
        if isinstance(s, int) and s != 0:
            an.reasons.append(f"the output carries the batch axis at dimension {s}, not 0")
        elif isinstance(s, frozenset) and len(shape) and not _const_along(s, shape, 0):
            an.reasons.append("the output's rows depend on their position, not on the inputs")
    return Coupling(bool(an.reasons), tuple(an.reasons))


def batch_coupling(model_fn: Callable, params: Any, x: Any) -> Coupling:
    """Whether the examples of the batch ``x`` interact inside ``model_fn(params, x)``.

    Traces the batched model once with :func:`jax.make_jaxpr` on abstract shapes (works inside
    ``jit``) and follows the batch axis (the leading axis of every leaf of ``x``) through it (see
    the module doc). A batch of one is analyzed at batch size 2 when the model accepts it (so that
    ``x.mean(0)`` is still reported), else at size 1. The analysis never raises: if it fails, the
    model is reported coupled with the error as the reason (the exact, slower path).

    Returns:
      :class:`Coupling` ``(coupled, reasons)``.
    """
    leaves = jax.tree_util.tree_leaves(x)
    b = int(jnp.shape(leaves[0])[0]) if leaves and jnp.ndim(leaves[0]) else None
    if b == 1:
        try:
            return _analyze(model_fn, params, x, 2)
        except Exception:
            pass
    try:
        return _analyze(model_fn, params, x, None)
    except Exception as err:  # exact beats fast: an analysis failure means "coupled"
        return Coupling(True, (f"coupling analysis failed ({type(err).__name__}: {err})",))
