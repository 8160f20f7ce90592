"""Data-parallel runs on several devices (``gaussnewton-experiments run EXP --devices N``).

A supervised run on ``N`` devices shards every mini-batch over a 1-D mesh of ``N`` devices with
the axis ``"data"`` (``NamedSharding(mesh, P("data"))``, ``AxisType.Auto``), and replicates the
params, the optimizer state and the training arrays; ``jax.jit`` then runs the unchanged
optimizer step SPMD (XLA inserts the collectives). The records are the same as on one device up
to the order of floating-point sums.

On CPU the ``N`` devices are forced host devices: :func:`request_devices` must run before jax
initializes its backend (the CLI calls it first thing).

Example:
    >>> from gaussnewton_experiments.devices import DataParallel
    >>> dp = DataParallel(None)  # one device: every method is the identity
    >>> dp.devices
    1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["DataParallel", "request_devices", "data_mesh", "use_devices", "current"]


def request_devices(n: int) -> None:
    """Make ``n`` devices available: on CPU force ``n`` host devices (before jax starts).

    Raises:
        ValueError: ``n < 1``.
        RuntimeError: jax was already initialized with fewer than ``n`` devices (the device count
            cannot change once the backend exists; start a fresh process).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"devices must be a positive integer, got {n!r}.")
    if n == 1:
        return
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        have = jax.device_count()
        if have < n:
            raise RuntimeError(
                f"--devices {n}: jax is already initialized with {have} device(s) and the count "
                "cannot change in this process; run in a fresh process, or set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts."
            )
        return
    if jax.config.jax_num_cpu_devices < n:  # -1 (unset) too
        jax.config.update("jax_num_cpu_devices", n)


def data_mesh(n: int):
    """A 1-D ``("data",)`` mesh (``AxisType.Auto``) over the first ``n`` devices.

    Raises:
        ValueError: fewer than ``n`` devices (see :func:`request_devices`).
    """
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(
            f"--devices {n}: only {len(devices)} {devices[0].platform} device(s); on CPU call "
            "request_devices(n) (the CLI does) before jax starts."
        )
    return Mesh(np.array(devices[:n]), ("data",), axis_types=(AxisType.Auto,))


class DataParallel:
    """Placement helpers for one run: batch rows over ``"data"``, everything else replicated.

    With ``mesh=None`` (one device) every method returns its argument unchanged.
    """

    def __init__(self, mesh):
        self.mesh = mesh

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    def check_batch(self, batch: int) -> None:
        """ValueError unless ``batch`` splits evenly over the devices."""
        if batch % self.devices:
            raise ValueError(
                f"batch_size={batch} is not divisible by --devices {self.devices}; use a batch "
                f"size that is a multiple of {self.devices} (e.g. --batch-size "
                f"{max(self.devices, batch - batch % self.devices)})."
            )

    def replicate(self, tree: Any) -> Any:
        """``tree`` placed whole on every device."""
        if self.mesh is None:
            return tree
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def shard(self, array: Any, axis: int = 0) -> Any:
        """``array`` split over the devices along ``axis`` (the batch axis)."""
        if self.mesh is None:
            return array
        import jax

        return jax.device_put(array, self._sharding(array.ndim, axis))

    def constrain(self, tree: Any, axis: int = 0) -> Any:
        """Inside ``jit``: every leaf's ``axis`` split over the devices (a sharding constraint)."""
        if self.mesh is None:
            return tree
        import jax

        return jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, self._sharding(a.ndim, axis)), tree
        )

    def _sharding(self, ndim: int, axis: int):
        from jax.sharding import NamedSharding, PartitionSpec

        spec = [None] * ndim
        spec[axis] = "data"
        return NamedSharding(self.mesh, PartitionSpec(*spec))


_CURRENT: list[DataParallel] = [DataParallel(None)]


def current() -> DataParallel:
    """The placement of the run in progress (one device unless inside :func:`use_devices`)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use_devices(n: int) -> Iterator[DataParallel]:
    """Runs inside the block are data-parallel over ``n`` devices (``n = 1``: one device)."""
    dp = DataParallel(None if n == 1 else data_mesh(n))
    _CURRENT.append(dp)
    try:
        if dp.mesh is None:
            yield dp
        else:
            import jax

            # the mesh in context: the library gathers per-example factors, never the Gram
            with jax.set_mesh(dp.mesh):
                yield dp
    finally:
        _CURRENT.pop()
