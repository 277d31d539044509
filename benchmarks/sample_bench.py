"""Sampler benchmark: one SegSR reverse step and the whole jitted sampler, side by side with
the diffusers UNet + ControlNet step on the same machine, in the same run.

::

    python benchmarks/sample_bench.py                  # medium config, 256 px, float32, CPU
    python benchmarks/sample_bench.py --single-thread  # one core each: robust to other jobs
    python benchmarks/sample_bench.py --cfg            # the SegSR step with CFG doubling

(``benchmarks/gpu_all.py`` runs the GPU figures, SD-2 size, in one go.)

What is measured (medians over ``--repeats`` calls, torch and JAX interleaved in ``--rounds``
rounds so that a change in machine load hits both alike):

- ``diffusers_step``: diffusers ``ControlNetModel`` + ``UNet2DConditionModel`` (batch B, no
  CFG), the reference SRDM step.
- ``jax_srdm_step``: our ControlNet + UNet with the same weights, like for like.
- ``jax_segsr_step``: one reverse step of SegSR, i.e. one iteration of the sampler's scan
  (:func:`segsr_jax.diffusion.sampling.reverse_step`: DMB + SRDM + SegDM + both sampler
  updates), with or without CFG doubling (``--cfg``; default without, as the diffusers step).
- ``jax_sampler``: the whole jitted sampler (VAE encode, SegFormer, ``--steps`` scan steps,
  VAE decode, colour fix), compile time reported apart.

Weights: the diffusers models are built from the config, every tensor is perturbed (so
zero-initialised ControlNet convs are non-zero), saved with ``save_pretrained`` and loaded back
through :mod:`segsr_jax.weights`; a parity check of the two SRDM outputs guards against
benchmarking two different computations. The latent-conditioned ControlNet of SegSR is matched
in diffusers by setting the conditioning embedding's stride-2 convs to stride 1.

FLOPs come from XLA's cost analysis of the compiled step, memory from
``compiled.memory_analysis()``, the process RSS and (on GPU) the device's peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--single-thread" in sys.argv:
    # One core for the whole process (both frameworks' thread pools included), set before
    # JAX starts its threads; XLA reads its flags at backend start, i.e. at the import below.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_models import CONFIGS, DTYPES, build_models, step_inputs, with_compute_dtype_kernels  # noqa: E402
from flax import nnx  # noqa: E402

from segsr_jax.diffusion import samplers, sampling  # noqa: E402
from segsr_jax.diffusion.options import SampleOptions  # noqa: E402
from segsr_jax.diffusion.session import SamplingSession  # noqa: E402
from segsr_jax.models.segsr import SegSR  # noqa: E402


def compile_timed(fn, *args):
    """``fn.lower(*args).compile()`` -> ``(compiled, seconds)``."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def xla_costs(compiled) -> dict:
    """FLOPs and memory of a compiled program (XLA's own estimates)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    out = {"flops": float(cost.get("flops", float("nan")))}
    for name in ("argument", "output", "temp", "generated_code"):
        out[f"{name}_bytes"] = int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
    return out


def jax_programs(
    model: SegSR,
    inputs: dict,
    *,
    image: int,
    guidance: bool,
    steps: int,
    step_model: SegSR | None = None,
):
    """The jitted JAX callables and their arguments: ``{name: (jitted, args)}``; the whole
    sampler's as the sampling session that every sampler caller uses makes it.

    The whole sampler runs ``model`` (as a user's run does); the step programs run
    ``step_model`` when given (e.g. :func:`with_compute_dtype_kernels` of it).
    """
    cfg = model.config
    sampler_state = nnx.state(model)
    model = step_model or model
    graphdef, state = nnx.split(model)
    cn_def, cn_state = nnx.split(model.controlnet)
    unet_def, unet_state = nnx.split(model.unet)
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    cond_in = jnp.concatenate([x["z_lq"], x["c_t"]], axis=-1)

    def srdm(cn_state, unet_state, z, t, ctx, cond):
        down, mid = nnx.merge(cn_def, cn_state)(z, t, ctx, cond)
        return nnx.merge(unet_def, unet_state)(z, t, ctx, down_residuals=down, mid_residual=mid)

    session = SamplingSession(graphdef, cfg)
    options = SampleOptions(
        steps=steps,
        guidance=5.5 if guidance else 1.0,
        tile=image // cfg.latent_factor,
        tile_overlap=0,
        tiles_per_call=1,
    )
    plan = session.plan((image, image), options)
    s0 = jax.tree.map(lambda a: jnp.asarray(a[0]), session.schedule(options))
    cond = sampling.Conditions(
        z_lq=x["z_lq"],
        f_lq=x["f_lq"],
        context=x["context"],
        uncond_context=jnp.zeros_like(x["context"]) if guidance else None,
        guidance_scale=jnp.float32(5.5),
    )
    b, h, w, _ = x["z"].shape
    carry = sampling.Carry(
        sr=samplers.init_state(x["z"]),
        s_t=x["s"],
        key=jax.random.key(0),
        seg_logits=jnp.zeros((b, h, w, cfg.segdm.num_classes)),
        seg_probs=jnp.zeros((b, h, w, cfg.segdm.num_classes)),
    )

    def segsr_step(state, cond, carry, s):
        return sampling.reverse_step(nnx.merge(graphdef, state), plan, cond, carry, s)

    lq = np.random.default_rng(1).uniform(-1, 1, (b, image, image, 3)).astype(np.float32)
    sampler = session.call(sampler_state, lq, options, contexts=(x["context"], cond.uncond_context))
    return {
        "jax_srdm_step": (
            jax.jit(srdm),
            (cn_state, unet_state, x["z"], x["t"], x["context"], cond_in),
        ),
        "jax_segsr_step": (jax.jit(segsr_step), (state, cond, carry, s0)),
        "jax_sampler": (sampler.fn, sampler.args),
    }


def torch_step(unet_ref, cn_ref, inputs: dict, device: str, sync: bool = True):
    """The diffusers SRDM step as a no-argument callable (synchronised on CUDA unless
    ``sync`` is false)."""
    import torch

    dtype = next(unet_ref.parameters()).dtype
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(
        device=device, dtype=dtype
    )
    z = nchw(inputs["z"])
    cond = nchw(np.concatenate([inputs["z_lq"], inputs["c_t"]], axis=-1))
    ctx = torch.from_numpy(inputs["context"]).to(device=device, dtype=dtype)
    t = torch.from_numpy(inputs["t"]).to(device)

    @torch.inference_mode()
    def step():
        down, mid = cn_ref(z, t, ctx, cond, return_dict=False)
        out = unet_ref(
            z,
            t,
            ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        if device == "cuda" and sync:
            torch.cuda.synchronize()
        return out

    return step


def torch_flops(step) -> float:
    """FLOPs of one call as counted by torch's FlopCounterMode (matmuls, convs and GPU
    attention; its CPU scaled-dot-product attention is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def time_calls(fn, n: int) -> tuple[list[float], float]:
    """``n`` calls of ``fn`` (results waited for) -> ``(wall seconds per call, process CPU
    seconds per call)``. A short pause first lets the other framework's worker threads stop
    spinning, so they do not steal cycles from this one."""
    time.sleep(0.2)
    out = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out, (time.process_time() - cpu0) / n


def rss_bytes() -> tuple[int, int]:
    """``(current, peak)`` resident set size of this process in bytes (Linux)."""
    import psutil

    return psutil.Process().memory_info().rss, resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss * 1024


def machine_info(device: str) -> dict:
    """Where and with what the numbers were measured."""
    import diffusers
    import torch

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_device": str(jax.devices()[0].device_kind),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_device": device,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": os.getloadavg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(args) -> dict:
    """Build, compile, check parity, time; returns the results dict."""
    import torch

    device = (
        "cuda"
        if args.torch_device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.torch_device == "auto" else args.torch_device)
    )
    torch.set_num_threads(1 if args.single_thread else (args.threads or os.cpu_count()))
    bench = CONFIGS[args.config]
    res = {
        "machine": machine_info(device),
        "config": args.config,
        "image": args.image,
        "batch": args.batch,
        "dtype": args.dtype,
        "cfg_doubling": args.cfg,
        "steps": args.steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        unet_ref, cn_ref, model, build_s = build_models(
            bench, args.dtype, device, Path(tmp) if args.weights == "files" else None
        )
    cfg = model.config
    res["build_s"] = build_s
    count = lambda m: sum(p.numel() for p in m.parameters())
    res["params"] = {
        "unet": count(unet_ref),
        "controlnet": count(cn_ref),
        "segdm": _nnx_count(model.segdm),
        "bridge": _nnx_count(model.bridge),
    }
    latent = args.image // cfg.latent_factor
    inputs = step_inputs(cfg, args.batch, latent)
    step_model = with_compute_dtype_kernels(model) if args.dtype != "float32" else None
    programs = jax_programs(
        model, inputs, image=args.image, guidance=args.cfg, steps=args.steps, step_model=step_model
    )
    if args.no_sampler:
        programs.pop("jax_sampler")
    compiled = {}
    for name, (fn, fargs) in programs.items():
        exe, secs = compile_timed(fn, *fargs)
        compiled[name] = (exe, fargs)
        res[name] = {"compile_s": secs, **xla_costs(exe)}
    step_ref = torch_step(unet_ref, cn_ref, inputs, device)
    res["diffusers_step"] = {"flops_torch_counter": torch_flops(step_ref)}

    # Same computation? (float32: within the parity criterion; bf16: reported only.)
    ref = step_ref().float().cpu().numpy().transpose(0, 2, 3, 1)
    exe, fargs = compiled["jax_srdm_step"]
    ours = np.asarray(exe(*fargs), np.float32)
    res["srdm_parity_rel_err"] = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))
    carry = compiled["jax_segsr_step"][0](*compiled["jax_segsr_step"][1])
    if not all(bool(jnp.isfinite(a).all()) for a in (carry.sr.x, carry.s_t)):
        raise RuntimeError("SegSR step produced non-finite values")

    calls = {
        "diffusers_step": step_ref,
        **{n: (lambda e=e, a=a: e(*a)) for n, (e, a) in compiled.items() if n != "jax_sampler"},
    }
    for fn in calls.values():  # warm-up (allocators, thread pools, cuDNN autotuning)
        time_calls(fn, 2)
    times = {n: [] for n in calls}
    cpu = {n: [] for n in calls}
    for _ in range(args.rounds):
        for n, fn in calls.items():
            wall, cpu_s = time_calls(fn, args.repeats)
            times[n] += wall
            cpu[n].append(cpu_s)
    if "jax_sampler" in compiled:
        exe, fargs = compiled["jax_sampler"]
        time_calls(lambda: exe(*fargs), 1)
        times["jax_sampler"], cpu_s = time_calls(lambda: exe(*fargs), args.sampler_repeats)
        cpu["jax_sampler"] = [cpu_s]
    for n, ts in times.items():
        res[n].update(
            median_s=statistics.median(ts),
            min_s=min(ts),
            times_s=ts,
            cpu_s_per_call=statistics.median(cpu[n]),
        )
        flops = res[n].get("flops")
        if flops:
            res[n]["tflops_per_s"] = flops / res[n]["median_s"] / 1e12
    ref_s = res["diffusers_step"]["median_s"]
    res["ratio_segsr_to_diffusers"] = res["jax_segsr_step"]["median_s"] / ref_s
    res["ratio_srdm_to_diffusers"] = res["jax_srdm_step"]["median_s"] / ref_s
    res["cpu_ratio_segsr_to_diffusers"] = (
        res["jax_segsr_step"]["cpu_s_per_call"] / res["diffusers_step"]["cpu_s_per_call"]
    )
    res["rss_bytes"], res["peak_rss_bytes"] = rss_bytes()
    if device == "cuda":
        res["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        res["jax_peak_bytes"] = int(stats["peak_bytes_in_use"])
    res["machine"]["loadavg_end"] = os.getloadavg()
    return res


def _nnx_count(module) -> int:
    return sum(
        int(np.prod(v.get_value().shape))
        for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    )


def summary(res: dict) -> str:
    """A human-readable block of the results."""
    m = res["machine"]
    lines = [
        f"{res['config']} {res['image']}px batch {res['batch']} {res['dtype']} "
        f"(CFG doubling: {res['cfg_doubling']}) on {m.get('gpu', m['cpu'])}, "
        f"{m['cores']} cores, torch threads {m['torch_threads']}, "
        f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}",
        "params: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in res["params"].items()),
        f"SRDM parity (max abs err / scale): {res['srdm_parity_rel_err']:.2e}",
    ]
    for n in ("diffusers_step", "jax_srdm_step", "jax_segsr_step", "jax_sampler"):
        if n not in res:
            continue
        r = res[n]
        row = (
            f"  {n:15s} median {r['median_s'] * 1e3:8.1f} ms  min {r['min_s'] * 1e3:8.1f} ms"
            f"  CPU {r['cpu_s_per_call'] * 1e3:8.1f} ms/call"
        )
        if "flops" in r:
            row += (
                f"  {r['flops'] / 1e9:8.1f} GFLOP  {r['tflops_per_s']:.3f} TFLOP/s"
                f"  compile {r['compile_s']:.1f} s  temp {r['temp_bytes'] / 2**20:.0f} MiB"
            )
        elif "flops_torch_counter" in r:
            row += f"  {r['flops_torch_counter'] / 1e9:8.1f} GFLOP (torch counter)"
        lines.append(row)
    lines.append(
        f"ratio SegSR step / diffusers step: {res['ratio_segsr_to_diffusers']:.3f}; "
        f"SRDM / diffusers: {res['ratio_srdm_to_diffusers']:.3f}; CPU time SegSR / "
        f"diffusers: {res['cpu_ratio_segsr_to_diffusers']:.3f}"
    )
    lines.append(
        f"process RSS {res['rss_bytes'] / 2**30:.2f} GiB, "
        f"peak {res['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    for k in ("torch_peak_bytes", "jax_peak_bytes"):
        if k in res:
            lines.append(f"{k}: {res[k] / 2**30:.2f} GiB")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    p.add_argument("--image", type=int, default=256, help="output side in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--cfg", action="store_true", help="SegSR step with CFG batch doubling")
    p.add_argument("--steps", type=int, default=4, help="steps of the whole-sampler run")
    p.add_argument("--no-sampler", action="store_true", help="skip the whole-sampler run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    p.add_argument("--sampler-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument(
        "--single-thread",
        action="store_true",
        help="both frameworks on one core with one thread (a comparison less "
        "sensitive to other jobs on a shared machine)",
    )
    p.add_argument("--torch-device", default="auto")
    p.add_argument(
        "--weights",
        choices=("files", "memory"),
        default="files",
        help="diffusers -> ours through save_pretrained + segsr_jax.weights, or "
        "the same mapping in memory",
    )
    p.add_argument("--json", type=Path, help="append the results as one JSON line here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    res = run(args)
    print(summary(res))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
