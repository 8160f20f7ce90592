r"""The dense rule (``dot_general``) and the conv rule (``conv_general_dilated``): the
``(a . a)(G . G)`` factored form.

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
positions ``T`` (this adds the cross terms between uses; both rules share the family
``"linear"``). The factored cost ``n1 n2 B T^2 (C_in + k^2 C_out + k^2)`` is compared with
per-example gradients ``(n1 + n2) k B T C_in C_out + n1 n2 k^2 P``. A bias added right after a
factored dot / conv folds in as a column of ones in ``A`` (:meth:`DenseRule.fold_bias`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ._rules import GramRule, is_bijection

if TYPE_CHECKING:
    from ._analysis import Use

_HI = jax.lax.Precision.HIGHEST


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


def undo_output_views(idx: np.ndarray, chain: tuple) -> np.ndarray:
    """Map an index array laid out like the end of ``chain`` back to the dot output layout."""
    for name, params, in_shape in reversed(chain):
        if name == "transpose":
            idx = np.transpose(idx, np.argsort(params["permutation"]))
        elif name == "reshape":
            idx = np.reshape(idx, in_shape)
    return idx


def _dense_block(A1, G1, A2, G2):
    """``sum_b sum_{t,s} (A1_i[b,t] . A2_j[b,s]) (G1_ik[b,t] . G2_jl[b,s])`` -> (n1, k, n2, k).

    ``A`` is ``(n, B, T, C_in)``, ``G`` is ``(n, k, B, T, C_out)``; contractions are written as
    plain (batched) matrix products with the batch axis ``B`` leading (fast layouts on CPU).
    """
    n1, k, B, T, _ = G1.shape
    n2 = G2.shape[0]
    if B == 1 and T == 1:  # K = (a_i . a_j) (G_ik . G_jl): two matmuls and a broadcast product
        AA = jnp.matmul(A1[:, 0, 0], A2[:, 0, 0].T, precision=_HI)
        g1, g2 = G1[:, :, 0, 0].reshape(n1 * k, -1), G2[:, :, 0, 0].reshape(n2 * k, -1)
        GG = jnp.matmul(g1, g2.T, precision=_HI).reshape(n1, k, n2, k)
        return AA[:, None, :, None] * GG
    a1 = jnp.moveaxis(A1, 1, 0).reshape(B, n1 * T, -1)  # (B, n1 T, C_in), rows (i, t)
    a2 = jnp.moveaxis(A2, 1, 0).reshape(B, n2 * T, -1)
    g1 = jnp.transpose(G1, (2, 0, 3, 1, 4)).reshape(B, n1 * T * k, -1)  # rows (i, t, k)
    g2 = jnp.transpose(G2, (2, 0, 3, 1, 4)).reshape(B, n2 * T * k, -1)
    AA = jnp.matmul(a1, jnp.swapaxes(a2, 1, 2), precision=_HI).reshape(B, n1, T, n2, T)
    GG = jnp.matmul(g1, jnp.swapaxes(g2, 1, 2), precision=_HI).reshape(B, n1, T, k, n2, T, k)
    return jnp.einsum("bitjs,bitkjsl->ikjl", AA, GG, precision=_HI)


class DenseRule(GramRule):
    """``z = dot_general(a, W')`` in any layout (either operand), positions ``t``:
    ``K_W = sum_{t,s} (a_t . a_s)(G_t . G_s)``."""

    name = "dense"
    primitives = frozenset({"dot_general"})
    family = "linear"
    position_axes = (1, 2)  # A (B, T, C_in), G (k, B, T, C_out)
    producers = frozenset({"dot_general"})

    def form(self, use: Use) -> tuple[DenseForm, np.ndarray]:
        return dense_form(use)

    def layout_reason(self, kinds: tuple[str, ...], bijective: bool) -> str:
        if bijective:
            return "uses with different layouts of the weight"
        op = "dot" if kinds == ("dense",) else "conv" if kinds == ("conv",) else "dot / conv"
        return f"the weight is broadcast or sliced before the {op}"

    def cost(
        self, forms: Sequence[DenseForm], size: int, n1: int, n2: int, k: int
    ) -> tuple[float, float, int, int]:
        f0 = forms[0]
        T = sum(f.T for f in forms)
        cost_dense = float(n1 * n2 * f0.B * T * T * (f0.Cin + k * k * f0.Cout + k * k))
        cost_pergrad = float((n1 + n2) * k * f0.B * T * f0.Cin * f0.Cout + n1 * n2 * k * k * size)
        return cost_dense, cost_pergrad, n1 * n2 * f0.B * T * T * (1 + k * k), (n1 + n2) * k * size

    def activation(self, form: DenseForm, invals: list) -> jax.Array:
        return invals[form.a_operand]

    def factor(
        self, form: DenseForm, act: jax.Array, g: jax.Array, k: int
    ) -> tuple[jax.Array, jax.Array]:
        g = jnp.transpose(g, (0,) + tuple(1 + d for d in form.g_perm))
        a = jnp.transpose(act, form.a_perm).reshape(form.B, form.T, form.Cin)
        if form.with_bias:
            a = jnp.concatenate([a, jnp.ones((form.B, form.T, 1), a.dtype)], axis=-1)
        return a, g.reshape(k, form.B, form.T, form.Cout)

    def block(self, A1, G1, A2, G2, dtype) -> jax.Array:
        return _dense_block(*(u.astype(dtype) for u in (A1, G1, A2, G2)))

    def fold_bias(self, form: DenseForm, use: Use, size: int) -> bool:
        """A bias ``b`` broadcast over the positions of this use's output: ``A`` gets a column
        of ones (``B = 1`` only, once per use)."""
        if form.with_bias or form.B != 1:
            return False
        try:  # add may broadcast size-1 dimensions implicitly
            index = np.broadcast_to(use.index, use.out_shape)
        except ValueError:
            return False
        index = undo_output_views(index, use.other_chain)
        canon = np.transpose(index, form.g_perm).reshape(form.T, form.Cout)
        if not np.all(canon == canon[:1]) or not is_bijection(canon[0], size):
            return False
        form.with_bias = True
        return True


def _patches(f: ConvForm, lhs: jax.Array) -> jax.Array:
    """Input patches of a conv use, laid out like its output (patch features as its features)."""
    n = len(f.filter_shape)
    dn = jax.lax.ConvDimensionNumbers(f.lhs_spec, tuple(range(n + 2)), f.out_spec)
    return jax.lax.conv_general_dilated_patches(
        lhs,
        f.filter_shape,
        f.window_strides,
        f.padding,
        f.lhs_dilation,
        f.rhs_dilation,
        dn,
        precision=_HI,  # a pure selection: keep it exact (no TF32 / bf16 passes)
    )


class ConvRule(DenseRule):
    """``z = conv_general_dilated(x, W')`` (the kernel is the parameter): the dense rule on input
    patches; grouped convolutions take per-example gradients."""

    name = "conv"
    primitives = frozenset({"conv_general_dilated"})
    producers = frozenset({"conv_general_dilated"})

    def match(self, eqn: Any, operand: int) -> bool:
        return operand == 1

    def form(self, use: Use) -> tuple[ConvForm, np.ndarray] | str:
        reason = conv_group_reason(use)
        return conv_form(use) if reason is None else reason

    def factor(
        self, form: ConvForm, act: jax.Array, g: jax.Array, k: int
    ) -> tuple[jax.Array, jax.Array]:
        return super().factor(form, _patches(form, act), g, k)
