"""The one checkpoint module: Orbax ``CheckpointManager`` folders with named items.

Layout of a checkpoint folder (a converted model, or a training workdir's ``checkpoints/``)::

    DIR/<step>/config      JSON: {"format": ..., "model": <SegSRConfig.to_dict()>, ...}
    DIR/<step>/params      the model's NNX state as a pure dict (float32)
    DIR/<step>/ema_params  (training) EMA of the trainable params: a sub-tree of ``params``
    DIR/<step>/opt_state   (training) optimizer state of the trainable params
    DIR/<step>/train       (training) {"step", "rng"}
    DIR/<step>/data        (training) grain iterator state, one JSON file per process
    DIR/tokenizer/         the CLIP tokenizer the prompts are encoded with
    DIR/<step>.broken-<UTC time>/  (training) a step a resume found broken, moved aside and
                           kept (``TrainCheckpointer.restore``); Orbax ignores it

Sampling restores ``params`` with ``ema_params`` put over them when present, straight into
the abstract (optionally sharded) target built from the config that travels in the
checkpoint, so a checkpoint always rebuilds the model it was made from, and one that does not
match the code fails with a message naming the difference. Training runs save and resume
through :class:`segsr_jax.training.checkpointer.TrainCheckpointer`, in the same layout;
paths may be local or ``gs://`` (Orbax handles both).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

FORMAT = "segsr_jax/1"
# Orbax splits the write of every replicated array over its replicas, slicing each array
# with an eager op per shape: on a model's hundreds of small biases and norms that costs
# hundreds of one-off compiles at the first save and gains nothing. Only arrays whose
# per-replica slice is at least 1 MiB are split.
MIN_REPLICA_SLICE_BYTES = 2**20


@functools.cache
def register_array_handler() -> None:
    """Orbax's ``jax.Array`` handler with :data:`MIN_REPLICA_SLICE_BYTES`; Orbax keeps one
    global registry, so this is done once, when this module first opens a checkpoint (not on
    import: importing a module changes nobody's Orbax)."""
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
        ),
        override=True,
    )


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI (``gs://bucket/run``), False for a local (or mounted) path."""
    return "://" in os.fspath(path)


def copy_tree(src: epath.Path, dest: epath.Path) -> None:
    """Copy the folder ``src`` into ``dest`` (created), file by file; either side may be
    local or remote. Recurses with ``iterdir`` (epath's ``walk`` drops the ``gs://``
    prefix on fsspec backends)."""
    dest.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dest / child.name)
        else:
            (dest / child.name).write_bytes(child.read_bytes())


def load_tokenizer(folder: str | os.PathLike):
    """:func:`segsr_jax.weights.load_tokenizer` of a local or ``gs://`` folder, e.g. a
    checkpoint's ``tokenizer/`` (transformers reads only local files, so a remote one is
    loaded from a temporary local copy; the tokenizer's ``source`` names the remote
    folder)."""
    from segsr_jax import weights

    if not is_remote(folder):
        return weights.load_tokenizer(folder)
    with tempfile.TemporaryDirectory(prefix="segsr_jax_tokenizer_") as local:
        copy_tree(epath.Path(folder), epath.Path(local))
        tokenizer = weights.load_tokenizer(local)
    tokenizer.source = os.fspath(folder)  # the local copy is gone; name where it came from
    return tokenizer


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be restored into the model its config describes."""


def _manager(
    directory: str | os.PathLike,
    *,
    read_only: bool = False,
    max_to_keep: int | None = None,
    handlers: Mapping | None = None,
) -> ocp.CheckpointManager:
    register_array_handler()
    path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, read_only=read_only, create=not read_only
    )
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def item_handlers() -> dict:
    """Handlers of every item a checkpoint may hold, so metadata can be read before
    restoring (and Orbax knows what the items it is not asked for are)."""
    return {
        "config": ocp.JsonCheckpointHandler(),
        "params": ocp.StandardCheckpointHandler(),
        "ema_params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "train": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }


def save_model(
    directory: str | os.PathLike,
    model: nnx.Module,
    config: Mapping,
    *,
    step: int = 0,
    extra_items: Mapping[str, object] | None = None,
) -> Path:
    """Write ``model``'s variables and its ``config`` dict as checkpoint ``step``.

    Orbax writes to a temporary folder and renames it when complete, so an interrupted save
    never leaves a checkpoint that looks finished. A failed save raises.
    """
    items = {
        "params": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
        "config": ocp.args.JsonSave({"format": FORMAT, **dict(config)}),
    }
    for name, value in (extra_items or {}).items():
        items[name] = ocp.args.StandardSave(value)
    mgr = _manager(directory)
    mgr.save(step, args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return Path(str(directory)) / str(step)


def read_checkpoint_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config JSON of checkpoint ``step`` (default: the latest) in ``directory``."""
    if not str(directory).startswith("gs://") and not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {directory}")
    mgr = _manager(directory, read_only=True)
    step = mgr.latest_step() if step is None else step
    if step is None:
        hint = Path(directory) / "checkpoints"  # a training workdir holds them there
        raise FileNotFoundError(
            f"no finished checkpoint in {directory}"
            + (
                f"; did you mean {hint}?"
                if not str(directory).startswith("gs://") and hint.is_dir()
                else ""
            )
        )
    cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    mgr.close()
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"{directory}/{step} is not a segsr_jax checkpoint (format "
            f"{cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT!r})"
        )
    return cfg


def _flat_shapes(tree) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in flat
    }


def check_tree_matches(saved, target, where: str, may_lack=None) -> None:
    """Compare names and shapes before restoring, so a mismatch names the tensor.
    ``may_lack``: ``path -> bool``, the model's parameters the saved tree need not hold."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    missing = sorted(k for k in set(want) - set(have) if not (may_lack and may_lack(k)))
    extra = sorted(set(have) - set(want))
    wrong = [
        f"{k}: saved {have[k]}, model {want[k]}"
        for k in sorted(set(have) & set(want))
        if have[k] != want[k]
    ]
    if missing or extra or wrong:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[:3]})" if extra else "",
            f"{len(wrong)} with other shapes (e.g. {wrong[:3]})" if wrong else "",
        ]
        raise CheckpointMismatchError(
            f"{where}: the saved parameters do not match the model built from the checkpoint's "
            f"config: " + "; ".join(p for p in parts if p)
        )


def _subtree(tree, keep: dict):
    """The leaves of ``tree`` whose paths are in the metadata tree ``keep`` (Orbax metadata
    has string keys where the model's pure dict has ints: nnx.List indices)."""
    by_name = {str(k): k for k in tree}
    return {
        by_name[k]: (_subtree(tree[by_name[k]], v) if isinstance(v, Mapping) else tree[by_name[k]])
        for k, v in keep.items()
        if k in by_name
    }


def _fill_zeros(target, restored):
    """``target``'s tree with ``restored``'s leaves where it has them and zeros (of the
    target's shape, dtype and sharding) elsewhere."""
    if not isinstance(target, Mapping):
        if restored is not None:
            return restored
        return jnp.zeros(target.shape, target.dtype, device=getattr(target, "sharding", None))
    by_name = {str(k): v for k, v in (restored or {}).items()}
    return {k: _fill_zeros(v, by_name.get(str(k))) for k, v in target.items()}


def _overlay(base: dict, top: dict) -> dict:
    """``base`` with the leaves of ``top`` (a sub-tree of it) put in their place."""
    return {
        k: _overlay(v, top[k]) if k in top and isinstance(v, dict) else top.get(k, v)
        for k, v in base.items()
    }


def restore_model(
    directory: str | os.PathLike,
    build: Callable[[dict], nnx.Module],
    *,
    step: int | None = None,
    prefer_ema: bool = True,
    shardings: Callable[[nnx.State], object] | None = None,
    may_lack: Callable[[str], bool] | None = None,
) -> tuple[nnx.Module, dict]:
    """Rebuild a model from a checkpoint folder.

    Args:
      directory: the checkpoint folder (holding step sub-folders).
      build: ``config_dict -> nnx.Module``; called under ``nnx.eval_shape`` (no allocation).
      step: which step; default the latest finished one.
      prefer_ema: put the checkpoint's ``ema_params`` (all params, or a training run's
        trainable sub-tree) over its ``params``.
      shardings: optional ``abstract_state -> sharding pytree`` to restore straight into
        sharded arrays.
      may_lack: ``"part/module/.../kernel" -> bool``: parameters of the built model the
        checkpoint may not hold (a later stage's new zero-initialised heads, e.g. the
        bridge's ``level_out``); they start at zero. Any other difference is an error.

    Returns:
      ``(model, config_dict)``.
    """
    cfg = read_checkpoint_config(directory, step)
    mgr = _manager(directory, read_only=True, handlers=item_handlers())
    step = mgr.latest_step() if step is None else step
    abstract = nnx.eval_shape(lambda: build(cfg))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    if shardings is not None:
        shard_tree = shardings(target)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shard_tree
        )
    try:
        metadata = mgr.item_metadata(step)
        params_meta = metadata_tree(metadata["params"])
        check_tree_matches(params_meta, target, f"{directory}/{step}/params", may_lack)
        saved_target = target if may_lack is None else _subtree(target, params_meta)
        items = {"params": ocp.args.StandardRestore(saved_target)}
        ema_meta = metadata_tree(metadata.get("ema_params")) if prefer_ema else None
        if ema_meta is not None:
            ema_target = _subtree(target, ema_meta)
            check_tree_matches(ema_meta, ema_target, f"{directory}/{step}/ema_params")
            items["ema_params"] = ocp.args.StandardRestore(ema_target)
        restored = mgr.restore(step, args=ocp.args.Composite(**items))
    finally:
        mgr.close()
    params = restored["params"]
    if may_lack is not None:
        params = _fill_zeros(target, params)
    if ema_meta is not None:
        params = _overlay(params, restored["ema_params"])
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), cfg


def metadata_tree(item_metadata):
    """The tree of array metadata of one item (None if the checkpoint lacks the item)."""
    return None if item_metadata is None else getattr(item_metadata, "tree", item_metadata)
