"""benchmarks/profile_summary.py: the per-op table the GPU benchmark reports."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_summary  # noqa: E402


def _conv_then_dense(a, k, w):
    y = jax.lax.conv_general_dilated(a, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).reshape(-1, w.shape[0]) @ w


def test_profile_of_a_conv_and_a_matmul(tmp_path):
    args = (jnp.ones((2, 32, 32, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((32, 32)))
    exe = jax.jit(_conv_then_dense).lower(*args).compile()
    text = exe.as_text()
    cats = profile_summary.hlo_categories(text)
    assert "convolution" in cats.values() and "matmul" in cats.values()

    jax.block_until_ready(exe(*args))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(exe(*args))
    s = profile_summary.summarise(tmp_path, calls=2, hlo_text=text)
    assert s["events"] > 0 and s["device_ms_per_call"] > 0
    assert {"convolution", "matmul"} <= set(s["categories_ms"])
    assert abs(sum(s["categories_ms"].values()) - s["device_ms_per_call"]) < 1e-6
    ops = [r["op"] for r in s["top_ops"]]
    assert all(op in cats for op in ops), ops   # the trace's op names are the HLO's
    assert "convolution" in profile_summary.format_summary(s)
