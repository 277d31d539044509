"""Device meshes and shardings: one mesh with axes ``('data', 'fsdp')``, built once.

Batches are split over ``'data'`` (and, when training with FSDP, over ``'fsdp'`` too); params,
their EMA and optimizer state are laid out by :class:`ShardingRules`, a path -> logical-name ->
mesh-axis table that lives in the config (FSDP: the big UNet / ControlNet kernels split their
output channels over ``'fsdp'``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh (``jax.make_mesh``: device order fit to the topology) with
    Auto axis types, so that shardings are propagated by the compiler from the
    ``in_shardings``/``out_shardings`` and constraints we give (this jax defaults
    ``make_mesh`` to Explicit axes, which would put shardings into every array's type).

    ``data=-1`` takes every device not used by ``fsdp``.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} groups")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {n}")
    return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh, axes: str | tuple[str, ...] = "data") -> NamedSharding:
    """Leading (batch) axis over ``axes``, the rest replicated. Sampling splits the batch over
    ``'data'``; training (FSDP) over ``('data', 'fsdp')``, i.e. over every device."""
    return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows ``local`` -> the global array laid out by ``sharding`` (its leading
    axis the processes' rows in process order; replicated: every process holds it all)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


# --- Params: logical axis names by path, mesh axes by logical name (a table in the config) --


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How a pytree of arrays (params, EMA, optimizer state) is laid out on the mesh.

    Two small tables, both from the config:

    * ``param_axes``: ``((regex, names), ...)``. The first regex found (``re.search``) in a
      leaf's path (``"unet/down_blocks/0/resnets/1/conv1/kernel"``; optimizer moments carry
      the same path after a prefix such as ``"opt_state/1/0/mu/"``) gives the logical names
      of the leaf's *trailing* dims; leading dims and unmatched leaves are not sharded.
    * ``logical_rules``: ``((logical name, mesh axis | (mesh axes) | None), ...)``.

    A dim is sharded only if its size divides by the mesh axes' size, and a leaf smaller than
    ``min_size`` elements stays replicated (gathering it would cost more than it saves).

    Attributes:
      param_axes: the path table.
      logical_rules: the logical-name table.
      min_size: replicate leaves with fewer elements.
    """

    param_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    logical_rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = ()
    min_size: int = 2**16

    def __post_init__(self):
        for pattern, _ in self.param_axes:
            re.compile(pattern)  # a bad regex fails here, naming itself
        rules = dict(self.logical_rules)
        for _, names in self.param_axes:
            missing = [n for n in names if n is not None and n not in rules]
            if missing:
                raise ValueError(f"logical axis name(s) {missing} have no logical_rules entry")


# FSDP for sampling a converted or trained SD-2-size model (``python -m segsr_jax.sample
# --fsdp N``): the rules configs/segsr_sd2.py trains with: the UNet's and ControlNet's conv
# and linear kernels, the text encoder's projections and its token embedding split their
# output (or vocabulary) axis over 'fsdp'; small leaves stay replicated.
FSDP_RULES = ShardingRules(
    param_axes=(
        (r"(unet|controlnet)/.*kernel$", ("in", "out")),
        (r"text_encoder/.*(q_proj|k_proj|v_proj|out_proj|fc1|fc2)/kernel$", ("in", "out")),
        (r"text_encoder/.*token_embedding/embedding$", ("vocab", "embed")),
    ),
    logical_rules=(("in", None), ("out", "fsdp"), ("vocab", "fsdp"), ("embed", None)),
    min_size=2**18,
)


def path_str(path) -> str:
    """A jax key path as ``"a/b/0/c"`` (dict keys, attribute names and indices alike). The
    ``.value`` attribute that ends the paths of an ``nnx.State``'s leaves is left out, so a
    State and its ``nnx.to_pure_dict`` have the same paths (and shardings)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        parts.pop()
    return "/".join(parts)


def logical_axes(path: str, ndim: int, rules: ShardingRules) -> tuple[str | None, ...]:
    """The logical name of every dim of the leaf at ``path`` (None: not sharded)."""
    for pattern, names in rules.param_axes:
        if re.search(pattern, path):
            names = tuple(names)[-ndim:] if ndim else ()
            return (None,) * (ndim - len(names)) + names
    return (None,) * ndim


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules) -> P:
    """The PartitionSpec of one leaf under ``rules`` on ``mesh``."""
    if math.prod(shape) < rules.min_size:
        return P()
    table = dict(rules.logical_rules)
    spec, used = [], set()
    for size, name in zip(shape, logical_axes(path, len(shape), rules), strict=True):
        axes = table.get(name) if name is not None else None
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[a] for a in group)
        if not group or used & set(group) or size % ways:
            spec.append(None)
        else:
            spec.append(axes if isinstance(axes, str) else tuple(axes))
            used.update(group)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: ShardingRules, prefix: str = ""):
    """``NamedSharding`` of every leaf of ``tree`` (arrays or ShapeDtypeStructs) by its path;
    ``prefix`` is prepended to the paths (e.g. ``"opt_state/"``)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(
            mesh, partition_spec(prefix + path_str(p), tuple(x.shape), mesh, rules)
        ),
        tree,
    )


def place(tree, shardings):
    """Global arrays with ``shardings`` from values every process holds in full (e.g. params
    initialised from the same seed); each device receives only its own shard."""

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def enable_compilation_cache(cache_dir: str, min_compile_secs: float = 0.5) -> None:
    """Persist compiled XLA programs in ``cache_dir``, so that a rerun (or a resumed job)
    skips compiling every program that took at least ``min_compile_secs`` (the sampler
    command: 0.5, its few big programs; training: 0, as a from-scratch init is hundreds of
    sub-second programs)."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    # JAX fixes the cache location at its first compile; re-point it if that already happened.
    compilation_cache.reset_cache()
