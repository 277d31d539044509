"""Real-ESRGAN degradation: kernels against closed forms, drawn ranges, noise statistics, JPEG,
determinism, output size and HR/LQ alignment."""

import collections
import dataclasses
import math

import cv2
import numpy as np
import pytest
from scipy import special, stats

from segsr_jax.data import degradations as D


def _hr(rng, h=64, w=64):
    """A smooth-ish random RGB image (noise alone would be destroyed by any blur)."""
    coarse = rng.integers(0, 256, (h // 8, w // 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(
        np.uint8
    )


@pytest.mark.parametrize("size,sigma", [(7, 0.5), (13, 1.7), (21, 3.0)])
def test_isotropic_gaussian_is_outer_product_of_opencv_kernel(size, sigma):
    g = cv2.getGaussianKernel(size, sigma, ktype=cv2.CV_64F)
    kernel = D.make_kernel(D.KernelSpec("iso", size, sigma, sigma))
    np.testing.assert_allclose(kernel, g @ g.T, atol=1e-7)


def _closed_form(spec):
    """Independent formulas: scipy's multivariate normal density and its powers."""
    c, s = math.cos(spec.theta), math.sin(spec.theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([spec.sigma_x**2, spec.sigma_y**2]) @ rot.T
    ax = np.arange(spec.size) - spec.size // 2
    pts = np.stack(np.meshgrid(ax, ax), -1)  # (x, y) with x along columns
    q = np.einsum("...i,ij,...j->...", pts, np.linalg.inv(cov), pts)
    if spec.kind.startswith("generalized"):
        k = np.exp(-0.5 * q**spec.beta)
    elif spec.kind.startswith("plateau"):
        k = 1 / (1 + q**spec.beta)
    else:
        k = stats.multivariate_normal(mean=[0, 0], cov=cov).pdf(pts)
    return k / k.sum()


def test_kernels_sum_to_one_are_symmetric_and_match_closed_forms():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        spec = D.sample_kernel_spec(rng, D.FIRST_ORDER.kernel)
        seen.add(spec.kind)
        k = D.make_kernel(spec)
        assert k.shape == (spec.size, spec.size) and k.dtype == np.float32
        assert abs(k.sum() - 1) < 1e-5
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # point symmetric: no shift
        if spec.kind != "sinc":
            np.testing.assert_allclose(k, _closed_form(spec), atol=1e-6)
    assert seen == set(D.KERNEL_KINDS) | {"sinc"}


def test_anisotropic_kernel_is_elongated_along_theta():
    k = D.make_kernel(D.KernelSpec("aniso", 21, 3.0, 0.5, theta=0.0))
    assert k[10, 10 + 5] > 100 * k[10 + 5, 10]  # wide along x (columns), thin along y
    k90 = D.make_kernel(D.KernelSpec("aniso", 21, 3.0, 0.5, theta=np.pi / 2))
    np.testing.assert_allclose(k90, k.T, atol=1e-7)


def test_sinc_kernel_matches_bessel_closed_form():
    size, cutoff = 15, 1.3
    k = D.sinc_kernel(size, cutoff)
    r = np.hypot(*np.meshgrid(np.arange(size) - 7.0, np.arange(size) - 7.0))
    expected = np.where(
        r == 0,
        cutoff**2 / (4 * np.pi),
        cutoff * special.j1(cutoff * np.maximum(r, 1e-9)) / (2 * np.pi * np.maximum(r, 1e-9)),
    )
    np.testing.assert_allclose(k, expected / expected.sum(), atol=1e-7)
    assert abs(k.sum() - 1) < 1e-5 and k.min() < 0  # a true sinc rings (negative lobes)


@pytest.mark.parametrize("stage", [D.FIRST_ORDER, D.SECOND_ORDER], ids=["first", "second"])
def test_sampled_kernel_parameters_honour_ranges_and_probabilities(stage):
    cfg = stage.kernel
    rng = np.random.default_rng(1)
    specs = [D.sample_kernel_spec(rng, cfg) for _ in range(3000)]
    assert {s.size for s in specs} == set(cfg.sizes)
    kinds = collections.Counter(s.kind for s in specs)
    assert abs(kinds["sinc"] / len(specs) - cfg.sinc_prob) < 0.02
    others = len(specs) - kinds["sinc"]
    for kind, p in zip(cfg.kinds, cfg.probs, strict=True):
        assert abs(kinds[kind] / others - p) < 0.03, kind
    for s in specs:
        if s.kind == "sinc":
            low = np.pi / 3 if s.size < 13 else np.pi / 5
            assert low <= s.cutoff <= np.pi
            continue
        assert (
            cfg.sigma[0] <= s.sigma_x <= cfg.sigma[1] and cfg.sigma[0] <= s.sigma_y <= cfg.sigma[1]
        )
        if s.kind.endswith("iso") and not s.kind.endswith("aniso"):
            assert s.sigma_x == s.sigma_y and s.theta == 0
        if s.kind.startswith("generalized"):
            assert cfg.beta_generalized[0] <= s.beta <= cfg.beta_generalized[1]
        if s.kind.startswith("plateau"):
            assert cfg.beta_plateau[0] <= s.beta <= cfg.beta_plateau[1]
    sigmas = [s.sigma_x for s in specs if s.kind != "sinc"]
    assert min(sigmas) < cfg.sigma[0] + 0.1 and max(sigmas) > cfg.sigma[1] - 0.1  # whole range used


def test_separable_blur_equals_dense_filter():
    rng = np.random.default_rng(2)
    image = rng.random((40, 48, 3), dtype=np.float32)
    for _ in range(60):
        k = D.make_kernel(D.sample_kernel_spec(rng, D.FIRST_ORDER.kernel))
        dense = cv2.filter2D(image, -1, k, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(D.blur(image, k), dense, atol=5e-5)


def test_jpeg_file_size_grows_and_error_shrinks_with_quality():
    image = _hr(np.random.default_rng(3), 96, 96).astype(np.float32) / 255
    image += np.random.default_rng(4).normal(0, 0.03, image.shape).astype(np.float32)  # detail
    qualities = [20, 40, 60, 80, 95]
    sizes = [len(D.encode_jpeg(image, q)) for q in qualities]
    errors = [np.abs(D.jpeg(image, q) - np.clip(image, 0, 1)).mean() for q in qualities]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("gray", [False, True])
def test_gaussian_noise_statistics(gray):
    image = np.full((200, 200, 3), 0.5, np.float32)
    out = D.add_gaussian_noise(image, np.random.default_rng(5), sigma=20.0, gray=gray)
    noise = (out - image) * 255
    assert abs(noise.mean()) < 0.3
    assert abs(noise.std() - 20.0) < 0.5
    corr = np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]
    assert corr > 0.999 if gray else abs(corr) < 0.02


@pytest.mark.parametrize("gray", [False, True])
def test_poisson_noise_statistics(gray):
    # 256 grey levels (so vals = 256) in 16-row bands. On an exactly quantised image with
    # scale 1, out = counts / vals with counts ~ Poisson(q * vals): mean q, variance q / vals,
    # both below and above the exact/normal-approximation threshold, and nothing clips.
    levels = np.repeat(np.arange(256, dtype=np.float32), 16 * 64).reshape(256 * 16, 64)
    image = np.repeat(levels[..., None] / 255, 3, axis=-1)
    for scale, checked in ((1.0, (3, 20, 60, 128, 200)), (2.5, (128,))):
        out = D.add_poisson_noise(image, np.random.default_rng(6), scale=scale, gray=gray)
        noise = ((out - image) / scale)[..., 0].reshape(256, -1)
        for level in checked:
            q, n = level / 255, noise[level]
            assert abs(n.mean()) < 4 * math.sqrt(q / 256 / n.size), (scale, level)
            assert abs(n.var() / (q / 256) - 1) < 0.15, (scale, level)
    if gray:  # one noise plane for all channels
        np.testing.assert_allclose(
            out[..., 0] - image[..., 0], out[..., 2] - image[..., 2], atol=1e-6
        )


def test_same_seed_same_lq_different_seed_different_lq():
    hr = _hr(np.random.default_rng(7))
    a = D.degrade(hr, np.random.default_rng(11))
    b = D.degrade(hr, np.random.default_rng(11))
    c = D.degrade(hr, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "shape,scale", [((64, 64), 4), ((48, 80), 4), ((30, 42), 2), ((32, 32), 1)]
)
def test_output_size_is_hr_over_scale(shape, scale):
    hr = _hr(np.random.default_rng(8), 64, 80)[: shape[0], : shape[1]]
    cfg = D.DegradationConfig(scale=scale)
    for seed in range(8):
        lq = D.degrade(np.ascontiguousarray(hr), np.random.default_rng(seed), cfg)
        assert lq.shape == (shape[0] // scale, shape[1] // scale, 3) and lq.dtype == np.uint8


def test_rejects_sizes_that_do_not_divide_and_non_uint8():
    with pytest.raises(ValueError, match="multiple of scale"):
        D.degrade(np.zeros((30, 32, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        D.degrade(np.zeros((32, 32, 3), np.float32), np.random.default_rng(0))


def test_lq_stays_aligned_with_hr():
    # A bright disc on a dark ground: its centroid in LQ pixels must sit at the HR centroid
    # mapped through the half-pixel convention, (c + 0.5) / s - 0.5. Noise is switched off so
    # the centroid is not dragged by clipped noise in the background; blur, resize and JPEG stay
    # random (blur kernels are point-symmetric, resizes centre-aligned).
    quiet = dict(gaussian_noise_prob=1.0, noise_sigma=(0.0, 0.0))
    cfg = D.DegradationConfig(
        first=dataclasses.replace(D.FIRST_ORDER, **quiet),
        second=dataclasses.replace(D.SECOND_ORDER, **quiet),
    )
    yy, xx = np.mgrid[0:128, 0:128]
    disc = ((yy - 50.5) ** 2 + (xx - 77.5) ** 2 < 14**2).astype(np.uint8) * 200 + 20
    hr = np.repeat(disc[..., None], 3, axis=-1).astype(np.uint8)
    for seed in range(10):
        lq = D.degrade(hr, np.random.default_rng(seed), cfg)[..., 1].astype(np.float64)
        weight = np.clip(lq - np.median(lq), 0, None)
        ly, lx = np.mgrid[0 : lq.shape[0], 0 : lq.shape[1]]
        cy, cx = (weight * ly).sum() / weight.sum(), (weight * lx).sum() / weight.sum()
        assert (
            abs(cy - (50.5 + 0.5) / 4 + 0.5) < 0.35 and abs(cx - (77.5 + 0.5) / 4 + 0.5) < 0.35
        ), seed


def test_degrade_transform_adds_lq_and_keeps_the_rest():
    hr = _hr(np.random.default_rng(9))
    label = np.zeros(hr.shape[:2], np.uint8)
    element = {"hr": hr, "label": label, "index": 3}
    out = D.Degrade().random_map(element, np.random.default_rng(0))
    assert out["hr"] is hr and out["label"] is label and out["index"] == 3
    np.testing.assert_array_equal(out["lq"], D.degrade(hr, np.random.default_rng(0)))
