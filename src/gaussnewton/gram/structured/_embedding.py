r"""The embedding rule: a ``gather`` of whole rows of a parameter table.

For ``z[t] = E[id_t]`` the gradient of ``f_ik`` is ``G_ikt`` scattered into row ``id_t``, so

    K[(i,k),(j,l)] = sum_{t,s} [id_it == id_js] (G_ikt . G_jls),

with ``T`` looked-up positions, rows of ``D`` entries, ``V`` rows. The factored cost
``n1 n2 T^2 (1 + k^2 D + k^2)`` is compared with per-example gradients
``(n1 + n2) k T D + n1 n2 k^2 V D``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ._rules import GramRule

if TYPE_CHECKING:
    from ._analysis import Use

_HI = jax.lax.Precision.HIGHEST


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


def _embed_block(ids1, G1, ids2, G2):
    """``sum_{t,s} [id1_it == id2_js] (G1_ikt . G2_jls)`` -> (n1, k, n2, k)."""
    n1, k, T, _ = G1.shape
    n2, _, S, _ = G2.shape
    eq = (ids1[:, :, None, None] == ids2[None, None, :, :]).astype(G1.dtype)  # (n1, T, n2, S)
    g1 = jnp.swapaxes(G1, 1, 2).reshape(n1 * T * k, -1)  # rows (i, t, k)
    g2 = jnp.swapaxes(G2, 1, 2).reshape(n2 * S * k, -1)
    GG = jnp.matmul(g1, g2.T, precision=_HI).reshape(n1, T, k, n2, S, k)
    return jnp.einsum("itjs,itkjsl->ikjl", eq, GG, precision=_HI)


class EmbeddingRule(GramRule):
    """``z = E[ids]`` (a gather of whole rows from the parameter table ``E``): factors are the
    row ids ``(T,)`` and the cotangents ``G (k, T, D)``."""

    name = "embedding"
    primitives = frozenset({"gather"})
    family = "embedding"

    def match(self, eqn: Any, operand: int) -> bool:
        return operand == 0

    def form(self, use: Use) -> tuple[EmbedForm, np.ndarray] | str:
        got = embed_form(use)
        return "a gather that does not look up whole table rows" if got is None else got

    def layout_reason(self, kinds: tuple[str, ...], bijective: bool) -> str:
        return "the table is sliced, broadcast or laid out differently between uses"

    def cost(
        self, forms: Sequence[EmbedForm], size: int, n1: int, n2: int, k: int
    ) -> tuple[float, float, int, int]:
        T, D, V = sum(f.T for f in forms), forms[0].D, forms[0].V
        cost_dense = float(n1 * n2 * T * T * (1 + k * k * D + k * k))
        cost_pergrad = float((n1 + n2) * k * T * D + n1 * n2 * k * k * V * D)
        return cost_dense, cost_pergrad, n1 * n2 * T * T * (1 + k * k), (n1 + n2) * k * size

    def activation(self, form: EmbedForm, invals: list) -> jax.Array:
        return invals[1]  # the indices

    def factor(
        self, form: EmbedForm, act: jax.Array, g: jax.Array, k: int
    ) -> tuple[jax.Array, jax.Array]:
        g = jnp.transpose(g, (0,) + tuple(1 + d for d in form.g_perm))
        ids = act.reshape(form.T).astype(jnp.int32)
        g = g.reshape(k, form.T, form.D)
        if form.fill:  # out-of-range ids looked up the fill value: no gradient
            g = g * ((ids >= 0) & (ids < form.V)).astype(g.dtype)[None, :, None]
        return jnp.clip(ids, 0, form.V - 1), g

    def block(self, A1, G1, A2, G2, dtype) -> jax.Array:
        return _embed_block(A1, G1.astype(dtype), A2, G2.astype(dtype))
