"""What ``python -m segsr_jax.train`` builds from its config before the loop starts: the data
source and grain pipeline settings, the sharding rules, the abstract batch, the tokenizer,
and the signal handling and messages of the entry point. Split out of ``train.py`` so that
the entry point reads top to bottom as the training loop (house style: thin entry points);
everything here is re-exported there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from segsr_jax import checkpoint, parallel
from segsr_jax.data.aliased import AliasedConfig, AliasedSource
from segsr_jax.data.degradations import DegradationConfig
from segsr_jax.data.pipeline import PipelineConfig
from segsr_jax.data.sources import ArrayRecordSource, ImageFolderSource
from segsr_jax.data.synthetic import SceneConfig, SyntheticSource
from segsr_jax.data.transforms import CropConfig
from segsr_jax.training import losses, prompts

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped by the scheduler, resume me"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C
BAD_INPUT_EXIT_CODE = 2


class MissingInitCheckpointError(FileNotFoundError):
    """``config.init_from`` holds no checkpoint (e.g. the previous stage has not run yet)."""

    def __init__(self, init_from: str, reason: str):
        super().__init__(reason)
        self.init_from, self.reason = init_from, reason


def missing_init_message(init_from: str, reason: str, config_file: str | None) -> str:
    """The one-line error for a missing ``init_from`` checkpoint: what is missing, which run
    writes it and how to point elsewhere. The repository's configs start a run from
    ``runs/NAME/RUN/checkpoints``, the checkpoints of run ``RUN`` trained into
    ``runs/NAME/RUN``; where ``init_from`` has that shape the command is spelled out."""
    path = epath.Path(init_from)
    if path.name == "checkpoints" and config_file:
        workdir = path.parent
        made_by = (
            f"it is written by run {workdir.name!r}: train that first (python -m "
            f"segsr_jax.train --config {config_file}:{workdir.name} --workdir {workdir})"
        )
    else:
        made_by = (
            "it must be a converted checkpoint (python -m segsr_jax.convert) or a "
            "previous run's WORKDIR/checkpoints"
        )
    return (
        f"this run starts from the checkpoint in {init_from}, which is missing ({reason}); "
        f"{made_by}, or pass --config.init_from=DIR to start from a checkpoint elsewhere"
    )


@contextlib.contextmanager
def stop_signals(enabled: bool):
    """Within the block, SIGTERM and SIGINT (Ctrl-C) are recorded instead of stopping the
    process: yields the list of received signal numbers, which the loop checks after every
    step. A second Ctrl-C stops at once, without saving. The previous handlers come back on
    exit (``enabled=False``: nothing is installed)."""
    received: list[int] = []
    if not enabled:
        yield received
        return

    def handle(signum, frame):
        del frame
        if received and signum == signal.SIGINT:
            print(
                "second Ctrl-C: stopped at once; nothing saved since the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            os._exit(INTERRUPTED_EXIT_CODE)  # now: no waiting for the step or any thread
        if signum == signal.SIGINT:
            print(
                "Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once, "
                "without saving)",
                file=sys.stderr,
                flush=True,
            )
        received.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def make_source(cfg: ConfigDict, num_classes: int):
    """The config's example source: ``synthetic``, ``aliased`` (the controlled benchmark,
    :mod:`segsr_jax.data.aliased`), ``folder`` or ``array_record``."""
    if cfg.source == "synthetic":
        scene = SceneConfig(cfg.scene_size, cfg.scene_size, num_classes=num_classes)
        return SyntheticSource(cfg.num_examples, scene, seed=cfg.source_seed)
    if cfg.source == "aliased":
        size = cfg.scene_size
        return AliasedSource(cfg.num_examples, AliasedConfig(size, size), seed=cfg.source_seed)
    if cfg.source == "folder":
        return ImageFolderSource(cfg.path, cfg.labels or None)
    if cfg.source == "array_record":
        return ArrayRecordSource(cfg.path)
    raise ValueError(
        f"data.source {cfg.source!r}: choose synthetic, aliased, folder or array_record"
    )


def pipeline_config(cfg: ConfigDict, stage: str, **overrides) -> PipelineConfig:
    """The grain pipeline settings of ``cfg.data`` (stage ``vae`` needs no degradation)."""
    crop = CropConfig(size=cfg.crop_size, scale=cfg.scale, hflip=cfg.hflip)
    deg = None if stage in losses.AUTOENCODER_STAGES else DegradationConfig(scale=cfg.scale)
    fields = dict(
        global_batch_size=cfg.global_batch_size,
        seed=cfg.seed,
        crop=crop,
        degradation=deg,
        num_workers=cfg.num_workers,
        prefetch_batches=cfg.prefetch_batches,
    )
    return PipelineConfig(**{**fields, **overrides})


def sampling_defaults(cfg: ConfigDict) -> dict:
    """The sampling options a run validates with and writes into its checkpoints:
    ``cfg.sample.options``, and for a model trained with seg-tag prompts, tag prompts at
    sampling too (``prompt_mode`` tags, training's ``max_tags``) unless the options say. The
    returned map stays the step mean (``seg_map`` mean) also for a SegDM trained on the
    sampler's state (``loss.seg_rollout_steps``): on 256 confirmation scenes the mean was
    within 0.002 of the best step in all three such runs on either seg grid, the last step
    only on DDP's (0.007 below the best in one run on the shared grid; README, "SegDM's
    trajectory"), and the mean also serves a SegDM trained as designed."""
    out = cfg.sample.options.to_dict()
    prompt = cfg.train.get("prompt", None)
    if prompt is not None and prompt.get("mode", "tags") == "tags":
        out.setdefault("prompt_mode", "tags")
        out.setdefault("max_tags", prompt.get("max_tags", 3))
    return out


def sharding_rules(cfg: ConfigDict) -> parallel.ShardingRules:
    """``config.sharding`` as :class:`parallel.ShardingRules` (lists become tuples)."""
    return parallel.ShardingRules(
        param_axes=tuple((p, tuple(n)) for p, n in cfg.param_axes),
        logical_rules=tuple(
            (n, tuple(a) if isinstance(a, list) else a) for n, a in cfg.logical_rules
        ),
        min_size=cfg.min_size,
    )


def abstract_batch(cfg: ConfigDict, stage: str, max_length: int, sharding) -> dict:
    """The global batch the step compiles for (ShapeDtypeStructs; pixels stay uint8)."""
    b, size, lq = cfg.global_batch_size, cfg.crop_size, cfg.crop_size // cfg.scale
    shapes = {"hr": ((b, size, size, 3), jnp.uint8)}
    if stage not in losses.AUTOENCODER_STAGES:
        shapes.update(
            lq=((b, lq, lq, 3), jnp.uint8),
            label=((b, size, size), jnp.uint8),
            input_ids=((b, max_length), jnp.int32),
        )
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def setup_tokenizer(config: ConfigDict, ckpt_dir: epath.Path, max_length: int):
    """Put the run's tokenizer in ``ckpt_dir/tokenizer`` (the sampler reads it there) and
    load it. Either folder may be local or ``gs://``; transformers reads only local files,
    so a remote tokenizer is loaded from a temporary local copy."""

    dest = ckpt_dir / "tokenizer"
    if jax.process_index() == 0 and not dest.exists():
        if config.tokenizer == "char":
            prompts.write_char_tokenizer(dest, max_length)
        else:
            src = epath.Path(
                config.init_from if config.tokenizer == "from_init" else config.tokenizer
            )
            src = src / "tokenizer" if (src / "tokenizer").is_dir() else src
            checkpoint.copy_tree(src, dest)
    multihost_utils.sync_global_devices("tokenizer written")
    return checkpoint.load_tokenizer(dest)
