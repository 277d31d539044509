"""Device meshes and shardings (DESIGN §5): one mesh with axes ``('data', 'fsdp')``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh with Auto axis types (so ``with_sharding_constraint`` and
    jit shardings work as in the design; this jax defaults ``make_mesh`` to Explicit).

    ``data=-1`` takes every device not used by ``fsdp``.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} groups")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                         f"have {n}")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``'data'``, the rest replicated."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())
