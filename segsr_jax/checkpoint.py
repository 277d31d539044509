"""The one checkpoint module: Orbax ``CheckpointManager`` folders with named items.

Layout of a checkpoint folder (a converted model, or a training workdir's ``checkpoints/``)::

    DIR/<step>/config      JSON: {"format": ..., "model": <SegSRConfig.to_dict()>, ...}
    DIR/<step>/params      the model's NNX state as a pure dict (float32)
    DIR/<step>/ema_params  (training) EMA of the trainable params, same tree as ``params``

Sampling restores ``ema_params`` when present, else ``params``, straight into the abstract
(optionally sharded) target built from the config that travels in the checkpoint, so a
checkpoint always rebuilds the model it was made from, and one that does not match the code
fails with a message naming the difference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

FORMAT = "segsr_jax/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be restored into the model its config describes."""


def _manager(directory: str | os.PathLike, *, read_only: bool = False,
             max_to_keep: int | None = None, handlers: Mapping | None = None,
             ) -> ocp.CheckpointManager:
    path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=read_only,
                                           create=not read_only)
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def _model_handlers() -> dict:
    """Handlers of the model items, so their metadata can be read before restoring."""
    return {"config": ocp.JsonCheckpointHandler(),
            "params": ocp.StandardCheckpointHandler(),
            "ema_params": ocp.StandardCheckpointHandler()}


def save_model(directory: str | os.PathLike, model: nnx.Module, config: Mapping, *,
               step: int = 0, extra_items: Mapping[str, object] | None = None) -> Path:
    """Write ``model``'s variables and its ``config`` dict as checkpoint ``step``.

    Orbax writes to a temporary folder and renames it when complete, so an interrupted save
    never leaves a checkpoint that looks finished. A failed save raises.
    """
    items = {"params": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
             "config": ocp.args.JsonSave({"format": FORMAT, **dict(config)})}
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
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    mgr.close()
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"{directory}/{step} is not a segsr_jax checkpoint (format "
            f"{cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT!r})")
    return cfg


def _flat_shapes(tree) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            tuple(leaf.shape) for path, leaf in flat}


def _check_tree_matches(saved, target, where: str) -> None:
    """Compare names and shapes before restoring, so a mismatch names the tensor."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k}: saved {have[k]}, model {want[k]}" for k in sorted(set(have) & set(want))
             if have[k] != want[k]]
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:3]})" if extra else "",
                 f"{len(wrong)} with other shapes (e.g. {wrong[:3]})" if wrong else ""]
        raise CheckpointMismatchError(
            f"{where}: the saved parameters do not match the model built from the checkpoint's "
            f"config: " + "; ".join(p for p in parts if p))


def restore_model(directory: str | os.PathLike, build: Callable[[dict], nnx.Module], *,
                  step: int | None = None, prefer_ema: bool = True,
                  shardings: Callable[[nnx.State], object] | None = None,
                  ) -> tuple[nnx.Module, dict]:
    """Rebuild a model from a checkpoint folder.

    Args:
      directory: the checkpoint folder (holding step sub-folders).
      build: ``config_dict -> nnx.Module``; called under ``nnx.eval_shape`` (no allocation).
      step: which step; default the latest finished one.
      prefer_ema: restore ``ema_params`` if the checkpoint has them.
      shardings: optional ``abstract_state -> sharding pytree`` to restore straight into
        sharded arrays.

    Returns:
      ``(model, config_dict)``.
    """
    cfg = read_checkpoint_config(directory, step)
    mgr = _manager(directory, read_only=True, handlers=_model_handlers())
    step = mgr.latest_step() if step is None else step
    abstract = nnx.eval_shape(lambda: build(cfg))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    if shardings is not None:
        shard_tree = shardings(target)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              target, shard_tree)
    try:
        metadata = mgr.item_metadata(step)
        name = ("ema_params" if prefer_ema and metadata.get("ema_params") is not None
                else "params")
        _check_tree_matches(getattr(metadata[name], "tree", metadata[name]), target,
                            f"{directory}/{step}/{name}")
        restored = mgr.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(target)}))[name]
    finally:
        mgr.close()
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), cfg
