"""A training run's checkpoints: :class:`TrainCheckpointer` saves every few steps, keeps what
:class:`CheckpointOptions` says, and resumes from the latest step it can read, on every process
together. The folder layout is :mod:`segsr_jax.checkpoint`'s, so a run's checkpoints restore
for sampling like any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as ocp_multihost

from segsr_jax import checkpoint


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
        checkpoint.register_array_handler()
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
            item_handlers=checkpoint.item_handlers(),
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
                config=ocp.args.JsonSave({"format": checkpoint.FORMAT, **dict(config)}),
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
        every step is broken, nothing is moved and a
        :class:`~segsr_jax.checkpoint.CheckpointMismatchError` lists them (restoring none
        would silently start the run over).

        A checkpoint whose trees do not match ``targets``, or whose data state was written by
        a different number of processes, raises
        :class:`~segsr_jax.checkpoint.CheckpointMismatchError` (a config change, not damage).

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
            except checkpoint.CheckpointMismatchError as e:
                chosen, failure = _MISMATCH, e
            except Exception as e:  # told to the others too, so none waits for process 0
                chosen, failure = _READ_FAILED, e
        chosen, moved = (int(v) for v in _broadcast_from_0(np.array([chosen, moved], np.int32)))
        if failure is not None:
            raise failure
        if chosen in (_READ_FAILED, _MISMATCH):
            cls = checkpoint.CheckpointMismatchError if chosen == _MISMATCH else CheckpointReadError
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
            raise checkpoint.CheckpointMismatchError(
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
            except (checkpoint.CheckpointMismatchError, CheckpointReadError):
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
                raise checkpoint.CheckpointMismatchError(
                    f"{self.directory}/{step}/data holds the data state of another number of "
                    f"processes ({', '.join(others[:4])}); this run has {count}"
                )
            return "data/ holds no process_*.json (the data iterator states)"
        return next((why for _, why in states if why), None)

    def _check_trees(self, step: int, targets: Mapping[str, object]) -> None:
        """Raise checkpoint.CheckpointMismatchError if the saved trees do not fit ``targets``."""
        where = f"{self.directory}/{step}"
        meta = self._mgr.item_metadata(step)
        for name in ("params", "ema_params"):
            tree = checkpoint.metadata_tree(meta.get(name))
            if tree is None:  # Orbax turns read errors into absent metadata
                raise OSError(f"Orbax could not read the metadata of {where}/{name}")
            checkpoint.check_tree_matches(tree, targets[name], f"{where}/{name}")

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
