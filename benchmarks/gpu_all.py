"""Every GPU figure of issue 8 in one run (H100 / H200), written to JSON as it is measured.

::

    python benchmarks/gpu_all.py --out $OUT/gpu_results.json           # everything, ~8 min
    python benchmarks/gpu_all.py --quick --out $OUT/gpu_results.json   # 512 px batch 1, ~3.5 min
    python benchmarks/gpu_all.py --rest --out $OUT/gpu_results.json    # the rest, ~5 min
    python benchmarks/gpu_all.py --smoke [--quick|--rest] --out /tmp/gpu_smoke.json  # CPU dry run

Measured (SD-2-size SegSR: the SD-2-base UNet and its latent ControlNet with diffusers'
weights through our converter, SD VAE, SegFormer-B5, default SegDM / DMB; bfloat16):

1. One step at 512 px and 1024 px, batch 1 and 8: diffusers UNet + ControlNet (SDPA, cuDNN
   autotuning on) vs. our full SegSR step (DMB + SRDM + SegDM + sampler updates) and, at
   512 px, our SRDM step alone (no CFG doubling on either side), with FLOPs, achieved
   TFLOP/s and the share of the card's dense bf16 peak, and memory. At 512 px batch 8 the
   SegSR step is also profiled (``profile_summary.py``: device time per op and category).
2. The whole jitted sampler at 512 px, batch 1, 50 DDPM steps, with CFG (SeeSR's default,
   guidance 5.5) and without; plus 2-step runs, so that ``(t50 - t2) / 48`` is the time of
   one step inside the scan.

Goals checked in the summary: SegSR step at 512 px / diffusers step <= 0.8; 50 steps end to
end < 2.5 s; >= 40% of bf16 peak at batch 8. Programs are compiled one at a time and each
row is written when measured (an earlier version compiled a phase's programs concurrently
and recorded nothing in 430 s); rows are skipped, and say so, once ``--deadline`` seconds
have passed. A compile that fails inside cuDNN attention is retried with the XLA attention
path (recorded as ``attention_fallback``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

# Before JAX starts: torch allocates on the same GPU, so JAX must not take 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models as bm  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import sample_bench as sb  # noqa: E402

START = time.perf_counter()
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, no sparsity).
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
}


def bf16_peak(name: str) -> float | None:
    """The data-sheet bf16 peak of a device name (most specific match first)."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return BF16_PEAK_TFLOPS[key]
    return None


def elapsed() -> float:
    return time.perf_counter() - START


class Results:
    """The results dict, rewritten to ``path`` after every change (a killed run keeps what
    it measured)."""

    def __init__(self, path: Path, **header):
        self.path = path
        self.data = dict(header)
        self.save()

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def jaxpr_flops(jaxpr) -> float:
    """Matmul, convolution and fused-attention FLOPs of a jaxpr (2 per multiply-add; scan
    bodies times their length). XLA's cost analysis does not see inside cuDNN's fused
    attention, so the FLOP rates use this count."""
    total = 0.0
    for eqn in jaxpr.eqns:
        reps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += reps * jaxpr_flops(inner)
        name = eqn.primitive.name
        out = float(np.prod(eqn.outvars[0].aval.shape)) if eqn.outvars else 0.0
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * float(np.prod([lhs[i] for i in contract]))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # [..., Cin / groups, ...]: MACs per output
            total += (
                2.0 * out * float(np.prod(rhs)) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            )
        elif name.startswith("dot_product_attention_fwd"):
            b, t, n, h = eqn.invars[0].aval.shape  # query [B, T, N, H]
            s = eqn.invars[1].aval.shape[1]  # key [B, S, N, H]
            total += 4.0 * b * n * t * s * h
    return total


def compile_all(programs: dict, res: Results, workers: int | None = None) -> dict:
    """Trace and lower in this thread, compile concurrently (XLA releases the GIL; ``workers``
    1 compiles one at a time); a program that fails to compile is retried with the XLA
    attention path instead of cuDNN's. Progress goes to stdout with the elapsed time.
    Returns ``{name: (compiled, args, compile seconds, jaxpr FLOPs)}`` of those compiled."""
    from segsr_jax.models import attention

    traced = {n: fn.trace(*a) for n, (fn, a) in programs.items()}
    lowered = {n: t.lower() for n, t in traced.items()}

    def build(name):
        t0 = time.perf_counter()
        return lowered[name].compile(), time.perf_counter() - t0

    out, failed = {}, []
    workers = workers or max(1, len(lowered))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(build, n): n for n in lowered}
        for fut in concurrent.futures.as_completed(futures):
            name = futures[fut]
            try:
                exe, secs = fut.result()
                print(f"[{elapsed():.0f} s] compiled {name} in {secs:.1f} s", flush=True)
                out[name] = (exe, programs[name][1], secs, jaxpr_flops(traced[name].jaxpr.jaxpr))
            except Exception as e:  # noqa: BLE001 -- recorded, then retried below
                res[f"compile_error_{name}"] = f"{type(e).__name__}: {e}"[:2000]
                failed.append(name)
    for name in failed:
        fn, fargs = programs[name]
        t0 = time.perf_counter()
        with mock.patch.object(attention, "_use_cudnn", lambda *a: False):
            try:  # a fresh jit: the old one's trace cache holds the cuDNN version
                retraced = jax.jit(fn.__wrapped__).trace(*fargs)
                exe = retraced.lower().compile()
            except Exception as e:  # noqa: BLE001 -- reported; the phase goes on without it
                res[f"compile_error_{name}_xla_attention"] = f"{type(e).__name__}: {e}"[:2000]
                continue
        res[f"attention_fallback_{name}"] = "xla"
        out[name] = (exe, fargs, time.perf_counter() - t0, jaxpr_flops(retraced.jaxpr.jaxpr))
    return out


def matmul_tflops(device: str) -> float | None:
    """A bf16 8192^3 torch matmul's rate: the practical ceiling next to the data sheet's."""
    import torch

    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def pipelined(call, n: int, wait) -> float:
    """Seconds per call of ``n`` calls dispatched back to back and waited for once (``wait``):
    the device's rate without the host's per-call latency between them, as inside a loop."""
    t0 = time.perf_counter()
    for _ in range(n):
        out = call()
    wait(out)
    return (time.perf_counter() - t0) / n


def time_program(exe, args, repeats: int) -> dict:
    exe_call = lambda: exe(*args)
    sb.time_calls(exe_call, 2)
    wall, _ = sb.time_calls(exe_call, repeats)
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "times_s": wall,
        "pipelined_s": pipelined(exe_call, repeats, jax.block_until_ready),
    }


def torch_block(unet_ref, cn_ref, inputs, device, repeats: int) -> tuple[dict, np.ndarray]:
    """The diffusers step's timing row and its output (NHWC float32, for the parity check)."""
    import torch

    step = sb.torch_step(unet_ref, cn_ref, inputs, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sb.time_calls(step, 3)  # warm-up, cuDNN autotuning
    wall, _ = sb.time_calls(step, repeats)
    result = step().float().cpu().numpy().transpose(0, 2, 3, 1)
    out = {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "times_s": wall,
        "flops_torch_counter": sb.torch_flops(step),
    }
    if device == "cuda":
        out["pipelined_s"] = pipelined(
            sb.torch_step(unet_ref, cn_ref, inputs, device, False),
            repeats,
            lambda _: torch.cuda.synchronize(),
        )
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out, result


def scan_kernel_dtypes(exe) -> dict:
    """How many 3x3 conv kernels the compiled sampler's largest loop carries, per dtype.
    On a GPU, float32 there means the per-step casts to bfloat16 stayed inside the loop; on
    a CPU it means nothing (XLA CPU runs bf16 convolutions in float32 and converts the
    kernels before the loop)."""
    import re

    text = exe.as_text()
    comps, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^%?([\w.\-]+) \(", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)
    bodies = [b for b in re.findall(r"body=%([\w.\-]+)", text) if b in comps]
    if not bodies:
        return {}
    body = max(bodies, key=lambda b: len(comps[b]))
    params = [line for line in comps[body] if "parameter(0)" in line]
    found = re.findall(r"(bf16|f32)\[3,3,\d+,\d+\]", params[0] if params else "")
    return {d: found.count(d) for d in set(found)}


def job_list(mode: str, sizes, batches, steps) -> list[tuple]:
    """What a run measures, in order: ``("steps", size, batch, with_srdm, profile)`` rows and
    ``("sampler", n_steps, guided, batch)`` rows. One program is compiled at a time and every row is
    written as soon as it is measured, so a run cut short keeps what came first."""
    (s0, s1), (b0, b1) = sizes, batches
    if mode == "quick":  # the first lease's rows: 512 px batch 1, the 50-step samplers
        return [
            ("steps", s0, b0, True, False),
            ("sampler", steps, False, b0),
            ("sampler", steps, True, b0),
        ]
    if mode == "rest":  # what --quick leaves: batch 8, 1024 px, the in-scan step, a profile
        return [
            ("steps", s0, b1, True, True),
            ("sampler", steps, False, b0),
            ("steps", s1, b0, False, False),
            ("steps", s1, b1, False, False),
            ("sampler", 2, False, b0),
            ("sampler", steps, True, b0),
        ]
    if mode == "scan":  # the batch-8 step as the sampler runs it: inside the scan
        short = max(3, steps // 5)
        return [
            ("steps", s0, b1, False, False),
            ("sampler", 2, False, b1),
            ("sampler", short, False, b1),
        ]
    return [
        ("steps", s0, b0, True, False),
        ("steps", s0, b1, True, True),
        ("sampler", steps, False, b0),
        ("sampler", steps, True, b0),
        ("steps", s1, b0, False, False),
        ("steps", s1, b1, False, False),
        ("sampler", 2, False, b0),
        ("sampler", 2, True, b0),
        ("sampler", max(3, steps // 5), False, b1),
    ]


def profile_program(exe, args, name: str, out_dir: Path, calls: int = 3) -> dict:
    """A ``jax.profiler`` trace of ``calls`` calls and its per-op summary
    (``profile_summary.py``); the trace file is kept beside the results when small."""
    import gzip
    import shutil
    import tempfile

    import profile_summary

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                jax.block_until_ready(exe(*args))
        text = exe.as_text()
        summary_ = profile_summary.summarise(tmp, top=40, calls=calls, hlo_text=text)
        pb = profile_summary.xplane_file(tmp)
        if pb.stat().st_size < 15 * 2**20:
            shutil.copy(pb, out_dir / f"{name}.xplane.pb")
        with gzip.open(out_dir / f"{name}.hlo.txt.gz", "wt") as fh:  # for --hlo
            fh.write(text)
    print(profile_summary.format_summary(summary_), flush=True)
    return summary_


def run(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    config = "tiny" if args.smoke else "sd2"
    dtype = "bfloat16"
    sizes = [64, 128] if args.smoke else [512, 1024]
    batches = [1, 2] if args.smoke else [1, 8]
    steps = 3 if args.smoke else 50
    mode = "quick" if args.quick else "rest" if args.rest else "scan" if args.scan else "full"
    info = sb.machine_info(device)
    name = info.get("gpu", info["jax_device"])
    res = Results(
        args.out,
        machine=info,
        config=config,
        dtype=dtype,
        mode=mode,
        bf16_peak_tflops=bf16_peak(name),
        jax_backend=jax.default_backend(),
        matmul_bf16_tflops=matmul_tflops(device),
    )
    unet_ref, cn_ref, model, build_s = bm.build_models(bm.CONFIGS[config], dtype, device, None)
    res["build_s"] = build_s
    count = lambda m: sum(p.numel() for p in m.parameters())
    res["params"] = {"unet": count(unet_ref), "controlnet": count(cn_ref)}
    cfg = model.config
    f = cfg.latent_factor
    peak = res.data["bf16_peak_tflops"]
    step_model = bm.with_compute_dtype_kernels(model)

    def step_rows(size: int, batch: int, with_srdm: bool, profile: bool) -> None:
        inputs = bm.step_inputs(cfg, batch, size // f)
        progs = sb.jax_programs(
            model, inputs, image=size, guidance=False, steps=2, step_model=step_model
        )
        key = f"{size}px_b{batch}"
        ref, ref_out = torch_block(unet_ref, cn_ref, inputs, device, args.repeats)
        res[f"diffusers_step_{key}"] = ref
        print(
            f"[{elapsed():.0f} s] diffusers_step_{key}: {ref['median_s'] * 1e3:.1f} ms", flush=True
        )
        if device == "cuda":
            torch.cuda.empty_cache()
        for kind in ("segsr", "srdm") if with_srdm else ("segsr",):
            name = f"{kind}_step_{key}"
            if elapsed() > args.deadline:
                res[f"phase_{name}"] = f"skipped: {elapsed():.0f} s used of {args.deadline}"
                continue
            compiled = compile_all({name: progs[f"jax_{kind}_step"]}, res, 1)
            if name not in compiled:
                continue
            exe, fargs, secs, flops = compiled[name]
            row = {
                "compile_s": secs,
                **sb.xla_costs(exe),
                **time_program(exe, fargs, args.repeats),
                "flops_jaxpr": flops,
            }
            row["tflops_per_s"] = row["flops_jaxpr"] / row["median_s"] / 1e12
            if peak:
                row["peak_fraction"] = row["tflops_per_s"] / peak
            if res.data["matmul_bf16_tflops"]:
                row["matmul_fraction"] = row["tflops_per_s"] / res.data["matmul_bf16_tflops"]
            row["ratio_to_diffusers"] = row["median_s"] / ref["median_s"]
            if kind == "srdm":  # same computation? (bf16 on both sides: ~1e-2 expected)
                ours = np.asarray(exe(*fargs), np.float32)
                row["parity_rel_err"] = float(
                    np.abs(ours - ref_out).max() / max(np.abs(ref_out).max(), 1e-12)
                )
            stats = jax.devices()[0].memory_stats() or {}
            row["jax_peak_bytes_so_far"] = int(stats.get("peak_bytes_in_use", 0))
            res[name] = row
            print(
                f"[{elapsed():.0f} s] {name}: {row['median_s'] * 1e3:.1f} ms, "
                f"{row['tflops_per_s']:.1f} TFLOP/s, diffusers {ref['median_s'] * 1e3:.1f} ms",
                flush=True,
            )
            if profile and kind == "segsr":  # after this shape's rows (the program is built)
                to_profile[name] = (exe, fargs)
            del compiled
        for pname, (exe, fargs) in list(to_profile.items()):
            try:
                res[f"profile_{pname}"] = profile_program(exe, fargs, pname, args.out.parent)
            except Exception as e:  # noqa: BLE001 -- a profile is extra
                res[f"profile_error_{pname}"] = f"{type(e).__name__}: {e}"[:2000]
            del to_profile[pname]

    def sampler_row(n_steps: int, guided: bool, batch: int) -> None:
        inputs = bm.step_inputs(cfg, batch, sizes[0] // f)
        sname = f"sampler_{'cfg' if guided else 'nocfg'}_{n_steps}" + (
            f"_b{batch}" if batch != batches[0] else ""
        )
        progs = sb.jax_programs(model, inputs, image=sizes[0], guidance=guided, steps=n_steps)
        compiled = compile_all({sname: progs["jax_sampler"]}, res, 1)
        if sname not in compiled:
            return
        exe, fargs, secs, flops = compiled[sname]
        row = {
            "compile_s": secs,
            **sb.xla_costs(exe),
            "flops_jaxpr": flops,
            **time_program(exe, fargs, max(3, args.repeats // 3)),
            "scan_carries_3x3_kernels": scan_kernel_dtypes(exe),
        }
        res[sname] = row
        print(f"[{elapsed():.0f} s] {sname}: {row['median_s']:.3f} s", flush=True)
        for key, value in in_scan_steps(res.data).items():
            res[key] = value

    to_profile = {}
    for job in job_list(mode, sizes, batches, steps):
        if elapsed() > args.deadline:
            res[f"phase_{'_'.join(map(str, job))}"] = (
                f"skipped: {elapsed():.0f} s used of {args.deadline}"
            )
            continue
        try:
            step_rows(*job[1:]) if job[0] == "steps" else sampler_row(*job[1:])
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory; the next row may fit
            res[f"error_{'_'.join(map(str, job))}"] = traceback.format_exc()[-3000:]
            print(f"[{elapsed():.0f} s] {job} failed: {type(e).__name__}: {e}"[:500], flush=True)
        stats = jax.devices()[0].memory_stats() or {}
        res["jax_peak_bytes"] = int(stats.get("peak_bytes_in_use", 0))
    res["total_s"] = elapsed()
    print(summary(res.data, sizes, batches, steps))


def in_scan_steps(r: dict) -> dict:
    """One reverse step inside the sampler's scan, from two sampler rows that differ only in
    their number of steps: ``(t_long - t_2) / (long - 2)``, keyed like the sampler rows
    (``in_scan_step_nocfg_s``, ``in_scan_step_nocfg_b8_s``); the longest pair wins."""
    rows = []  # (steps, kind and batch, name) of the rows named sampler_{kind}_{steps}[_bN]
    for name in r:
        parts = name.split("_")
        if name.startswith("sampler_") and len(parts) >= 3 and parts[2].isdigit():
            rows.append((int(parts[2]), "_".join([parts[1], *parts[3:]]), name))
    out = {}
    for n, rest, name in sorted(rows, reverse=True):
        short = "sampler_" + rest.replace("_", "_2_", 1) if "_" in rest else f"sampler_{rest}_2"
        if n > 2 and short in r and f"in_scan_step_{rest}_s" not in out:
            out[f"in_scan_step_{rest}_s"] = (r[name]["median_s"] - r[short]["median_s"]) / (n - 2)
    return out


def summary(r: dict, sizes, batches, steps) -> str:
    """The measured rows and the three goals."""
    m = r["machine"]
    lines = [
        f"{r['config']} {r['dtype']} on {m.get('gpu', m['jax_device'])} "
        f"(jax {m['jax']}, torch {m['torch']}, diffusers {m['diffusers']}); "
        f"bf16 peak {r.get('bf16_peak_tflops')} TFLOP/s (data sheet), torch 8192^3 matmul "
        f"{r.get('matmul_bf16_tflops') or 0:.0f}; total {r.get('total_s', 0):.0f} s"
    ]
    for size in sizes:
        for b in batches:
            key = f"{size}px_b{b}"
            ref = r.get(f"diffusers_step_{key}")
            if not ref:
                continue
            piped = lambda row: (
                f" (pipelined {row['pipelined_s'] * 1e3:.1f} ms)" if "pipelined_s" in row else ""
            )
            lines.append(f"  {key}: diffusers {ref['median_s'] * 1e3:8.1f} ms{piped(ref)}")
            for kind in ("srdm", "segsr"):
                row = r.get(f"{kind}_step_{key}")
                if row:
                    frac = row.get("peak_fraction")
                    lines.append(
                        f"    {kind:5s} {row['median_s'] * 1e3:8.1f} ms  ratio "
                        f"{row['ratio_to_diffusers']:.3f}  {row['flops_jaxpr'] / 1e9:.1f} GFLOP"
                        f"  {row['tflops_per_s']:.2f} TFLOP/s"
                        + (f" ({100 * frac:.0f}% of peak)" if frac else "")
                        + piped(row)
                        + (
                            f"  parity {row['parity_rel_err']:.1e}"
                            if "parity_rel_err" in row
                            else ""
                        )
                    )
    for name in sorted(k for k in r if k.startswith("sampler_")):
        lines.append(
            f"  {name}: {r[name]['median_s']:.3f} s (compile "
            f"{r[name]['compile_s']:.0f} s); loop carries 3x3 kernels "
            f"{r[name]['scan_carries_3x3_kernels']}"
        )
    for name in sorted(k for k in r if k.startswith("in_scan_step_")):
        lines.append(f"  one step inside the scan ({name[13:-2]}): {r[name] * 1e3:.1f} ms")
    goal = lambda ok: "MET" if ok else "NOT MET"
    key = f"{sizes[0]}px_b{batches[0]}"
    if f"segsr_step_{key}" in r:
        ratio = r[f"segsr_step_{key}"]["ratio_to_diffusers"]
        lines.append(f"goal SegSR step {key} <= 0.8x diffusers: {ratio:.3f} {goal(ratio <= 0.8)}")
    if f"sampler_cfg_{steps}" in r:
        t = r[f"sampler_cfg_{steps}"]["median_s"]
        lines.append(f"goal {steps} steps end to end (CFG) < 2.5 s: {t:.2f} s {goal(t < 2.5)}")
    key8 = f"{sizes[0]}px_b{batches[1]}"
    row8 = r.get(f"segsr_step_{key8}", {})
    if row8.get("peak_fraction") is not None:
        frac = row8["peak_fraction"]
        mm = row8.get("matmul_fraction")
        lines.append(
            f"goal >= 40% of bf16 peak at {key8}: {100 * frac:.0f}% {goal(frac >= 0.4)}"
            + (f" ({100 * mm:.0f}% of the measured matmul rate)" if mm else "")
        )
        peak = r.get("bf16_peak_tflops")
        for how, secs in (
            ("pipelined calls", row8.get("pipelined_s")),
            ("inside the sampler's scan", r.get(f"in_scan_step_nocfg_b{batches[1]}_s")),
        ):
            if secs and peak:
                frac = row8["flops_jaxpr"] / secs / 1e12 / peak
                lines.append(
                    f"  the same step {how}: {secs * 1e3:.1f} ms, {100 * frac:.0f}% of "
                    f"peak {goal(frac >= 0.4)}"
                )
    for k in r:
        if k.startswith("profile_") and isinstance(r[k], dict):
            cats = ", ".join(f"{c} {v:.1f}" for c, v in r[k]["categories_ms"].items())
            lines.append(
                f"  {k}: {r[k]['device_ms_per_call']:.1f} ms of device ops per call ({cats} ms)"
            )
    if r.get("jax_peak_bytes"):
        lines.append(f"  JAX peak memory {r['jax_peak_bytes'] / 2**30:.1f} GiB")
    errors = [
        k
        for k in r
        if k.startswith(
            ("compile_error", "attention_fallback", "phase_", "error_", "profile_error")
        )
        and not k.endswith("_wall_s")
    ]
    lines += [f"  {k}: {str(r[k])[:200]}" for k in errors]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    p.add_argument("--smoke", action="store_true", help="tiny config (a CPU dry run)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="512 px batch 1 steps and the 50-step samplers only, compiled one at a "
        "time (fits a few minutes of device time)",
    )
    p.add_argument(
        "--rest",
        action="store_true",
        help="what --quick leaves: batch 8 (with a profile), 1024 px, the in-scan "
        "step and the CFG sampler, one compile at a time",
    )
    p.add_argument(
        "--scan",
        action="store_true",
        help="the batch-8 step three ways: one call at a time, calls dispatched back "
        "to back, and inside the sampler's scan (samplers of 2 and steps/5 "
        "steps at batch 8)",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--deadline", type=float, default=460.0, help="seconds after which no new phase starts"
    )
    args = p.parse_args(argv)
    try:
        run(args)
    except Exception:
        traceback.print_exc()
        path = args.out
        data = json.loads(path.read_text()) if path.exists() else {}
        data["fatal_error"] = traceback.format_exc()[-4000:]
        path.write_text(json.dumps(data, indent=1, default=str))
        raise


if __name__ == "__main__":
    main()
