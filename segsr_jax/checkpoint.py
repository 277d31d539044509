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
                           kept (see :meth:`TrainCheckpointer.restore`); Orbax ignores it

Sampling restores ``params`` with ``ema_params`` put over them when present, straight into
the abstract (optionally sharded) target built from the config that travels in the
checkpoint, so a checkpoint always rebuilds the model it was made from, and one that does not
match the code fails with a message naming the difference. Training runs save and resume
through :class:`TrainCheckpointer`; paths may be local or ``gs://`` (Orbax handles both).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as ocp_multihost

FORMAT = "segsr_jax/1"
# Orbax splits the write of every replicated array over its replicas, slicing each array
# with an eager op per shape: on a model's hundreds of small biases and norms that costs
# hundreds of one-off compiles at the first save and gains nothing. Only arrays whose
# per-replica slice is at least 1 MiB are split.
MIN_REPLICA_SLICE_BYTES = 2**20


@functools.cache
def _register_array_handler() -> None:
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
    _register_array_handler()
    path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, read_only=read_only, create=not read_only
    )
    return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def _item_handlers() -> dict:
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


def _check_tree_matches(saved, target, where: str) -> None:
    """Compare names and shapes before restoring, so a mismatch names the tensor."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    missing = sorted(set(want) - set(have))
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
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shard_tree
        )
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


class CheckpointReadError(OSError):
    """A checkpoint that could not be read, after retries: nothing shows it is damaged (the
    storage failed to answer), so it is neither skipped nor touched; the run stops instead."""


# What reading a checkpoint can raise when the storage fails (a dropped connection, a
# timeout, tensorstore's I/O errors are ValueErrors): retried, then a CheckpointReadError.
_READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError)
_PYTREE_ITEMS = ("params", "ema_params", "opt_state", "train")
# Codes process 0 broadcasts besides a step number.
_NO_CHECKPOINT, _READ_FAILED, _MISMATCH = -1, -2, -3


def _read_bytes(path: epath.Path) -> bytes:
    """One file's bytes. FileNotFoundError means the storage answered that it does not exist;
    any other error is a failed read."""
    return path.read_bytes()


def _process_index() -> int:
    return jax.process_index()


def _process_count() -> int:
    return jax.process_count()


def _broadcast_from_0(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (a collective: all processes call it)."""
    if _process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def _join_orbax_restore_barrier() -> None:
    """Orbax's ``Checkpointer.restore`` ends with a barrier of all processes (named
    "Checkpointer:restore" with the default multiprocessing options): a process whose restore
    failed passes it too, so the others get out of it and learn of the failure. (Should Orbax
    name it otherwise, the names differ and the barrier raises on every process: loud too.)"""
    ocp_multihost.sync_global_processes("Checkpointer:restore")


def _all_processes_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective: all processes call it)."""
    if _process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class TrainCheckpointer:
    """The checkpoints of one training run (``WORKDIR/checkpoints``).

    Items of every step, all written together and committed atomically by Orbax:
    ``config`` (JSON, as :func:`save_model`), ``params`` (the full model: trainable and frozen,
    so every checkpoint samples on its own), ``ema_params`` (the EMA of the trainable
    sub-tree; sampling puts it over ``params``), ``opt_state``, ``train`` (step and RNG key
    data) and ``data`` (each process's grain iterator state, one JSON file per process).

    Args:
      directory: the checkpoint folder (local or ``gs://``).
      options: when to save and what to keep.
      read_attempts: how many times :meth:`restore` tries a read that fails before it gives
        up with :class:`CheckpointReadError`.
      retry_delay_s: the wait before the first retry; it doubles with each further one.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        options: CheckpointOptions,
        *,
        read_attempts: int = 4,
        retry_delay_s: float = 1.0,
    ):
        if read_attempts < 1 or retry_delay_s < 0:
            raise ValueError(
                f"bad retry settings: {read_attempts} attempts, {retry_delay_s} s delay"
            )
        self.directory = directory
        self.options = options
        self.read_attempts = read_attempts
        self.retry_delay_s = retry_delay_s
        _register_array_handler()
        path = directory if str(directory).startswith("gs://") else Path(directory).absolute()
        self._path = epath.Path(path)
        self._mgr = ocp.CheckpointManager(
            path,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=options.keep_last,
                keep_period=options.keep_every or None,
                enable_async_checkpointing=options.async_save,
                create=True,
            ),
            item_handlers=_item_handlers(),
        )

    def all_steps(self) -> list[int]:
        """Finished checkpoints, ascending (Orbax ignores unfinished temporary folders, and
        folders moved aside by :meth:`restore`)."""
        return sorted(self._mgr.all_steps())

    def save(
        self,
        step: int,
        *,
        params: dict,
        ema_params: dict,
        opt_state,
        train: dict,
        data_iterator,
        config: Mapping,
    ) -> bool:
        """Save step ``step`` (asynchronously if so configured); False if it already exists."""
        if step in self._mgr.all_steps():
            return False
        self._mgr.save(
            step,
            force=True,
            args=ocp.args.Composite(
                config=ocp.args.JsonSave({"format": FORMAT, **dict(config)}),
                params=ocp.args.StandardSave(params),
                ema_params=ocp.args.StandardSave(ema_params),
                opt_state=ocp.args.StandardSave(opt_state),
                train=ocp.args.StandardSave(train),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
        )
        return True

    def restore(
        self, targets: Mapping[str, object], data_iterator, report: Callable[[str], None] = print
    ) -> tuple[int, dict] | None:
        """Restore the latest intact checkpoint into ``targets`` (abstract, sharded trees for
        ``params``, ``ema_params``, ``opt_state`` and ``train``) and ``data_iterator``.

        Nothing is ever deleted. A step is skipped only when it is *verified broken*: Orbax
        lists it as finished, yet the storage answers, twice (a second look after
        ``retry_delay_s``), that it lacks a file every finished save writes, or returns a file
        whose content does not parse:

        * ``config/metadata`` missing, or not a JSON object;
        * ``_METADATA`` of ``params``, ``ema_params``, ``opt_state`` or ``train`` missing, or
          not a JSON object with a ``tree_metadata``; or, where it says the arrays are in
          OCDBT, that item's ``manifest.ocdbt`` missing;
        * ``data/process_I-of-N.json`` (N: this run's process count) missing or not JSON;
          when all of them are missing but another N's are there, that is a mismatch (below).

        Anything else that goes wrong while reading (a timeout, a refused or dropped
        connection, an error of the array reads, metadata Orbax cannot read) says nothing about
        the checkpoint: it is retried ``read_attempts`` times, waiting ``retry_delay_s`` and
        then twice as long each time, and then raised as :class:`CheckpointReadError` naming
        the step and its path; the run stops with its checkpoints as they were.

        A broken step newer than the one restored is moved aside, not deleted: renamed to
        ``DIR/<step>.broken-<UTC time>`` (kept for inspection; Orbax ignores the name, so the
        run saves that step number again when it gets there instead of being shadowed by the
        broken one). Each broken step and its new name is reported through ``report``. When
        every step is broken, nothing is moved and :class:`CheckpointMismatchError` lists them
        (restoring none would silently start the run over).

        A checkpoint whose trees do not match ``targets``, or whose data state was written by
        a different number of processes, raises :class:`CheckpointMismatchError` (a config
        change, not damage).

        Multi-process runs: process 0 alone inspects the steps, moves broken ones aside and
        chooses; its choice (or its failure) is broadcast, so every process restores the same
        step or all raise. Each process then restores its part, retrying as above (Orbax's
        restore ends with a barrier of all processes, which a retry that succeeds reaches like
        the others); a process that gives up passes that barrier too, and then all processes
        compare: if any failed, all raise.

        Returns:
          ``(step, restored items)``, or None when the folder holds no checkpoint.
        """
        chosen, moved, failure = _READ_FAILED, 0, None
        if _process_index() == 0:
            try:
                chosen, moved = self._choose(targets, report)
            except CheckpointMismatchError as e:
                chosen, failure = _MISMATCH, e
            except Exception as e:  # told to the others too, so none waits for process 0
                chosen, failure = _READ_FAILED, e
        chosen, moved = (int(v) for v in _broadcast_from_0(np.array([chosen, moved], np.int32)))
        if failure is not None:
            raise failure
        if chosen in (_READ_FAILED, _MISMATCH):
            cls = CheckpointMismatchError if chosen == _MISMATCH else CheckpointReadError
            raise cls(
                f"process 0 could not choose a checkpoint in {self.directory}: see its messages"
            )
        if moved:
            self._mgr.reload()  # the steps process 0 moved aside are gone from the listing
        if chosen == _NO_CHECKPOINT:
            return None
        where = f"{self.directory}/{chosen}"
        restored, failure = None, None
        try:
            restored = self._retry(
                f"checkpoint {where}",
                report,
                lambda: self._mgr.restore(
                    chosen,
                    args=ocp.args.Composite(
                        **{k: ocp.args.StandardRestore(v) for k, v in targets.items()},
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                ),
            )
        except Exception as e:  # raised below, once every process knows
            failure = e
            if _process_count() > 1:
                _join_orbax_restore_barrier()
        if not _all_processes_ok(failure is None):
            raise failure or CheckpointReadError(
                f"another process could not read checkpoint {where}: see its messages"
            )
        return chosen, {k: restored[k] for k in targets}

    def _choose(
        self, targets: Mapping[str, object], report: Callable[[str], None]
    ) -> tuple[int, int]:
        """(The step to restore or _NO_CHECKPOINT, how many broken steps were moved aside.)"""
        steps = self.all_steps()
        broken: list[tuple[int, str]] = []
        for step in reversed(steps):
            where = f"{self.directory}/{step}"
            reason = self._retry(f"checkpoint {where}", report, self._broken, step)
            if reason is not None:  # a second look, in case the storage was catching up
                time.sleep(self.retry_delay_s)
                reason = self._retry(f"checkpoint {where}", report, self._broken, step)
            if reason is None:
                self._retry(f"checkpoint {where}", report, self._check_trees, step, targets)
                for bad, why in broken:
                    self._move_aside(bad, why, report)
                return step, len(broken)
            report(f"warning: checkpoint {where} is broken ({reason}); trying the previous one")
            broken.append((step, reason))
        if broken:
            raise CheckpointMismatchError(
                f"every checkpoint in {self.directory} is broken (nothing was changed; move them "
                "aside to start the run over): "
                + " | ".join(f"{self.directory}/{s}: {why}" for s, why in broken)
            )
        return _NO_CHECKPOINT, 0

    def _retry(
        self, what: str, report: Callable[[str], None], read: Callable, *args, action: str = "read"
    ):
        """``read(*args)``, tried up to ``read_attempts`` times while it raises a storage
        error; then CheckpointReadError saying what could not be done (``action`` ``what``)."""
        for attempt in range(1, self.read_attempts + 1):
            try:
                return read(*args)
            except (CheckpointMismatchError, CheckpointReadError):
                raise
            except _READ_ERRORS as e:
                error = f"{type(e).__name__}: {str(e)[:500]}"
                if attempt == self.read_attempts:
                    unchanged = "; nothing was changed" if action == "read" else ""
                    raise CheckpointReadError(
                        f"could not {action} {what} ({self.read_attempts} attempts{unchanged}): "
                        f"{error}"
                    ) from e
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                report(
                    f"warning: {action} {what} failed ({error}); retrying in {delay:g} s "
                    f"(attempt {attempt + 1} of {self.read_attempts})"
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _broken(self, step: int) -> str | None:
        """Why ``step`` is verified broken (see :meth:`restore`), or None if it looks intact.
        Raises the storage's error when a read fails for another reason than "not found"."""
        folder = self._path / str(step)
        missing = (FileNotFoundError, NotADirectoryError)

        def load(name: str):
            """(The parsed JSON file ``folder/name``, or None; why that is broken, or None.)"""
            try:
                text = _read_bytes(folder / name)
            except missing:
                return None, f"{name} is missing"
            try:
                return json.loads(text), None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return None, f"{name} is not JSON ({e})"

        config, why = load("config/metadata")
        if why or not isinstance(config, dict):
            return why or "config/metadata is not a JSON object"
        for name in _PYTREE_ITEMS:
            meta, why = load(f"{name}/_METADATA")
            if why or not isinstance(meta, dict) or "tree_metadata" not in meta:
                return why or f"{name}/_METADATA has no tree_metadata"
            if meta.get("use_ocdbt"):
                try:
                    _read_bytes(folder / name / "manifest.ocdbt")
                except missing:
                    return f"{name}/manifest.ocdbt (the index of its arrays) is missing"
        count = _process_count()
        states = [load(f"data/process_{i}-of-{count}.json") for i in range(count)]
        lost = [why for state, why in states if state is None and why.endswith("missing")]
        if len(lost) == count:  # none of this run's: another process count, or all lost?
            try:
                others = sorted(
                    p.name for p in (folder / "data").iterdir() if p.name.startswith("process_")
                )
            except missing:
                others = []
            if others:
                raise CheckpointMismatchError(
                    f"{self.directory}/{step}/data holds the data state of another number of "
                    f"processes ({', '.join(others[:4])}); this run has {count}"
                )
            return "data/ holds no process_*.json (the data iterator states)"
        return next((why for _, why in states if why), None)

    def _check_trees(self, step: int, targets: Mapping[str, object]) -> None:
        """Raise CheckpointMismatchError if the saved trees do not fit ``targets``."""
        where = f"{self.directory}/{step}"
        meta = self._mgr.item_metadata(step)
        for name in ("params", "ema_params"):
            tree = _metadata_tree(meta.get(name))
            if tree is None:  # Orbax turns read errors into absent metadata
                raise OSError(f"Orbax could not read the metadata of {where}/{name}")
            _check_tree_matches(tree, targets[name], f"{where}/{name}")

    def _move_aside(self, step: int, reason: str, report: Callable[[str], None]) -> None:
        """Rename broken ``step`` to ``<step>.broken-<UTC time>`` next to it."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        source, target = self._path / str(step), self._path / f"{step}.broken-{stamp}"
        self._retry(f"{source} to {target}", report, source.rename, target, action="rename")
        report(
            f"warning: moved broken checkpoint {source} aside to {target} ({reason}); "
            f"the run will save step {step} again"
        )

    def wait(self) -> None:
        """Block until every pending save is written (raises if one failed)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()
