"""Large images (issue 8): a tiled 2048x2048 output of the tiny random config fits in host
memory, and the sampler's working memory grows only by full-image arrays, not by model
activations; plus the query-chunked attention that keeps large tiles bounded.

The memory runs go through ``benchmarks/large_image_bench.py --one SIZE`` in fresh
subprocesses (one size's freed pages cannot hide the next one's peak): 1 DDPM step, an LQ of
``size / 4`` pixels resized up as ``segsr_jax.sample`` does, latent tiles 48 / overlap 16,
4 tiles per call, VAE and SegFormer windows of 512 px. The working memory is the resident-set
high-water mark during the run above the RSS before it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from segsr_jax.models import attention

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "large_image_bench.py"
MiB, GiB = 2**20, 2**30


def _measure(size: int) -> dict:
    env = dict(os.environ)
    # One CPU device, as a user's run has (conftest fakes 8 for the mesh tests).
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    )
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--one", str(size), "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_2048_output_fits_and_memory_grows_only_with_the_image():
    """Measured here (2-core machine): 1024 px 145-158 MiB, 2048 px 335 MiB working memory, 1.4 GiB
    process peak. The bound on growth is 3x the growth of the float32 LQ + SR images plus
    64 MiB: denoising all 64 tiles of the 2048 px latent in one call instead of 4 grows the
    working memory by 685 MiB and fails it."""
    small, big = _measure(1024), _measure(2048)
    assert big["latent_tiles"] == 64 and big["tiles_per_call"] == 4
    assert big["vae_tile"] is not None  # VAE and SegFormer ran window by window
    assert big["process_peak_bytes"] < 24 * GiB  # the bound for the whole process
    growth = big["run_peak_bytes"] - small["run_peak_bytes"]
    image_growth = big["image_bytes"] - small["image_bytes"]
    assert growth <= 3 * image_growth + 64 * MiB, (
        f"working memory grew {growth / MiB:.0f} MiB from 1024 to 2048 px; the images only "
        f"{image_growth / MiB:.0f} MiB"
    )


def test_chunked_attention_equals_one_block(monkeypatch):
    """Queries processed in chunks (padded to whole chunks) give the one-block result, for
    self- and cross-attention and a query length that no chunk size divides."""
    rng = np.random.default_rng(0)
    b, heads, d = 2, 3, 8
    for lq, lk in [(203, 203), (203, 77)]:
        q, k, v = (
            jnp.asarray(rng.standard_normal((b, n, heads * d)), jnp.float32) for n in (lq, lk, lk)
        )
        whole = attention.attention(q, k, v, heads)
        monkeypatch.setitem(
            attention.MAX_SCORE_ELEMENTS, jax.default_backend(), b * heads * lk * 40
        )  # chunks of 40 queries: 6 chunks, 37 padded
        chunked = attention.attention(q, k, v, heads)
        monkeypatch.undo()
        want = jax.nn.dot_product_attention(
            q.reshape(b, lq, heads, d), k.reshape(b, lk, heads, d), v.reshape(b, lk, heads, d)
        ).reshape(b, lq, -1)
        np.testing.assert_allclose(whole, want, atol=2e-6)
        np.testing.assert_allclose(chunked, whole, atol=2e-6)
