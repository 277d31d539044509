"""Large-image benchmark: host memory and time of the tiled sampler as the output grows.

::

    python benchmarks/large_image_bench.py                       # 512 .. 2048 px, tiny config
    python benchmarks/large_image_bench.py --sizes 2048 --steps 2 --json out.jsonl
    python benchmarks/large_image_bench.py --one 1024            # one size, in this process

Each size runs in a fresh subprocess (so one size's allocations cannot hide another's peak):
a random LQ of ``size / upscale`` pixels is resized to the output size (as ``segsr_jax.sample``
does), the tiled sampler is compiled, then run. Reported per size:

- ``run_peak_bytes``: the resident-set high-water mark during the first run above the RSS
  just before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after compiling),
  i.e. the working memory of sampling (plus the runtime's one-off allocations, which do not
  depend on the size); later runs (``--runs``) are timed only, as the allocator keeps the
  pages it got in the first;
- ``process_peak_bytes``: the whole process's peak (imports, model, compile and run): what has
  to fit in the machine's memory;
- ``xla_temp_bytes``: XLA's own buffer assignment for the program (``memory_analysis``);
- ``image_bytes``: the float32 bytes of the LQ and SR images (``2 * 3 * 4 * H * W``): the part
  of the working memory that has to grow with the output, whatever the tiling.

Tiling keeps the model's activations at the size of one call's tiles (``--tiles-per-call``
latent tiles, one VAE / SegFormer window); what grows with the image is full-image arrays
with a few channels (images, latents, features, the blend accumulators).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(size: int, args) -> dict:
    """Compile and run the tiled sampler for a ``size x size`` output, in this process."""
    import bench_models
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax.diffusion import geometry
    from segsr_jax.diffusion.options import SampleOptions
    from segsr_jax.diffusion.session import SamplingSession
    from segsr_jax.models.unet import UNetConfig

    bench = bench_models.CONFIGS[args.config]
    cfg = bench_models.segsr_config(bench, UNetConfig(**bench.unet))
    graphdef, state = nnx.split(bench_models.random_model(cfg))
    f = cfg.latent_factor
    small = max(8, round(size / args.upscale))
    lq_u8 = np.random.default_rng(0).integers(0, 256, (small, small, 3), dtype=np.uint8)
    lq = geometry.model_input([lq_u8], (size, size), f)
    options = SampleOptions(
        steps=args.steps,
        guidance=1.0,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        tiles_per_call=args.tiles_per_call,
    )
    ctx = jnp.zeros((1, cfg.text.max_position_embeddings, cfg.unet.cross_attention_dim))
    sampler = SamplingSession(graphdef, cfg).prepare(
        state,
        lq,
        options,
        contexts=(ctx, None),
        vae_encode_tile=args.vae_encode_tile,
        vae_decode_tile=args.vae_decode_tile,
    )
    exe, fargs, plan, compile_s = sampler.program, sampler.args, sampler.plan, sampler.compile_s
    mem = exe.memory_analysis()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f_refs:
        f_refs.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*fargs))
    run_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    warm = []
    for _ in range(args.runs - 1):  # later runs: time only (freed memory stays with malloc)
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*fargs))
        warm.append(time.perf_counter() - t0)
    if not bool(jnp.isfinite(out.image).all()):
        raise RuntimeError(f"non-finite SR image at {size} px")
    return {
        "size": size,
        "lq": small,
        "latent": size // f,
        "latent_tiles": len(plan.tiles),
        "tile": args.tile,
        "tile_overlap": args.tile_overlap,
        "tiles_per_call": plan.tiles_per_call,
        "vae_tile": plan.vae_tile,
        "steps": args.steps,
        "config": args.config,
        "compile_s": compile_s,
        "run_s": run_s,
        "warm_run_s": float(np.median(warm)) if warm else None,
        "rss_before_bytes": before * 1024,
        "run_peak_bytes": (peak - before) * 1024,
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "xla_temp_bytes": int(mem.temp_size_in_bytes),
        "image_bytes": 2 * 3 * 4 * size * size,
        "loadavg": os.getloadavg()[0],
    }


def run_sizes(args) -> list[dict]:
    """One subprocess per size (``--one``), results parsed from their last output line."""
    results = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(size), *_shared_flags(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"size {size} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def _shared_flags(args) -> list[str]:
    return [
        "--config",
        args.config,
        "--upscale",
        str(args.upscale),
        "--steps",
        str(args.steps),
        "--tile",
        str(args.tile),
        "--tile-overlap",
        str(args.tile_overlap),
        "--tiles-per-call",
        str(args.tiles_per_call),
        "--runs",
        str(args.runs),
        "--vae-encode-tile",
        str(args.vae_encode_tile),
        "--vae-decode-tile",
        str(args.vae_decode_tile),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--one", type=int, help="measure one size in this process (JSON out)")
    p.add_argument("--config", default="tiny")
    p.add_argument("--upscale", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="runs per size (memory: the first)")
    p.add_argument("--tile", type=int, default=48, help="latent tile")
    p.add_argument("--tile-overlap", type=int, default=16)
    p.add_argument("--tiles-per-call", type=int, default=4)
    p.add_argument("--vae-encode-tile", type=int, default=512, help="pixels")
    p.add_argument("--vae-decode-tile", type=int, default=64, help="latent pixels")
    p.add_argument("--json", type=Path, help="append the results as JSON lines here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    results = run_sizes(args)
    gib = 2**30
    print(
        f"{'size':>6} {'tiles':>6} {'compile s':>10} {'run s':>8} {'warm s':>7} "
        f"{'run peak MiB':>13} {'images MiB':>11} {'XLA temp MiB':>13} {'process peak GiB':>17}"
    )
    for r in results:
        warm = f"{r['warm_run_s']:7.1f}" if r["warm_run_s"] else f"{'-':>7}"
        print(
            f"{r['size']:6d} {r['latent_tiles']:6d} {r['compile_s']:10.1f} {r['run_s']:8.1f} "
            f"{warm} {r['run_peak_bytes'] / 2**20:13.0f} {r['image_bytes'] / 2**20:11.0f} "
            f"{r['xla_temp_bytes'] / 2**20:13.0f} {r['process_peak_bytes'] / gib:17.2f}"
        )
    if args.json:
        with args.json.open("a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
