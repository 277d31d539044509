"""``python -m segsr_jax.train --config configs/NAME.py[:RUN] --workdir DIR [--config.x=y]``

Trains one run of a config and writes into ``DIR``: ``checkpoints/`` (Orbax; sampleable with
``python -m segsr_jax.sample --checkpoint DIR/checkpoints``), ``metrics.jsonl``,
``tensorboard/`` and ``samples/``. ``RUN`` names a stage of SegSR (``vae``, ``sr``, ``seg``,
``joint``: the autoencoder, the ControlNet, the segmentation branch, then all of it together),
an experiment arm (``sronly``, ``prior``) or the evaluation ``segmenter``; each config's
docstring lists the runs it offers and their order (configs/tiny.py: all seven;
configs/small.py: vae, sr, seg, joint; configs/segsr_sd2.py: sr, seg, joint). A run that
starts from another one's checkpoint reads it from ``--config.init_from``. ``DIR`` may be a
local folder or ``gs://BUCKET/PATH`` (needs ``pip install -e '.[gcs]'``); remote logs are
staged locally and uploaded at every checkpoint (see :mod:`segsr_jax.training.metrics_log`).

Re-running the same command resumes from the latest readable checkpoint: same params, EMA,
optimizer state, RNG and data position, so the result equals an uninterrupted run bit for
bit. SIGTERM (preemption) or Ctrl-C saves a checkpoint at the next step boundary and exits
with status 143 (SIGTERM) or 130 (Ctrl-C); a second Ctrl-C stops at once without saving. A
NaN/Inf loss, gradient or parameter stops the run with an error naming the step, before
anything bad is saved.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize()`` (TPU pods, SLURM: the
cluster is auto-detected); ``--coordinator_address/--num_processes/--process_id`` give it
explicitly (a CPU run on localhost uses gloo collectives).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict, config_flags

from segsr_jax import checkpoint, parallel
from segsr_jax.data.pipeline import make_dataset, to_global_arrays
from segsr_jax.diffusion.options import SampleOptions
from segsr_jax.models import remat
from segsr_jax.models.segsr import SegSRConfig
from segsr_jax.training import checkpointer, losses, metrics_log, prompts
from segsr_jax.training import state as state_lib
from segsr_jax.training import step as step_lib
from segsr_jax.training import workdir as workdir_lib
from segsr_jax.training.run_setup import (  # re-exported: the entry point's own helpers
    BAD_INPUT_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    MissingInitCheckpointError,
    abstract_batch,
    make_source,
    missing_init_message,
    pipeline_config,
    sampling_defaults,
    setup_tokenizer,
    sharding_rules,
    stop_signals,
)
from segsr_jax.training.validation import Validator
from segsr_jax.weights.checkpoint_files import CheckpointError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def train_and_evaluate(config: ConfigDict, workdir: str) -> int:
    """Run (or resume) the training described by ``config`` in ``workdir``.

    Returns the exit status: 0 when ``config.num_steps`` are done, ``PREEMPTED_EXIT_CODE``
    after a SIGTERM-triggered save, ``INTERRUPTED_EXIT_CODE`` after a Ctrl-C-triggered one.
    Raises :class:`step_lib.NonFiniteError` on NaN/Inf,
    :class:`MissingInitCheckpointError` when ``config.init_from`` holds no checkpoint and
    :class:`CheckpointError` when stage ``decoder`` finds no LPIPS weights.
    ``workdir`` is a local folder or a ``gs://`` URI (every file goes through epath).
    """
    if config.tokenizer == "from_init" and not config.init_from:
        raise ValueError(
            "this config starts from a converted checkpoint (tokenizer "
            "'from_init'): pass --config.init_from=CHECKPOINT_DIR"
        )
    init_config = None
    if config.init_from:
        try:
            init_config = checkpoint.read_checkpoint_config(config.init_from)
        except FileNotFoundError as e:
            raise MissingInitCheckpointError(config.init_from, str(e)) from e
    loss_params = None
    if config.train.stage == "decoder":  # its perceptual loss: fail before touching workdir
        from segsr_jax.lpips import load_lpips, lpips_params

        loss_params = lpips_params(load_lpips())
    workdir = workdir_lib.open_workdir(workdir)  # fails fast on gs:// without gcsfs
    # Closed (a remote workdir: uploaded) also when training raises, e.g. on NaN/Inf; the
    # stack restores the signal handlers that the loop installs.
    with (
        metrics_log.MetricsLog(
            workdir, enabled=jax.process_index() == 0, tensorboard=config.log.tensorboard
        ) as log,
        contextlib.ExitStack() as stack,
    ):
        return _train(config, workdir, log, init_config, stack, loss_params)


def _train(
    config: ConfigDict,
    workdir: epath.Path,
    log: metrics_log.MetricsLog,
    init_config: dict | None,
    stack: contextlib.ExitStack,
    loss_params: dict | None,
) -> int:
    """The body of :func:`train_and_evaluate`, writing to an open ``log``; ``init_config``
    is the config of ``config.init_from``'s checkpoint (None: no init_from); ``loss_params``
    a loss network's weights (stage decoder: LPIPS's)."""
    model_cfg = SegSRConfig.from_dict(config.model.to_dict())
    if init_config is not None:
        # A converted checkpoint knows its segmenter's class names (the prompts' tags).
        names = init_config["model"].get("class_names")
        if names:
            model_cfg = dataclasses.replace(model_cfg, class_names=tuple(names))
    stage, also_train = config.train.stage, tuple(config.train.also_train)
    step_cfg = step_lib.StepConfig(
        loss=losses.LossConfig(stage=stage, **config.loss),
        optimizer=state_lib.OptimizerConfig(**config.optim),
        accum_steps=config.train.accum_steps,
    )
    dtype = DTYPES[config.dtype]
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = sharding_rules(config.sharding)
    log.text(
        f"devices: {jax.device_count()} ({jax.process_count()} processes), mesh "
        f"{dict(mesh.shape)}; stage {stage}; remat {config.train.get('remat', 'none')}"
    )

    # The model, split into trainable params and frozen variables, and their shardings.
    abstract = state_lib.abstract_model(model_cfg, dtype)
    sample_graphdef = nnx.graphdef(abstract)  # the validation sampler: no rematerialisation
    remat.set_remat(abstract, config.train.get("remat", "none"))
    graphdef, abs_params, abs_frozen = state_lib.split_model(abstract, stage, also_train)
    frozen_dtype = config.train.get("frozen_dtype", "float32")
    abs_frozen = state_lib.frozen_storage(abs_frozen, frozen_dtype)
    optimizer = state_lib.make_optimizer(step_cfg.optimizer)
    abs_state = jax.eval_shape(
        lambda p: state_lib.init_train_state(p, optimizer, config.seed), abs_params
    )
    shardings = step_lib.StepShardings(
        state=parallel.tree_shardings(abs_state, mesh, rules),
        frozen=parallel.tree_shardings(abs_frozen, mesh, rules),
        batch=None,
        replicated=parallel.replicated(mesh),
    )
    log.text(
        f"trainable {state_lib.count_params(abs_params):,} params "
        f"({', '.join(state_lib.trainable_modules(stage, also_train))}); frozen "
        f"{state_lib.count_params(abs_frozen):,} (stored {frozen_dtype})"
    )

    # Data: this process's share of every global batch, and prompts for it.
    ckpt_dir = workdir / "checkpoints"
    ckpt = checkpointer.TrainCheckpointer(
        ckpt_dir, checkpointer.CheckpointOptions(**config.checkpoint)
    )
    tokenizer = setup_tokenizer(config, ckpt_dir, model_cfg.text.max_position_embeddings)
    source = make_source(config.data, model_cfg.segdm.num_classes)
    data_iter = iter(make_dataset(source, pipeline_config(config.data, stage)))
    prompt_maker = prompts.PromptMaker(
        tokenizer,
        model_cfg.class_names,
        prompts.PromptConfig(seed=config.seed, **config.train.prompt),
        process_index=jax.process_index(),
    )

    # The train state: resumed, else initialised (from a checkpoint or at random).
    resumed = ckpt.restore(
        state_lib.restore_targets(abs_state, abs_frozen, shardings.state, shardings.frozen),
        data_iter,
        report=metrics_log.stderr,
    )
    if resumed is not None:
        start, items = resumed
        train_state, frozen = state_lib.from_checkpoint_items(items, abs_params, abs_frozen)
        log.event("resume", start, checkpoint=str(ckpt_dir / str(start)))
    else:
        start = 0
        params, frozen = state_lib.initial_params(
            model_cfg,
            dtype,
            stage,
            also_train,
            config.seed,
            config.init_from or None,
            (shardings.state.params, shardings.frozen),
        )
        if frozen_dtype != "float32":  # initialised/converted in float32: store as configured
            frozen = state_lib.cast_like(frozen, abs_frozen, shardings.frozen)
        train_state = jax.jit(
            lambda p: state_lib.init_train_state(p, optimizer, config.seed),
            out_shardings=shardings.state,
        )(params)
        if config.init_from:
            log.text(f"initialised from {config.init_from}")

    # Compile once, before the first step, and report what it costs.
    batch_spec = jax.sharding.PartitionSpec(("data", "fsdp"))  # FSDP: batch over all devices
    abs_batch = abstract_batch(
        config.data, stage, tokenizer.max_length, jax.sharding.NamedSharding(mesh, batch_spec)
    )
    shardings = dataclasses.replace(shardings, batch=jax.tree.map(lambda x: x.sharding, abs_batch))
    # A loss network's weights (stage decoder: LPIPS), replicated beside the state.
    loss_args = () if loss_params is None else (jax.device_put(loss_params, shardings.replicated),)
    step_fn = step_lib.make_train_step(graphdef, step_cfg, shardings, bool(loss_args))
    compiled, report = step_lib.compile_step(step_fn, train_state, frozen, abs_batch, *loss_args)
    log.event(
        "compile",
        start,
        seconds=round(report.seconds, 2),
        argument_bytes=report.argument_bytes,
        output_bytes=report.output_bytes,
        temp_bytes=report.temp_bytes,
        alias_bytes=report.alias_bytes,
    )
    log.text(report.summary())
    validator = None
    if config.sample.every:
        val_batch = next(
            iter(
                make_dataset(
                    source,
                    pipeline_config(
                        config.data,
                        "sr",
                        global_batch_size=config.sample.num_images,
                        seed=config.data.seed + 1,
                        shuffle=False,
                        prefetch_batches=0,
                    ),
                )
            )
        )
        validator = Validator(
            sample_graphdef,
            model_cfg,
            val_batch,
            tokenizer,
            SampleOptions.from_dict(sampling_defaults(config)),
            mesh,
        )
        seconds = validator.compile(state_lib.merge_trees(train_state.ema_params, frozen))
        log.event("compile_sampler", start, seconds=round(seconds, 2))

    # SIGTERM (preemption) or Ctrl-C: finish the current step, save, exit. Multi-host runs
    # agree on the step through JAX's preemption sync (the coordination service watches
    # SIGTERM; Ctrl-C keeps Python's default there).
    received = stack.enter_context(stop_signals(jax.process_count() == 1))

    def preempted(step: int) -> bool:
        if jax.process_count() == 1:
            return bool(received)
        return multihost_utils.reached_preemption_sync_point(step)

    pending = step_lib.PendingMetrics()
    last_checkpoint = lambda: max(ckpt.all_steps(), default=None)
    step, stopped = start, False
    while step < config.num_steps and not stopped:
        batch = next(data_iter)
        data_index = batch.pop("index")
        if stage in losses.AUTOENCODER_STAGES:
            batch = {"hr": batch["hr"]}
        else:
            batch["input_ids"] = prompt_maker(batch["label"], step)
        train_state, metrics = compiled(
            train_state, frozen, to_global_arrays(batch, mesh, batch_spec), *loss_args
        )
        step += 1
        pending.add(step, metrics)
        last = step == config.num_steps
        if step % config.log.every == 0 or last:
            means = pending.drain(last_checkpoint())  # the NaN/Inf guard
            means["images_per_s"] = config.data.global_batch_size / means["step_time"]
            log.scalars(step, means, extra={"data_index": data_index})
        if validator is not None and step % config.sample.every == 0:
            grid = validator(state_lib.merge_trees(train_state.ema_params, frozen))
            log.image(step, "samples", grid)
        stopped = preempted(step)
        if stopped or step % ckpt.options.every == 0 or last:
            # Never checkpoint a bad state: every step's metrics and the state are finite.
            pending.drain(last_checkpoint())
            step_lib.check_state_finite(train_state, step)
            ckpt.save(
                step,
                **state_lib.checkpoint_items(train_state, frozen),
                data_iterator=data_iter,
                config={
                    "model": model_cfg.to_dict(),
                    "train": config.to_dict(),
                    "sampling": sampling_defaults(config),
                },
            )
            log.event("checkpoint", step, path=str(ckpt_dir / str(step)))
            log.flush()  # a remote workdir: upload the logs with every checkpoint
    ckpt.close()  # waits for an async save: the messages below are true once it returns
    interrupted = stopped and bool(received) and received[0] == signal.SIGINT
    if interrupted:
        log.event(
            "interrupted",
            step,
            message=f"checkpoint saved in {ckpt_dir / str(step)}; "
            "run the same command again to resume",
        )
    elif stopped:
        log.event("preempted", step, message="checkpoint saved; run again to resume")
    if hasattr(data_iter, "close"):
        data_iter.close()  # stop grain's prefetch threads before the interpreter does
    if not stopped:
        return 0
    return INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE


FLAGS = flags.FLAGS


def main(argv) -> None:
    """The command: flags -> (distributed init) -> :func:`train_and_evaluate`."""
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if FLAGS.cache_dir:
        # Compiled programs persist across restarts (a resumed job skips most compiling);
        # threshold 0 because a from-scratch init is hundreds of sub-second programs.
        parallel.enable_compilation_cache(FLAGS.cache_dir, min_compile_secs=0)
    if FLAGS.coordinator_address or FLAGS.distributed:
        # CPU hosts need a collectives backend for cross-process arrays (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if FLAGS.coordinator_address:
            kwargs = dict(
                coordinator_address=FLAGS.coordinator_address,
                num_processes=FLAGS.num_processes,
                process_id=FLAGS.process_id,
            )
        jax.distributed.initialize(**kwargs)
    try:
        status = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except MissingInitCheckpointError as e:
        # The flag's file name still carries ":RUN" (the argument of get_config).
        config_file = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
        print("error: " + missing_init_message(e.init_from, e.reason, config_file), file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except CheckpointError as e:  # weights a loss needs (LPIPS) are missing or unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except KeyboardInterrupt:  # Ctrl-C before the training loop (which handles it itself)
        print("interrupted (Ctrl-C) before training started; nothing saved", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    sys.exit(status)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config",
        None,
        "training config, configs/NAME.py[:RUN]; RUN is one of the runs "
        "that the config's docstring lists (configs/tiny.py: vae, sr, seg, joint, sronly, "
        "prior, segmenter)",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "output folder (checkpoints, logs, samples)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (auto-detect)")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "number of processes")
    flags.DEFINE_integer("process_id", None, "this process's index")
    flags.DEFINE_string(
        "cache_dir",
        os.environ.get("SEGSR_JAX_CACHE", str(Path.home() / ".cache" / "segsr_jax" / "xla")),
        "persistent XLA compilation cache ('' to disable)",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    if any(arg in ("-h", "--help", "-?") for arg in sys.argv[1:]):
        # absl's --help exits with status 1, but asking for help is not an error.
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main)
