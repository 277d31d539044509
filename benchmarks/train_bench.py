"""Training-step benchmark: step time, images/s and memory per config, and scaling over
simulated CPU devices.

::

    python benchmarks/train_bench.py --config configs/tiny.py:joint
    python benchmarks/train_bench.py --config configs/small.py:joint --batch 4 --steps 3
    python benchmarks/train_bench.py --config configs/tiny.py:joint --devices 1 2 4 8
    python benchmarks/train_bench.py --one --config configs/segsr_sd2.py:joint --batch 4 \
        --set loss.seg_rollout_steps=4          # on an accelerator: this process, its devices

The step is the one ``python -m segsr_jax.train`` runs (:mod:`segsr_jax.training.step`: the
config's stage, optimizer, mesh layout and sharding rules, donated state), on random
weights and a random batch of the config's shapes (uint8 HR / LQ crops, labels, token ids),
so no data pipeline time is included. Reported: compile seconds and XLA's memory plan
(arguments, temporaries, per device), the median step time over ``--steps`` steps after one
warm-up step, images/s (global batch / step time), FLOPs per step from XLA's cost analysis,
the process's peak RSS, and the first step's loss.

``--devices 1 2 4 8`` runs one subprocess per count with
``--xla_force_host_platform_device_count`` (the mesh's ``data`` axis spans them, the global
batch stays the same): on one machine the "devices" share its cores, so this measures
correctness (the first step's loss must not depend on the device count) and the
partitioning overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_config(spec: str):
    """``configs/NAME.py[:ARG]`` -> its ``get_config(ARG)`` (a ConfigDict)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(
        "bench_config", ROOT / path if not Path(path).is_absolute() else path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def apply_override(config, item: str) -> None:
    """``KEY.PATH=VALUE`` (``--set``): the config field at the dotted path, with VALUE parsed
    as the field's current type (a bool from true/false)."""
    path, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected KEY.PATH=VALUE")
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise SystemExit(f"--set {item!r}: the config has no field {path!r}")
    old = node[leaf]
    if not isinstance(old, (bool, int, float, str, type(None))):
        raise SystemExit(f"--set {item!r}: {path!r} is a {type(old).__name__}, not a scalar")
    if isinstance(old, bool):
        node[leaf] = value.lower() in ("1", "true", "yes")
    else:
        node[leaf] = type(old)(value) if old is not None else value


def random_batch(config, model_cfg, sharding) -> dict:
    """A global batch of the step's shapes with random content, placed by ``sharding``."""
    import jax

    from segsr_jax.train import abstract_batch

    abstract = abstract_batch(
        config.data, config.train.stage, model_cfg.text.max_position_embeddings, sharding
    )
    rng = np.random.default_rng(0)
    limits = {
        "hr": 256,
        "lq": 256,
        "label": model_cfg.segdm.num_classes,
        "input_ids": model_cfg.text.vocab_size,
    }
    return {
        k: jax.device_put(rng.integers(0, limits[k], a.shape).astype(a.dtype), sharding)
        for k, a in abstract.items()
    }


def measure(args) -> dict:
    """Compile and time the config's train step in this process."""
    import bench_models
    import jax
    import jax.numpy as jnp

    from segsr_jax import parallel
    from segsr_jax.models.segsr import SegSRConfig
    from segsr_jax.train import DTYPES, sharding_rules
    from segsr_jax.training import state as state_lib
    from segsr_jax.training import step as step_lib
    from segsr_jax.training.losses import LossConfig

    config = load_config(args.config)
    for item in args.set:
        apply_override(config, item)
    if args.batch:
        config.data.global_batch_size = args.batch
    stage, also_train = config.train.stage, tuple(config.train.also_train)
    model_cfg = SegSRConfig.from_dict(config.model.to_dict())
    dtype = DTYPES[config.dtype]
    step_cfg = step_lib.StepConfig(
        loss=LossConfig(stage=stage, **config.loss),
        optimizer=state_lib.OptimizerConfig(**config.optim),
        accum_steps=config.train.accum_steps,
    )
    ndev = jax.device_count()
    fsdp = config.mesh.fsdp if ndev % config.mesh.fsdp == 0 else 1
    mesh = parallel.make_mesh(-1, fsdp)
    rules = sharding_rules(config.sharding)
    optimizer = state_lib.make_optimizer(step_cfg.optimizer)
    graphdef, params, frozen = state_lib.split_model(
        bench_models.random_model(model_cfg, dtype), stage, also_train
    )
    abs_state = jax.eval_shape(lambda p: state_lib.init_train_state(p, optimizer, 0), params)
    shardings = step_lib.StepShardings(
        state=parallel.tree_shardings(abs_state, mesh, rules),
        frozen=parallel.tree_shardings(frozen, mesh, rules),
        batch=None,
        replicated=parallel.replicated(mesh),
    )
    params, frozen = parallel.place((params, frozen), (shardings.state.params, shardings.frozen))
    state = jax.jit(
        lambda p: state_lib.init_train_state(p, optimizer, 0), out_shardings=shardings.state
    )(params)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = random_batch(config, model_cfg, batch_sharding)
    shardings = dataclasses.replace(shardings, batch=jax.tree.map(lambda x: x.sharding, batch))
    compiled, report = step_lib.compile_step(
        step_lib.make_train_step(graphdef, step_cfg, shardings), state, frozen, batch
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, frozen, batch)  # warm-up; its loss is the check value
    first = {k: float(v) for k, v in jax.device_get(metrics).items()}
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    b = config.data.global_batch_size
    return {
        "config": args.config,
        "stage": stage,
        "dtype": config.dtype,
        "devices": ndev,
        "mesh": dict(mesh.shape),
        "global_batch": b,
        "crop": config.data.crop_size,
        "trainable_params": state_lib.count_params(params),
        "frozen_params": state_lib.count_params(frozen),
        "compile_s": report.seconds,
        "argument_bytes": report.argument_bytes,
        "temp_bytes": report.temp_bytes,
        "step_s": step_s,
        "step_times_s": times,
        "images_per_s": b / step_s,
        "flops": float(cost.get("flops", float("nan"))),
        "first_step_metrics": first,
        "finite": bool(jnp.isfinite(first["loss"])),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "overrides": list(args.set),
        "loadavg": os.getloadavg()[0],
        "platform": jax.devices()[0].device_kind,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def run_device_counts(args) -> list[dict]:
    """One subprocess per simulated device count."""
    results = []
    for n in args.devices:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
        cmd = [
            sys.executable,
            __file__,
            "--config",
            args.config,
            "--steps",
            str(args.steps),
            "--one",
        ] + (["--batch", str(args.batch)] if args.batch else [])
        cmd += [f"--set={item}" for item in args.set]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise RuntimeError(f"{n} devices failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def summary(results: list[dict]) -> str:
    """A table; with several device counts, the loss deviation from the first row."""
    ref = results[0]["first_step_metrics"]["loss"]
    lines = [
        f"{results[0]['config']} ({results[0]['stage']}, {results[0]['dtype']}, global "
        f"batch {results[0]['global_batch']} x {results[0]['crop']} px, "
        f"{results[0]['trainable_params'] / 1e6:.2f}M trainable / "
        f"{results[0]['frozen_params'] / 1e6:.2f}M frozen params) on "
        f"{results[0]['platform']}",
        f"{'devices':>7} {'compile s':>9} {'step ms':>9} {'images/s':>9} {'GFLOP':>8} "
        f"{'temp MiB':>9} {'peak RSS GiB':>12} {'loss':>10} {'rel dev':>8}",
    ]
    for r in results:
        loss = r["first_step_metrics"]["loss"]
        lines.append(
            f"{r['devices']:7d} {r['compile_s']:9.1f} {r['step_s'] * 1e3:9.1f} "
            f"{r['images_per_s']:9.2f} {r['flops'] / 1e9:8.1f} "
            f"{r['temp_bytes'] / 2**20:9.0f} {r['peak_rss_bytes'] / 2**30:12.2f} "
            f"{loss:10.6f} {abs(loss - ref) / max(abs(ref), 1e-12):8.1e}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny.py:joint", help="configs/NAME.py[:STAGE]")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[1],
        help="simulated CPU device counts (one subprocess each)",
    )
    p.add_argument("--one", action="store_true", help="measure in this process (JSON out)")
    p.add_argument("--json", type=Path, help="append the results as JSON lines here")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config field (repeatable), e.g. loss.seg_rollout_steps=4",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = [measure(args)] if args.one else run_device_counts(args)
    if args.one:
        print(json.dumps(results[0]))
    else:
        print(summary(results))
    if args.json:
        with args.json.open("a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
