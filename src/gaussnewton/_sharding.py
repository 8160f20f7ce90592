r"""Where a step's data lives on a device mesh (docs/METHODS.md §7, docs/many_devices.md).

The batch of a step may be sharded over the devices of a :class:`jax.sharding.Mesh` (data
parallelism). Every per-example pass (outputs, ``g``, the per-example Gram factors, the VJP of
the direction) then runs on the device that holds the example; the row-space system is global,
so its inputs are gathered onto every device and it is solved replicated. What is gathered is
the per-example *factors* (``b·(width + outputs)`` numbers per layer), never the ``(b r)²`` Gram:
each device forms the Gram from the gathered factors. One all-reduce of the ``D``-vector (the
VJP back) ends the direction.

Two ways a batch is sharded, two mechanisms here:

* **jit with sharded inputs** (a mesh set with :func:`jax.set_mesh`, Auto or Explicit axes):
  :func:`replicate` places the factors and the right-hand sides replicated (``reshard`` on
  Explicit axes, a sharding constraint on Auto axes); XLA inserts the all-gathers. Without a mesh
  in context it does nothing, and XLA's partitioner chooses.
* **inside the user's** :func:`jax.shard_map` **with a named batch axis**
  (``gn.egn(..., axis_name="data")``): the code sees its local block of the batch; the batch
  reductions of :mod:`gaussnewton.linearization` become collectives over ``axis_name``
  (:class:`BatchAxis`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec, get_abstract_mesh

PyTree = Any

__all__ = [
    "NO_AXIS",
    "BatchAxis",
    "as_batch_axis",
    "like_batch",
    "reduced",
    "replicate",
    "sum_of_products",
]


def replicate(tree: PyTree) -> PyTree:
    """``tree`` placed replicated on every device of the mesh in context (no-op without one).

    On Explicit mesh axes this is :func:`jax.sharding.reshard` to ``P()`` (the typed sharding
    changes: a later ``dot_general`` of two batch-sharded operands is no longer ambiguous); on
    Auto axes a sharding constraint. Inside ``shard_map`` (Manual axes) nothing is done: the
    gathers there are explicit collectives over the batch axis name.
    """
    mesh = get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return tree
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)

    def one(a):
        if not isinstance(a, jax.Array | jax.core.Tracer) or jnp.ndim(a) == 0:
            return a
        if explicit:
            return jax.sharding.reshard(a, PartitionSpec())
        return jax.lax.with_sharding_constraint(a, PartitionSpec())

    return jax.tree_util.tree_map(one, tree)


@dataclasses.dataclass(frozen=True)
class BatchAxis:
    """The batch axis of a step run inside ``shard_map`` (``name``), or the whole batch (``None``).

    Every batch reduction of a step goes through these methods, so one code path serves one
    device (all of them identities) and a batch split over the devices of ``name``: each device
    holds ``n`` consecutive examples of the ``size · n`` in the batch (the order of
    :func:`jax.lax.all_gather` with ``tiled=True``). Quantities of the row space that a device
    owns (``g``, ``u``, per-example factors) are local; scalars and ``D``-vectors are global.
    """

    name: Any = None

    @property
    def sharded(self) -> bool:
        return self.name is not None

    def size(self) -> int:
        """The number of devices along the axis (1 without one)."""
        return 1 if self.name is None else jax.lax.axis_size(self.name)

    def sum(self, tree: PyTree) -> PyTree:
        """Sum over the devices (``psum``): local partial sums → the batch's sum."""
        return tree if self.name is None else jax.lax.psum(tree, self.name)

    def mean(self, tree: PyTree) -> PyTree:
        """Mean over the devices (``pmean``) of equal-sized local means → the batch mean."""
        return tree if self.name is None else jax.lax.pmean(tree, self.name)

    def all(self, flag: jax.Array) -> jax.Array:
        """Whether ``flag`` holds on every device."""
        if self.name is None:
            return flag
        return jax.lax.psum(jnp.logical_not(flag).astype(jnp.int32), self.name) == 0

    def gather(self, tree: PyTree) -> PyTree:
        """The local blocks of every device, concatenated along the example axis (all-gather)."""
        if self.name is None:
            return tree
        return jax.tree_util.tree_map(
            lambda a: jax.lax.all_gather(a, self.name, axis=0, tiled=True), tree
        )

    def local(self, a: jax.Array) -> jax.Array:
        """This device's block of a gathered (global) example-axis array."""
        if self.name is None:
            return a
        n = a.shape[0] // self.size()
        start = jax.lax.axis_index(self.name) * n
        return jax.lax.dynamic_slice_in_dim(a, start, n, axis=0)

    def varying(self, tree: PyTree) -> PyTree:
        """``tree`` (replicated parameters) typed as device-varying, so that derivatives taken
        with respect to it are this device's own (no implicit ``psum`` in the transpose)."""
        if self.name is None:
            return tree
        return jax.tree_util.tree_map(lambda a: jax.lax.pcast(a, self.name, to="varying"), tree)


def as_batch_axis(axis_name: Any) -> BatchAxis:
    """``axis_name`` (a name, a tuple of names, ``None`` or a :class:`BatchAxis`) as a BatchAxis."""
    return axis_name if isinstance(axis_name, BatchAxis) else BatchAxis(axis_name)


def _explicit_mesh() -> bool:
    mesh = get_abstract_mesh()
    return not mesh.empty and any(t == AxisType.Explicit for t in mesh.axis_types)


def like_batch(a: jax.Array, ref: jax.Array) -> jax.Array:
    """``a`` (a global row-space array) sharded along its example axis as ``ref`` is.

    On Explicit mesh axes the typed sharding of a replicated solution must match the batch
    sharding of the arrays it meets again (``g``, the VJP's residuals); elsewhere a no-op (XLA
    slices the local rows itself)."""
    if not _explicit_mesh():
        return a
    spec = jax.typeof(ref).sharding.spec
    lead = spec[0] if len(spec) else None
    return jax.sharding.reshard(a, PartitionSpec(lead))


def reduced() -> PartitionSpec | None:
    """``out_sharding`` of a contraction over the (possibly sharded) example axis: replicated on
    Explicit mesh axes (the sum over the batch, one all-reduce), ``None`` (XLA's choice) elsewhere."""
    return PartitionSpec() if _explicit_mesh() else None


def sum_of_products(a: PyTree, b: PyTree) -> jax.Array:
    """``Σ a·b`` over all leaves, accumulated in at least float32, as an elementwise product and
    a reduction (valid for batch-sharded vectors on Explicit mesh axes, unlike ``vdot``)."""
    parts = [
        jnp.sum(u.astype(jnp.promote_types(u.dtype, jnp.float32)) * v)
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    ]
    return sum(parts, jnp.zeros((), parts[0].dtype)) if parts else jnp.zeros(())


#: the batch axis of a step that sees its whole batch (no ``shard_map`` axis)
NO_AXIS = BatchAxis()


def _varying(a: Any) -> frozenset:
    aval = jax.typeof(a)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def vary_like(tree: PyTree, ref: Any) -> PyTree:
    """``tree`` typed as varying over the ``shard_map`` axes over which ``ref`` varies.

    Inside ``shard_map`` (``check_vma=True``) a VJP's cotangent must have its output's type, and a
    derivative with respect to an invariant value (a zero probe, a replicated parameter) of a
    device-varying function is summed over the devices; probes and seeds built with ``jnp.zeros``
    / ``jnp.eye`` go through this to stay this device's own. A no-op outside ``shard_map``.
    """
    axes = _varying(ref)
    if not axes:
        return tree

    def one(a):
        missing = tuple(sorted(axes - _varying(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree_util.tree_map(one, tree)
