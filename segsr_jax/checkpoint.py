"""The one checkpoint module: Orbax ``CheckpointManager`` folders with named items.

Layout of a checkpoint folder (a converted model, or a training workdir's ``checkpoints/``)::

    DIR/<step>/config      JSON: {"format": ..., "model": <SegSRConfig.to_dict()>, ...}
    DIR/<step>/params      the model's NNX state as a pure dict (float32)
    DIR/<step>/ema_params  (training) EMA of the trainable params: a sub-tree of ``params``
    DIR/<step>/opt_state   (training) optimizer state of the trainable params
    DIR/<step>/train       (training) {"step", "rng"}
    DIR/<step>/data        (training) grain iterator state, one JSON file per process
    DIR/tokenizer/         the CLIP tokenizer the prompts are encoded with

Sampling restores ``params`` with ``ema_params`` put over them when present, straight into
the abstract (optionally sharded) target built from the config that travels in the
checkpoint, so a checkpoint always rebuilds the model it was made from, and one that does not
match the code fails with a message naming the difference. Training runs save and resume
through :class:`TrainCheckpointer`; paths may be local or ``gs://`` (Orbax handles both).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

FORMAT = "segsr_jax/1"
# Orbax splits the write of every replicated array over its replicas, slicing each array
# with an eager op per shape: on a model's hundreds of small biases and norms that costs
# hundreds of one-off compiles at the first save and gains nothing. Only arrays whose
# per-replica slice is at least 1 MiB are split.
MIN_REPLICA_SLICE_BYTES = 2**20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be restored into the model its config describes."""


def _manager(directory: str | os.PathLike, *, read_only: bool = False,
             max_to_keep: int | None = None, handlers: Mapping | None = None,
             ) -> ocp.CheckpointManager:
    path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=read_only,
                                           create=not read_only)
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def _item_handlers() -> dict:
    """Handlers of every item a checkpoint may hold, so metadata can be read before
    restoring (and Orbax knows what the items it is not asked for are)."""
    return {"config": ocp.JsonCheckpointHandler(),
            "params": ocp.StandardCheckpointHandler(),
            "ema_params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler()}


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
        hint = Path(directory) / "checkpoints"  # a training workdir holds them there
        raise FileNotFoundError(f"no finished checkpoint in {directory}" + (
            f"; did you mean {hint}?" if not str(directory).startswith("gs://")
            and hint.is_dir() else ""))
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


def _subtree(tree, keep: dict):
    """The leaves of ``tree`` whose paths are in the metadata tree ``keep`` (Orbax metadata
    has string keys where the model's pure dict has ints: nnx.List indices)."""
    by_name = {str(k): k for k in tree}
    return {by_name[k]: (_subtree(tree[by_name[k]], v) if isinstance(v, Mapping)
                         else tree[by_name[k]])
            for k, v in keep.items() if k in by_name}


def _overlay(base: dict, top: dict) -> dict:
    """``base`` with the leaves of ``top`` (a sub-tree of it) put in their place."""
    return {k: _overlay(v, top[k]) if k in top and isinstance(v, dict) else top.get(k, v)
            for k, v in base.items()}


def restore_model(directory: str | os.PathLike, build: Callable[[dict], nnx.Module], *,
                  step: int | None = None, prefer_ema: bool = True,
                  shardings: Callable[[nnx.State], object] | None = None,
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

    Returns:
      ``(model, config_dict)``.
    """
    cfg = read_checkpoint_config(directory, step)
    mgr = _manager(directory, read_only=True, handlers=_item_handlers())
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
        params_meta = _metadata_tree(metadata["params"])
        _check_tree_matches(params_meta, target, f"{directory}/{step}/params")
        items = {"params": ocp.args.StandardRestore(target)}
        ema_meta = _metadata_tree(metadata.get("ema_params")) if prefer_ema else None
        if ema_meta is not None:
            ema_target = _subtree(target, ema_meta)
            _check_tree_matches(ema_meta, ema_target, f"{directory}/{step}/ema_params")
            items["ema_params"] = ocp.args.StandardRestore(ema_target)
        restored = mgr.restore(step, args=ocp.args.Composite(**items))
    finally:
        mgr.close()
    params = restored["params"]
    if ema_meta is not None:
        params = _overlay(params, restored["ema_params"])
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), cfg


def _metadata_tree(item_metadata):
    """The tree of array metadata of one item (None if the checkpoint lacks the item)."""
    return None if item_metadata is None else getattr(item_metadata, "tree", item_metadata)


# --- Training runs ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """When a training run saves and what it keeps.

    Attributes:
      every: save every this many steps (a run also saves at its last step and when
        preempted).
      keep_last: keep the latest K checkpoints...
      keep_every: ...and, for good, every step that is a multiple of M (0: none).
      async_save: write in a background thread (the step waits only for the device-to-host
        copy); a failed write raises at the next save or at :meth:`TrainCheckpointer.wait`.
    """

    every: int = 1000
    keep_last: int = 3
    keep_every: int = 0
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1 or self.keep_every < 0:
            raise ValueError(f"bad checkpoint options {self}")


class TrainCheckpointer:
    """The checkpoints of one training run (``WORKDIR/checkpoints``).

    Items of every step, all written together and committed atomically by Orbax:
    ``config`` (JSON, as :func:`save_model`), ``params`` (the full model: trainable and frozen,
    so every checkpoint samples on its own), ``ema_params`` (the EMA of the trainable
    sub-tree; sampling puts it over ``params``), ``opt_state``, ``train`` (step and RNG key
    data) and ``data`` (each process's grain iterator state, one JSON file per process).
    """

    def __init__(self, directory: str | os.PathLike, options: CheckpointOptions):
        self.directory = directory
        self.options = options
        path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            path,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=options.keep_last, keep_period=options.keep_every or None,
                enable_async_checkpointing=options.async_save, create=True),
            item_handlers=_item_handlers())

    def all_steps(self) -> list[int]:
        """Finished checkpoints, ascending (Orbax ignores unfinished temporary folders)."""
        return sorted(self._mgr.all_steps())

    def save(self, step: int, *, params: dict, ema_params: dict, opt_state, train: dict,
             data_iterator, config: Mapping) -> bool:
        """Save step ``step`` (asynchronously if so configured); False if it already exists."""
        if step in self._mgr.all_steps():
            return False
        self._mgr.save(step, force=True, args=ocp.args.Composite(
            config=ocp.args.JsonSave({"format": FORMAT, **dict(config)}),
            params=ocp.args.StandardSave(params),
            ema_params=ocp.args.StandardSave(ema_params),
            opt_state=ocp.args.StandardSave(opt_state),
            train=ocp.args.StandardSave(train),
            data=grain.checkpoint.CheckpointSave(data_iterator)))
        return True

    def restore(self, targets: Mapping[str, object], data_iterator,
                report: Callable[[str], None] = print) -> tuple[int, dict] | None:
        """Restore the latest readable checkpoint into ``targets`` (abstract, sharded trees for
        ``params``, ``ema_params``, ``opt_state`` and ``train``) and ``data_iterator``.

        A checkpoint that cannot be read (a missing or damaged file) is reported through
        ``report`` and the previous one is tried; once one restores, the unreadable newer
        ones are deleted (reported too), so the run's next saves are not shadowed by them.
        One whose trees do not match ``targets`` raises :class:`CheckpointMismatchError` (a
        config change, not damage).

        Returns:
          ``(step, restored items)``, or None when the folder holds no checkpoint.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            where = f"{self.directory}/{step}"
            try:
                meta = self._mgr.item_metadata(step)
                for name in ("params", "ema_params"):
                    tree = _metadata_tree(meta.get(name))
                    if tree is None:  # Orbax could not read the item's metadata file
                        raise FileNotFoundError(f"{where}/{name} has no readable metadata")
                    _check_tree_matches(tree, targets[name], f"{where}/{name}")
                restored = self._mgr.restore(step, args=ocp.args.Composite(
                    **{k: ocp.args.StandardRestore(v) for k, v in targets.items()},
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except CheckpointMismatchError:
                raise
            except (OSError, ValueError, KeyError) as e:
                # Damage (a lost file, a truncated write): report it and use the previous one.
                errors.append(f"{where}: {type(e).__name__}: {e}")
                report(f"warning: checkpoint {where} is unreadable, trying the previous one "
                       f"({type(e).__name__}: {str(e)[:300]})")
                continue
            for bad in (s for s in steps if s > step):
                # A damaged step would shadow the run's next save of that step: remove it.
                self._mgr.delete(bad)
                report(f"warning: removed unreadable checkpoint {self.directory}/{bad}")
            return step, {k: restored[k] for k in targets}
        if errors:
            raise CheckpointMismatchError(
                f"no readable checkpoint in {self.directory}: " + " | ".join(errors))
        return None

    def wait(self) -> None:
        """Block until every pending save is written (raises if one failed)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()
