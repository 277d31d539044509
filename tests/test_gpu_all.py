"""benchmarks/gpu_all.py: what a device lease measures and how its rows are combined."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_all  # noqa: E402


def _sampler(t):
    return {"median_s": t, "compile_s": 1.0, "scan_carries_3x3_kernels": {"bf16": 4}}


def test_in_scan_step_from_two_sampler_rows_of_the_same_kind_and_batch():
    rows = {
        "sampler_nocfg_50": _sampler(0.50),
        "sampler_nocfg_2": _sampler(0.02),
        "sampler_cfg_50": _sampler(0.70),  # no 2-step CFG row: no CFG in-scan step
        "sampler_nocfg_10_b8": _sampler(0.35),
        "sampler_nocfg_2_b8": _sampler(0.15),
    }
    got = gpu_all.in_scan_steps(rows)
    assert set(got) == {"in_scan_step_nocfg_s", "in_scan_step_nocfg_b8_s"}
    assert abs(got["in_scan_step_nocfg_s"] - 0.48 / 48) < 1e-12
    assert abs(got["in_scan_step_nocfg_b8_s"] - 0.20 / 8) < 1e-12


def test_scan_mode_measures_the_batch_8_step_and_two_batch_8_samplers():
    jobs = gpu_all.job_list("scan", (512, 1024), (1, 8), 50)
    assert jobs == [
        ("steps", 512, 8, False, False),
        ("sampler", 2, False, 8),
        ("sampler", 10, False, 8),
    ]
    for mode in ("quick", "rest", "full"):  # every sampler row says its batch
        assert all(
            len(j) == 4
            for j in gpu_all.job_list(mode, (512, 1024), (1, 8), 50)
            if j[0] == "sampler"
        )


def test_summary_reports_the_peak_goal_three_ways():
    step = {
        "median_s": 0.040,
        "pipelined_s": 0.030,
        "flops_jaxpr": 10e12,
        "tflops_per_s": 250.0,
        "peak_fraction": 0.25,
        "ratio_to_diffusers": 0.8,
    }
    r = {
        "machine": {"gpu": "X", "jax_device": "X", "jax": "0", "torch": "0", "diffusers": "0"},
        "config": "sd2",
        "dtype": "bfloat16",
        "bf16_peak_tflops": 1000.0,
        "diffusers_step_512px_b8": {"median_s": 0.05},
        "segsr_step_512px_b8": step,
        "sampler_nocfg_2_b8": _sampler(0.1),
        "sampler_nocfg_10_b8": _sampler(0.3),
    }
    r.update(gpu_all.in_scan_steps(r))
    text = gpu_all.summary(r, (512, 1024), (1, 8), 50)
    assert "at 512px_b8: 25% NOT MET" in text
    assert "pipelined calls: 30.0 ms, 33% of peak NOT MET" in text
    assert "inside the sampler's scan: 25.0 ms, 40% of peak MET" in text


def test_pipelined_waits_once_for_the_last_call():
    f = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))
    waited = []
    secs = gpu_all.pipelined(lambda: f(x), 5, lambda out: waited.append(out))
    assert secs > 0 and len(waited) == 1
    assert float(waited[0][0, 0]) == 64.0
