"""Per-leaf plan: canonical form of dense and conv uses and the flop model that picks the rule.

A dense use ``z = dot_general(a, W')`` is brought to the canonical form
``a -> A (B, T, C_in)``, ``dz -> G (k, B, T, C_out)``, ``W' -> (B, C_in, C_out)`` where ``B`` are
the dot's batch dimensions, ``T`` the free dimensions of ``a`` (positions: tokens, pixels, the
size-1 example axis) and ``C_in``/``C_out`` the contracted / free dimensions of ``W'``. Its
per-example gradient is ``dW'[b] = sum_t A[b, t] (x) G_k[b, t]`` and its Gram block is

    K[(i,k),(j,l)] = sum_b sum_{t,s} (A_i[b,t] . A_j[b,s]) (G_ik[b,t] . G_jl[b,s]).

A convolution ``z = conv_general_dilated(x, W')`` (``feature_group_count = batch_group_count = 1``)
is the same thing over its output positions: ``z[t, o] = sum_p P[t, p] W'[p, o]`` with the input
patches ``P = conv_general_dilated_patches(x, ...)`` (same strides, padding, dilations and layout),
so ``B = 1``, ``T`` = output positions (times the conv's own batch, 1 per example), ``A = P``
(``C_in`` = input features x filter window, input-feature-major like the patches) and ``G`` the
cotangent of ``z``; ``W'`` is laid out as ``(I, *window, O)``. Grouped convolutions keep
per-example gradients.

When the view ``W -> W'`` is a bijection (reshape / transpose / rev / convert, no broadcast or
slice), inner products of ``W'``-gradients equal those of ``W``-gradients, so the canonical form is
exact. Several dense / conv uses with the *same* canonical map are merged by concatenating
positions ``T`` (this adds the cross terms between uses). The factored cost
``n1 n2 B T^2 (C_in + k^2 C_out + k^2)`` is compared with per-example gradients
``(n1 + n2) k B T C_in C_out + n1 n2 k^2 P``; the cheaper wins, except that the factored form is
avoided when its ``(i, j, t, s)`` intermediates would exceed ``MEMORY_CAP`` entries (long
sequences, large feature maps) and per-example gradients are smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._analysis import LeafUses, Use, undo_output_views

#: methods reported by :func:`gaussnewton.gram.structured.explain` (``LeafPlan.method``).
DENSE = "factored"  # the (a . a)(G . G) form
PERGRAD = "per-example-gradient"  # per-example gradients of this leaf only, K_w = V V^T
NONE = "none"  # contributes nothing
#: rules (``LeafPlan.rule``): a use kind ("dense", "bias", "scale", "conv", "embedding"), "mixed"
#: (several kinds), or one of these.
FALLBACK = "fallback"  # unrecognized use: per-example Jacobian of this leaf
UNUSED = "unused"
CONSTANT = "non-float"


@dataclass
class DenseForm:
    """Canonicalization of one dense use (static, numpy/python only)."""

    path: tuple[int, ...]
    a_operand: int  # position of the activation operand in the dot_general
    a_perm: tuple[int, ...]  # transpose of a to (batch, free, contracting)
    g_perm: tuple[int, ...]  # transpose of z to (batch, a-free, w-free)
    B: int
    T: int
    Cin: int
    Cout: int
    with_bias: bool = False  # a bias added right after: A gets a column of ones


@dataclass
class ConvForm(DenseForm):
    """A ``conv_general_dilated`` use as a dense use on input patches (``B = 1``).

    ``A`` is ``conv_general_dilated_patches(lhs, filter_shape, window_strides, padding,
    lhs_dilation, rhs_dilation, (lhs_spec, iota, out_spec))``: laid out like the conv output,
    patch features in the output-feature dimension, ordered (input feature, window dim 0, ...).
    ``a_perm`` / ``g_perm`` bring patches / ``z`` to (batch, spatial..., feature).
    """

    filter_shape: tuple[int, ...] = ()
    window_strides: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    lhs_dilation: tuple[int, ...] = ()
    rhs_dilation: tuple[int, ...] = ()
    lhs_spec: tuple[int, ...] = ()
    out_spec: tuple[int, ...] = ()


@dataclass
class LeafPlan:
    """What the engine does for one parameter leaf.

    Attributes:
      name: the leaf's key path (``jax.tree_util.keystr``).
      rule: the structured rule recognized for all uses of the leaf (``"dense"``, ``"bias"``,
        ``"scale"``, ``"conv"``, ``"embedding"``, ``"mixed"``), or ``"fallback"`` (some use is
        not recognized), ``"unused"``, ``"non-float"``.
      method: how its Gram block is computed: ``"factored"`` (the dense, conv or embedding rule),
        ``"per-example-gradient"``, ``"none"``.
      kinds: kinds of the recognized uses.
      reason: why a per-example gradient or the fallback was chosen.
      cost_dense / cost_pergrad: flop estimates (``None`` when not applicable).
      coupling: for a batch-coupled model, the :class:`gaussnewton.gram.Coupling` that sent every
        leaf to the whole-batch method (``method`` ``"whole-batch-jacobian"`` or
        ``"whole-batch-matvec"``); ``None`` for per-example models.
    """

    name: str
    rule: str
    method: str = NONE
    kinds: tuple[str, ...] = ()
    reason: str = ""
    cost_dense: float | None = None
    cost_pergrad: float | None = None
    forms: list[DenseForm | ConvForm | EmbedForm] = field(default_factory=list, repr=False)
    coupling: Any = field(default=None, repr=False)  # Coupling of a batch-coupled model, else None


def dense_form(use: Use) -> tuple[DenseForm, np.ndarray]:
    """Canonical form of a dense use and its canonical index array ``(B, C_in, C_out)``."""
    (lc, rc), (lb, rb) = use.params["dimension_numbers"]
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
    if use.operand == 1:
        wc, wb, ac, ab = rc, rb, lc, lb
    else:
        wc, wb, ac, ab = lc, lb, rc, rb
    w_shape, a_shape = use.index.shape, use.other_shape
    wf = tuple(d for d in range(len(w_shape)) if d not in wc + wb)
    af = tuple(d for d in range(len(a_shape)) if d not in ac + ab)

    def size(shape, dims):
        return int(np.prod([shape[d] for d in dims], dtype=np.int64))

    B, Cin, Cout, T = size(w_shape, wb), size(w_shape, wc), size(w_shape, wf), size(a_shape, af)
    canon = np.transpose(use.index, wb + wc + wf).reshape(B, Cin, Cout)
    nb = len(wb)
    if use.operand == 1:  # z = (batch, a-free, w-free)
        g_perm = tuple(range(len(use.out_shape)))
    else:  # z = (batch, w-free, a-free)
        g_perm = (
            tuple(range(nb))
            + tuple(range(nb + len(wf), nb + len(wf) + len(af)))
            + tuple(range(nb, nb + len(wf)))
        )
    form = DenseForm(use.path, 1 - use.operand, ab + af + ac, g_perm, B, T, Cin, Cout)
    return form, canon


def _ints(t) -> tuple[int, ...]:
    return tuple(int(d) for d in t)


def conv_group_reason(use: Use) -> str | None:
    """Why a conv use has no factored form (grouped convolution), else ``None``."""
    fg = int(use.params.get("feature_group_count", 1))
    bg = int(use.params.get("batch_group_count", 1))
    if fg == 1 and bg == 1:
        return None
    return (
        f"grouped convolution (feature_group_count={fg}, batch_group_count={bg}): "
        "per-example gradients of the kernel (exact)"
    )


def conv_form(use: Use) -> tuple[ConvForm, np.ndarray]:
    """Canonical form of an ungrouped conv use and its canonical index array ``(1, C_in, C_out)``.

    ``C_in = I * prod(window)`` in the patch-feature order (input feature major, then the window
    dims in spatial order), ``C_out = O``.
    """
    lhs_spec, rhs_spec, out_spec = (_ints(s) for s in use.params["dimension_numbers"])
    w = use.index
    canon = np.transpose(w, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))
    Cout = int(w.shape[rhs_spec[0]])
    Cin = int(canon.size // Cout)
    T = int(np.prod(use.out_shape, dtype=np.int64) // Cout)
    perm = (out_spec[0], *out_spec[2:], out_spec[1])  # (batch, spatial..., feature)
    form = ConvForm(
        path=use.path,
        a_operand=0,  # lhs; the hook records it, the assembly turns it into patches
        a_perm=perm,  # patches are laid out like z
        g_perm=perm,
        B=1,
        T=T,
        Cin=Cin,
        Cout=Cout,
        filter_shape=tuple(int(w.shape[d]) for d in rhs_spec[2:]),
        window_strides=_ints(use.params["window_strides"]),
        padding=tuple((int(lo), int(hi)) for lo, hi in use.params["padding"]),
        lhs_dilation=_ints(use.params["lhs_dilation"]),
        rhs_dilation=_ints(use.params["rhs_dilation"]),
        lhs_spec=lhs_spec,
        out_spec=out_spec,
    )
    return form, canon.reshape(1, Cin, Cout)


@dataclass
class EmbedForm:
    """Canonicalization of one embedding lookup ``z[t] = E[id_t]`` (whole rows of a table).

    ``K[(i,k),(j,l)] = sum_{t,s} [id_it == id_js] (G_ikt . G_jls)``: ``T`` looked-up positions,
    rows of ``D`` entries, ``V`` rows; ``fill`` is True for FILL_OR_DROP (out-of-range ids look up
    zeros: no gradient), else ids are clipped like XLA does.
    """

    path: tuple[int, ...]
    g_perm: tuple[int, ...]  # transpose of z to (index positions, row entries)
    T: int
    D: int
    V: int
    fill: bool


def embed_form(use: Use) -> tuple[EmbedForm, np.ndarray] | None:
    """Canonical form of a gather of whole table rows, or ``None`` for other gathers."""
    dn = use.params["dimension_numbers"]
    shape = use.index.shape
    if (
        len(shape) < 1
        or tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(getattr(dn, "operand_batching_dims", ())) != ()
        or tuple(use.params["slice_sizes"]) != (1, *shape[1:])
        or not use.other_shape
        or use.other_shape[-1] != 1
    ):
        return None
    offset = tuple(int(d) for d in dn.offset_dims)
    zn = len(use.out_shape)
    g_perm = tuple(d for d in range(zn) if d not in offset) + offset
    T = int(np.prod(use.other_shape[:-1], dtype=np.int64))
    D = int(np.prod(shape[1:], dtype=np.int64))
    mode = use.params.get("mode")
    fill = "FILL" in str(getattr(mode, "name", mode)).upper()
    form = EmbedForm(use.path, g_perm, T, D, int(shape[0]), fill)
    return form, use.index.reshape(shape[0], D)


#: the factored form's (i, j, t, s) intermediates are avoided above this many entries when the
#: per-example gradients are smaller (2^27 float32 entries = 512 MiB).
MEMORY_CAP = 1 << 27


def _pergrad_better(cost_dense: float, cost_pergrad: float, mem_dense: int, mem_pergrad: int):
    """Per-example gradients win on flops, or when the factored form alone would blow memory."""
    if mem_dense > MEMORY_CAP and mem_pergrad < mem_dense:
        return True
    return cost_dense > cost_pergrad


def _is_bijection(canon: np.ndarray, size: int) -> bool:
    if canon.size != size:
        return False
    return bool(np.all(np.bincount(canon.ravel().astype(np.int64), minlength=size) == 1))


DENSE_METHODS = ("auto", DENSE, PERGRAD)
_LINEAR_KINDS = frozenset({"dense", "conv"})  # both have the (a . a)(G . G) form


def plan_leaf(
    name: str, found: LeafUses, size: int, n1: int, n2: int, k: int, dense_method: str = "auto"
) -> LeafPlan:
    """Choose the rule for one leaf of ``size`` entries (batch sizes ``n1``, ``n2``, ``k`` outputs).

    ``dense_method`` overrides the flop model for eligible dense / conv / embedding leaves
    (``"factored"`` or ``"per-example-gradient"``); ``"auto"`` picks the cheaper. Dense and conv
    uses of one leaf share the factored form (merged along positions) when their canonical
    layouts agree.
    """
    kinds = tuple(sorted({u.kind for u in found.uses}))
    if found.fallback is not None:
        return LeafPlan(name, FALLBACK, PERGRAD, kinds, found.fallback)
    if not found.uses:
        return LeafPlan(name, UNUSED)
    if kinds == ("embedding",):
        return _plan_embedding(name, found, size, n1, n2, k, dense_method)
    rule = kinds[0] if len(kinds) == 1 else "mixed"
    if not set(kinds) <= _LINEAR_KINDS:
        return LeafPlan(name, rule, PERGRAD, kinds, "per-example gradient of the leaf (exact)")
    for u in found.uses:
        reason = conv_group_reason(u) if u.kind == "conv" else None
        if reason is not None:
            return LeafPlan(name, rule, PERGRAD, kinds, reason)
    forms, canons = zip(
        *(conv_form(u) if u.kind == "conv" else dense_form(u) for u in found.uses), strict=True
    )
    if not _is_bijection(canons[0], size):
        op = "dot" if kinds == ("dense",) else "conv" if kinds == ("conv",) else "dot / conv"
        return LeafPlan(
            name, rule, PERGRAD, kinds, f"the weight is broadcast or sliced before the {op}"
        )
    if any(c.shape != canons[0].shape or not np.array_equal(c, canons[0]) for c in canons[1:]):
        reason = "uses with different layouts of the weight"
        return LeafPlan(name, rule, PERGRAD, kinds, reason)
    f0 = forms[0]
    T = sum(f.T for f in forms)
    cost_dense = float(n1 * n2 * f0.B * T * T * (f0.Cin + k * k * f0.Cout + k * k))
    cost_pergrad = float((n1 + n2) * k * f0.B * T * f0.Cin * f0.Cout + n1 * n2 * k * k * size)
    mem = (n1 * n2 * f0.B * T * T * (1 + k * k), (n1 + n2) * k * size)
    plan = LeafPlan(name, rule, DENSE, kinds, "", cost_dense, cost_pergrad, list(forms))
    if dense_method == PERGRAD or (
        dense_method == "auto" and _pergrad_better(cost_dense, cost_pergrad, *mem)
    ):
        plan.method = PERGRAD
        plan.reason = (
            "per-example gradients requested"
            if dense_method == PERGRAD
            else ("per-example gradients are cheaper (flop model)")
        )
        plan.forms = []
    return plan


def _plan_embedding(name, found, size, n1, n2, k, dense_method) -> LeafPlan:
    kinds = ("embedding",)
    pergrad = LeafPlan(
        name, "embedding", PERGRAD, kinds, "per-example gradient of the leaf (exact)"
    )
    got = [embed_form(u) for u in found.uses]
    if any(g is None for g in got):
        pergrad.reason = "a gather that does not look up whole table rows"
        return pergrad
    forms, canons = zip(*got, strict=True)
    if not _is_bijection(canons[0], size) or any(
        c.shape != canons[0].shape or not np.array_equal(c, canons[0]) for c in canons[1:]
    ):
        pergrad.reason = "the table is sliced, broadcast or laid out differently between uses"
        return pergrad
    T, D, V = sum(f.T for f in forms), forms[0].D, forms[0].V
    cost_dense = float(n1 * n2 * T * T * (1 + k * k * D + k * k))
    cost_pergrad = float((n1 + n2) * k * T * D + n1 * n2 * k * k * V * D)
    mem = (n1 * n2 * T * T * (1 + k * k), (n1 + n2) * k * size)
    plan = LeafPlan(name, "embedding", DENSE, kinds, "", cost_dense, cost_pergrad, list(forms))
    if dense_method == PERGRAD or (
        dense_method == "auto" and _pergrad_better(cost_dense, cost_pergrad, *mem)
    ):
        plan.method, plan.forms = PERGRAD, []
        plan.reason = (
            "per-example gradients requested"
            if dense_method == PERGRAD
            else ("per-example gradients are cheaper (flop model)")
        )
    return plan


def merge_biases(plans: list[LeafPlan], found: list[LeafUses], sizes: list[int]) -> None:
    """Fold bias leaves into the factored rule of the ``dot_general`` / conv they are added to.

    For ``z = a W + b`` (the dot's or conv's output used only by the add, ``b`` broadcast over
    positions)
    ``dz/db`` is ``G`` summed over positions, so ``K_W + K_b = sum_{t,s} (a_t . a_s + 1)(G_t . G_s)``:
    a column of ones appended to ``A`` replaces the bias' own per-example gradients.
    """
    dense_at = {
        pl.forms[0].path: pl
        for pl in plans
        if pl.method == DENSE and len(pl.forms) == 1 and isinstance(pl.forms[0], DenseForm)
    }
    for pl, f, size in zip(plans, found, sizes, strict=True):
        if pl.rule != "bias" or len(f.uses) != 1:
            continue
        use = f.uses[0]  # add / sub: the sign of dz/db cancels in the Gram
        target = dense_at.get(use.other_producer)
        if target is None or target.forms[0].with_bias or target.forms[0].B != 1:
            continue
        form = target.forms[0]
        try:  # add may broadcast size-1 dimensions implicitly
            index = np.broadcast_to(use.index, use.out_shape)
        except ValueError:
            continue
        index = undo_output_views(index, use.other_chain)
        canon = np.transpose(index, form.g_perm).reshape(form.T, form.Cout)
        if not np.all(canon == canon[:1]) or not _is_bijection(canon[0], size):
            continue
        form.with_bias = True
        pl.method, pl.reason = DENSE, f"merged into the {target.rule} rule of {target.name}"
