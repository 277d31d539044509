"""A memory plan for SD-2-size SegSR without the hardware: compile (never run) the full-size
train steps and samplers on simulated CPU meshes and read XLA's per-device buffer plan.

::

    python benchmarks/memory_plan.py                     # every case, then the table
    python benchmarks/memory_plan.py --table-only        # the table from the saved cases
    python benchmarks/memory_plan.py --cases train:joint:1:blocks:4 sample:512:1:4

Each case compiles in its own process with ``--xla_force_host_platform_device_count`` set to
its mesh size, from abstract inputs (``jax.eval_shape`` / ``ShapeDtypeStruct`` with the run's
shardings: no weights are ever made), and appends one JSON line to ``--results`` as soon as
it is done (a rerun skips cases already there). Read per device from
``compiled.memory_analysis()``: arguments (the sharded train state and frozen weights, or the
sampler's weights), outputs, the part of the outputs aliased to donated inputs, and
temporaries (activations, gradients, gathered FSDP kernels, workspace).

Cases:

* ``train:STAGE:B:REMAT:FSDP``: ``configs/segsr_sd2.py:STAGE`` (``sr`` or ``joint``), bf16
  compute with float32 master weights, 512 px crops, per-chip batch ``B``, ``train.remat``
  ``REMAT``, on a ``data=2 x fsdp=FSDP`` mesh (the global batch is ``B`` x devices, split over
  all of them, as ``train.py`` does).
* ``sample:PX:B:FSDP``: the 50-step SeeSR sampler (DDPM, text guidance, so the UNet batch is
  doubled) on ``PX`` x ``PX`` images, the SD-2 SegSR in bf16 with bf16 weights (as
  ``python -m segsr_jax.sample --dtype bfloat16``), per-chip batch ``B``, weights sharded over
  ``FSDP`` devices (1: replicated).

The fit table combines the two parts of a train step's footprint as they scale: the
arguments (train state + frozen weights) shrink exactly with the FSDP size and are computed
from the shardings for every size; the temporaries depend on the per-chip batch and the remat
policy and are taken from the compiled case at FSDP 4 (checked against compiles at other
FSDP sizes, see RESULTS.md). A stage fits an accelerator when arguments + temporaries +
unaliased outputs stay under 90% of its HBM.

How far a CPU compile can be trusted: the buffer assignment is XLA's own, but the CPU
backend fuses differently from the TPU and GPU backends, keeps some bf16 work in float32,
and has no cuDNN / TPU convolution workspaces or flash-attention kernels; activation memory
is therefore an estimate within a factor of about 1.5 either way, and arguments are exact.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).with_name("results") / "memory_plan_cpu.jsonl"
GIB = 2**30
# HBM per chip in GiB (vendor figures).
ACCELERATORS = {
    "TPU v5e": 16,
    "TPU v4": 32,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "TPU v5p": 95,
    "H200-141GB": 141,
}
MARGIN = 0.9
STAGES = ("sr", "joint")
BATCHES = (1, 2, 4, 8)
REMATS = ("none", "blocks")
FSDP_SIZES = (1, 2, 4, 8, 16)
# Faster CPU compiles with the same buffer plan: the LLVM back end runs after buffer
# assignment, so its optimisation level changes the code, not the memory.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def default_cases() -> list[str]:
    cases = [f"train:{s}:{b}:{r}:4" for r in REMATS for s in STAGES for b in BATCHES]
    cases += ["train:joint:1:blocks:2", "train:joint:1:blocks:8"]  # the FSDP-size check
    cases += ["sample:512:1:1", "sample:512:1:4", "sample:1024:1:4"]
    return cases


def load_sd2(stage: str):
    spec = importlib.util.spec_from_file_location("segsr_sd2", ROOT / "configs" / "segsr_sd2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(stage)


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _stats(compiled) -> dict:
    mem = compiled.memory_analysis()
    return {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")
    }


def bytes_per_device(tree, shardings) -> int:
    """Bytes of ``tree``'s shards on one device (the largest shard of each leaf)."""
    import jax

    return sum(
        math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def train_case(stage: str, batch: int, remat_policy: str, fsdp: int) -> dict:
    """Compile one SD-2 train step from abstract inputs; per-device bytes."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax import parallel
    from segsr_jax.models import remat
    from segsr_jax.models.segsr import SegSRConfig
    from segsr_jax.train import abstract_batch, sharding_rules
    from segsr_jax.training import state as state_lib
    from segsr_jax.training import step as step_lib
    from segsr_jax.training.losses import LossConfig

    config = load_sd2(stage)
    mesh = parallel.make_mesh(-1, fsdp)
    config.data.global_batch_size = batch * jax.device_count()
    model_cfg = SegSRConfig.from_dict(config.model.to_dict())
    step_cfg = step_lib.StepConfig(
        loss=LossConfig(stage=stage, **config.loss),
        optimizer=state_lib.OptimizerConfig(**config.optim),
    )
    rules = sharding_rules(config.sharding)
    model = state_lib.abstract_model(model_cfg, jnp.bfloat16)
    remat.set_remat(model, remat_policy)
    graphdef, params, frozen = state_lib.split_model(model, stage)
    optimizer = state_lib.make_optimizer(step_cfg.optimizer)
    state = jax.eval_shape(lambda p: state_lib.init_train_state(p, optimizer, 0), params)
    shardings = step_lib.StepShardings(
        state=parallel.tree_shardings(state, mesh, rules),
        frozen=parallel.tree_shardings(frozen, mesh, rules),
        batch=None,
        replicated=parallel.replicated(mesh),
    )
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    abs_batch = abstract_batch(
        config.data, stage, model_cfg.text.max_position_embeddings, batch_sharding
    )
    shardings = dataclasses.replace(shardings, batch=jax.tree.map(lambda x: x.sharding, abs_batch))
    fn = step_lib.make_train_step(graphdef, step_cfg, shardings)
    t0 = time.perf_counter()
    compiled = fn.lower(
        _abstract(state, shardings.state), _abstract(frozen, shardings.frozen), abs_batch
    ).compile()
    seconds = time.perf_counter() - t0
    out = _stats(compiled)
    del nnx
    # The arguments at every FSDP size, from the shardings alone (exact).
    by_fsdp = {}
    for f in FSDP_SIZES:
        m = jax.sharding.AbstractMesh((1, f), parallel.AXES)
        by_fsdp[f] = bytes_per_device(
            state, parallel.tree_shardings(state, m, rules)
        ) + bytes_per_device(frozen, parallel.tree_shardings(frozen, m, rules))
    return {
        **out,
        "compile_s": round(seconds, 1),
        "arguments_by_fsdp": by_fsdp,
        "trainable_params": state_lib.count_params(params),
        "frozen_params": state_lib.count_params(frozen),
    }


def sample_case(px: int, batch: int, fsdp: int) -> dict:
    """Compile the SD-2 sampler (DDPM 50, CFG) from abstract inputs; per-device bytes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax import parallel
    from segsr_jax.diffusion import sampling
    from segsr_jax.diffusion.options import SampleOptions
    from segsr_jax.diffusion.session import SamplingSession
    from segsr_jax.models import layers
    from segsr_jax.models.segsr import SegSRConfig
    from segsr_jax.training import state as state_lib

    config = load_sd2("joint")
    model_cfg = SegSRConfig.from_dict(config.model.to_dict())
    mesh = parallel.make_mesh(-1, fsdp)
    graphdef, state = nnx.split(state_lib.abstract_model(model_cfg, jnp.bfloat16))
    # The weights as Restorer holds a bf16 model's (layers.inference_weights), shapes only.
    state = jax.eval_shape(
        lambda st: nnx.state(layers.with_compute_dtype_weights(nnx.merge(graphdef, st))), state
    )
    rules = parallel.FSDP_RULES
    state_sh = (
        parallel.tree_shardings(state, mesh, rules)
        if fsdp > 1
        else jax.tree.map(lambda _: parallel.replicated(mesh), state)
    )
    b = batch * mesh.shape["data"]
    # SeeSR's sampler (DDPM, 50 steps, guidance 5.5, 96/32 latent tiles), 4 tiles per call.
    session = SamplingSession(graphdef, model_cfg)
    options = SampleOptions(tiles_per_call=4)
    plan, sched = session.plan((px, px), options), session.schedule(options)
    rows = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    seq, width = model_cfg.text.max_position_embeddings, model_cfg.text.hidden_size
    args = (
        _abstract(state, state_sh),
        jax.ShapeDtypeStruct((b, px, px, 3), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((b, seq, width), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((b, seq, width), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), sched),
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    fn = sampling.make_sample_fn(graphdef, plan, mesh, state_shardings=state_sh)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return {
        **_stats(compiled),
        "compile_s": round(time.perf_counter() - t0, 1),
        "tiles": len(plan.tiles),
    }


def run_one(case: str) -> dict:
    from segsr_jax.evaluation import tables

    kind, *rest = case.split(":")
    if kind == "train":
        stage, batch, policy, fsdp = rest
        out = train_case(stage, int(batch), policy, int(fsdp))
    elif kind == "sample":
        px, batch, fsdp = rest
        out = sample_case(int(px), int(batch), int(fsdp))
    else:
        raise ValueError(f"unknown case {case!r}")
    import resource

    import jax

    return {
        "case": case,
        **out,
        "devices": jax.device_count(),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "jax": jax.__version__,
        "cpu": tables.cpu_model(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def mesh_devices(case: str) -> int:
    """Simulated devices of a case: data 2 x fsdp (a sampler with fsdp 1: 2 devices)."""
    return 2 * int(case.split(":")[-1])


def run_cases(cases: list[str], results: Path, timeout: float) -> None:
    done = (
        {json.loads(line)["case"] for line in results.read_text().splitlines() if line.strip()}
        if results.exists()
        else set()
    )
    for case in cases:
        if case in done:
            print(f"{case}: already in {results}")
            continue
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join(
            [*flags, FAST_COMPILE, f"--xla_force_host_platform_device_count={mesh_devices(case)}"]
        )
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", case],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if proc.returncode:
            print(
                f"{case}: failed after {time.time() - t0:.0f} s:\n{proc.stderr[-3000:]}",
                file=sys.stderr,
            )
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{case}: temp {row['temp'] / GIB:.2f} GiB, arguments "
            f"{row['argument'] / GIB:.2f} GiB ({row['compile_s']:.0f} s compile)",
            flush=True,
        )


def train_total(row: dict, fsdp: int) -> float:
    """Per-device bytes of a train case moved to another FSDP size: exact arguments, the
    compiled case's temporaries and unaliased outputs."""
    return row["arguments_by_fsdp"][str(fsdp)] + row["temp"] + row["output"] - row["alias"]


def fit_table(rows: list[dict]) -> str:
    """Markdown: per accelerator and stage, the largest per-chip batch within 90% of HBM,
    the smallest FSDP size that gives it, and the remat policy (``B+``: the largest batch
    compiled for that policy fits, so a larger one may too)."""
    train = {}
    for r in rows:
        kind, *rest = r["case"].split(":")
        if kind == "train" and rest[3] == "4":
            train[(rest[0], int(rest[1]), rest[2])] = r
    lines = [
        "| accelerator | HBM GiB | stage | largest per-chip batch (remat none) | "
        "largest per-chip batch (remat blocks) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, hbm in sorted(ACCELERATORS.items(), key=lambda kv: kv[1]):
        for stage in STAGES:
            cells = []
            for policy in REMATS:
                best = None
                for b in BATCHES:
                    row = train.get((stage, b, policy))
                    if row is None:
                        continue
                    fits = [f for f in FSDP_SIZES if train_total(row, f) <= MARGIN * hbm * GIB]
                    if fits:
                        best = (b, fits[0], train_total(row, fits[0]) / GIB)
                largest = max(
                    (b for (st, b, po) in train if st == stage and po == policy), default=None
                )
                cells.append(
                    "does not fit"
                    if best is None
                    else f"**{best[0]}**{'+' if best[0] == largest else ''} at fsdp >= "
                    f"{best[1]} ({best[2]:.1f} GiB)"
                )
            lines.append(f"| {name} | {hbm} | {stage} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def cases_table(rows: list[dict]) -> str:
    """Markdown: every compiled case, per device, in GiB."""
    lines = [
        "| case | devices | arguments | outputs (aliased) | temporaries | total | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        total = r["argument"] + r["temp"] + r["output"] - r["alias"]
        lines.append(
            f"| `{r['case']}` | {r['devices']} | {r['argument'] / GIB:.2f} | "
            f"{r['output'] / GIB:.2f} ({r['alias'] / GIB:.2f}) | "
            f"{r['temp'] / GIB:.2f} | {total / GIB:.2f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=None, help="default: every case")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON lines, appended")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if not args.table_only:
        run_cases(args.cases or default_cases(), args.results, args.timeout)
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print(cases_table(rows))
    print()
    print(fit_table(rows))


if __name__ == "__main__":
    main()
