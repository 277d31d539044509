"""Colour fixes: parity with StableSR's formulas (written out in torch here) and their
defining properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segsr_jax.diffusion import color_fix as cf
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, torch

F = torch.nn.functional


def _torch_adain(content, style, eps=1e-5):
    """StableSR's adaptive_instance_normalization on NCHW tensors."""

    def mean_std(x):
        b, c = x.shape[:2]
        var = x.reshape(b, c, -1).var(dim=2) + eps
        return x.reshape(b, c, -1).mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)

    cm, cs = mean_std(content)
    sm, ss = mean_std(style)
    return (content - cm) / cs * ss + sm


def _torch_wavelet(content, style, levels=5):
    """StableSR's wavelet_reconstruction on NCHW tensors."""
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    kernel = kernel[None, None].repeat(content.shape[1], 1, 1, 1)

    def decompose(x):
        high = torch.zeros_like(x)
        for i in range(levels):
            r = 2**i
            low = F.conv2d(
                F.pad(x, (r, r, r, r), mode="replicate"), kernel, groups=x.shape[1], dilation=r
            )
            high += x - low
            x = low
        return high, low

    return decompose(content)[0] + decompose(style)[1]


def _images(np_rng, shape=(2, 40, 36, 3)):
    sr = np_rng.uniform(0, 1, shape).astype(np.float32)
    ref = np.clip(0.6 * sr + 0.3 + 0.05 * np_rng.standard_normal(shape), 0, 1).astype(np.float32)
    return sr, ref


def test_adain_matches_stablesr(np_rng):
    sr, ref = _images(np_rng)
    want = nchw_to_nhwc(_torch_adain(nhwc_to_nchw(sr), nhwc_to_nchw(ref)))
    assert_close_rel(cf.adain(jnp.asarray(sr), jnp.asarray(ref)), want, tol=1e-5)


def test_adain_imposes_ref_statistics(np_rng):
    sr, _ = _images(np_rng)
    ref = np_rng.uniform(0.2, 0.5, (2, 17, 23, 3)).astype(np.float32)  # any spatial size
    out = np.asarray(cf.adain(jnp.asarray(sr), jnp.asarray(ref)), np.float64)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), ref.mean(axis=(1, 2)), atol=1e-5)
    # Equal up to the 1e-5 variance epsilon (var ~ 0.01 here: ~1e-3 relative).
    np.testing.assert_allclose(
        out.std(axis=(1, 2), ddof=1), ref.std(axis=(1, 2), ddof=1), rtol=2e-3
    )


def test_wavelet_matches_stablesr(np_rng):
    sr, ref = _images(np_rng)
    want = nchw_to_nhwc(_torch_wavelet(nhwc_to_nchw(sr), nhwc_to_nchw(ref)))
    assert_close_rel(cf.wavelet(jnp.asarray(sr), jnp.asarray(ref)), want, tol=1e-5)


def test_wavelet_takes_low_from_ref_and_high_from_sr(np_rng):
    ref = np_rng.uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
    # A pure colour cast (constant per channel) lives entirely in the low band: removed exactly.
    cast = ref + np.array([0.2, -0.1, 0.05], np.float32)
    np.testing.assert_allclose(
        np.asarray(cf.wavelet(jnp.asarray(cast), jnp.asarray(ref))), ref, atol=1e-5
    )

    # sr = a smooth, colour-shifted ref plus fine detail: the output keeps sr's detail (high
    # band) and ref's colours (low band), each within a bound set by how far the blur stack is
    # from an ideal band split (measured 0.022). Returning sr or ref unchanged would miss by
    # ~0.3 (the colour shift) or ~0.4 (the detail).
    yy, xx = np.mgrid[0:48, 0:48] / 48.0
    smooth_ref = np.stack([yy, xx, 0.5 * (yy + xx)], -1)[None].astype(np.float32)
    detail = 0.1 * np_rng.standard_normal((1, 48, 48, 3)).astype(np.float32)
    sr = 0.8 * smooth_ref + 0.15 + detail
    out = cf.wavelet(jnp.asarray(sr), jnp.asarray(smooth_ref))
    high_out, low_out = cf.wavelet_decompose(out)
    high_sr, _ = cf.wavelet_decompose(jnp.asarray(sr))
    _, low_ref = cf.wavelet_decompose(jnp.asarray(smooth_ref))
    low_err = float(jnp.abs(low_out - low_ref).max())
    high_err = float(jnp.abs(high_out - high_sr).max())
    assert low_err < 0.05 and high_err < 0.05, (low_err, high_err)
    # ... while the colour shift of sr is gone: mean error to ref drops by > 10x.
    before = np.abs((sr - smooth_ref).mean(axis=(1, 2))).max()
    after = np.abs((np.asarray(out) - smooth_ref).mean(axis=(1, 2))).max()
    assert after < before / 10, (before, after)


def test_wavelet_decompose_sums_back(np_rng):
    x = jnp.asarray(np_rng.standard_normal((1, 20, 30, 2)).astype(np.float32))
    high, low = cf.wavelet_decompose(x)
    np.testing.assert_allclose(np.asarray(high + low), np.asarray(x), atol=1e-5)


def test_color_fix_dispatch_jit_and_dtype(np_rng):
    sr, ref = _images(np_rng, (1, 16, 16, 3))
    sr_j, ref_j = jnp.asarray(sr), jnp.asarray(ref)
    assert cf.color_fix("none", sr_j, ref_j) is sr_j
    fix = jax.jit(cf.color_fix, static_argnums=0)
    for name, fn in [("adain", cf.adain), ("wavelet", cf.wavelet)]:
        np.testing.assert_allclose(
            np.asarray(fix(name, sr_j, ref_j)), np.asarray(fn(sr_j, ref_j)), atol=1e-6
        )
        out = fix(name, sr_j.astype(jnp.bfloat16), ref_j.astype(jnp.bfloat16))
        assert out.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown colour fix 'histogram'"):
        cf.color_fix("histogram", sr_j, ref_j)
    with pytest.raises(ValueError, match="resize the LQ reference"):
        cf.wavelet(sr_j, ref_j[:, :8])


@functools.partial(jax.jit, static_argnums=1)
def _blur(x, radius):
    return cf.wavelet_blur(x, radius)


def test_wavelet_blur_preserves_constants_and_mean(np_rng):
    const = jnp.full((1, 9, 11, 3), 0.37)
    np.testing.assert_allclose(np.asarray(_blur(const, 4)), 0.37, atol=1e-6)
    x = jnp.asarray(np_rng.standard_normal((1, 32, 32, 1)).astype(np.float32))
    assert float(jnp.var(_blur(x, 1))) < 0.3 * float(jnp.var(x))  # it does smooth
