"""benchmarks/profile_summary.py: the per-op table the GPU benchmark reports."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_summary  # noqa: E402


def _conv_then_dense(a, k, w):
    y = jax.lax.conv_general_dilated(
        a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
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
    assert all(op in cats for op in ops), ops  # the trace's op names are the HLO's
    assert "convolution" in profile_summary.format_summary(s)


GPU_LIKE_HLO = """\
%fused_convert (p: f32[3,3,4,4]) -> bf16[3,3,4,4] {
  %p = f32[3,3,4,4]{3,2,1,0} parameter(0)
  ROOT %convert.1 = bf16[3,3,4,4]{3,2,1,0} convert(%p)
}

%gemm_computation (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.2 = bf16[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%async_body (x: bf16[8,8], y: bf16[8,8]) -> bf16[8,8] {
  %x = bf16[8,8]{1,0} parameter(0)
  %y = bf16[8,8]{1,0} parameter(1)
  ROOT %triton_gemm.3 = bf16[8,8]{1,0} fusion(%x, %y), kind=kCustom, calls=%gemm_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}

ENTRY %main (k: f32[3,3,4,4], i: bf16[1,8,8,4], m: bf16[8,8]) -> bf16[8,8] {
  %k = f32[3,3,4,4]{3,2,1,0} parameter(0)
  %i = bf16[1,8,8,4]{3,2,1,0} parameter(1)
  %m = bf16[8,8]{1,0} parameter(2)
  %loop_convert_fusion = bf16[3,3,4,4]{3,2,1,0} fusion(%k), kind=kLoop, calls=%fused_convert
  %cudnn-conv.4 = (bf16[1,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%i, %loop_convert_fusion), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward"
  %custom-call.5 = (bf16[1,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%i, %i, %i), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.6 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%m, %m), custom_call_target="__cublas$lt$matmul"
  %fusion-start.7 = ((bf16[8,8]{1,0}, bf16[8,8]{1,0}), bf16[8,8]{1,0}) fusion-start(%m, %m), calls=%async_body
  ROOT %fusion-done.8 = bf16[8,8]{1,0} fusion-done(%fusion-start.7)
}
"""  # noqa: E501 -- HLO text has one instruction per line


def test_gpu_like_hlo_categories():
    cats = profile_summary.hlo_categories(GPU_LIKE_HLO)
    assert cats["loop_convert_fusion"] == "elementwise/other"
    assert cats["cudnn-conv.4"] == "convolution"
    assert cats["custom-call.5"] == "attention"
    assert cats["custom-call.6"] == "matmul"
    assert cats["fusion-start.7"] == "matmul"  # through the async wrapper
    # Without the program text, names alone: a convert is not a convolution.
    assert profile_summary.category("loop_convert_fusion", "") == "elementwise/other"
    assert profile_summary.category("cudnn-conv.4", "") == "convolution"
    assert profile_summary.category("custom-call.6", "sm90_xmma_gemm_bf16") == "matmul"
