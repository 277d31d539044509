"""Real-ESRGAN second-order degradation (numpy + OpenCV), with SeeSR's parameters (the ones
SeeSR trains with, so that a converted SD-2 SRDM sees the degradations it is meant for).

An HR crop (uint8 [H, W, 3], RGB) becomes an LQ image (uint8 [H/s, W/s, 3]) through two rounds of
blur -> random resize -> Gaussian or Poisson noise -> JPEG, then a final resize to exactly HR/s
combined with a sinc filter and a last JPEG in random order. Every random draw comes from one
explicit `np.random.Generator`, so the same generator state gives the same LQ, bit for bit.

Pixel range inside the pipeline: float32 in [0, 1]. Filters are correlations with reflect-101
borders (the same as BasicSR's `filter2D`); resizes use OpenCV's area / bilinear / bicubic, whose
half-pixel-centre convention keeps LQ pixel (i, j) centred on HR block (s*i .. s*i+s-1, ...).

Where this differs from BasicSR, on purpose:
- Poisson counts with a mean of `_POISSON_EXACT_BELOW` or more are drawn from the normal
  approximation N(lam, lam), rounded; smaller ones exactly. numpy's exact sampler costs ~40 ns a
  sample, which would double the cost of the Poisson branch; the approximation has the same
  mean and variance (tested), and its skewness 1/sqrt(lam) is below 0.18 where it is used.
- The second-order kernel size is drawn from 7..11 (DESIGN's "second 11"); SeeSR's code draws
  both from 7..21. It is the `sizes` field of `SECOND_ORDER.kernel`.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import grain
import numpy as np
from scipy import special

KERNEL_KINDS = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
_RESIZE_MODES = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC)
_POISSON_EXACT_BELOW = 32.0
_SEPARABLE_TOL = 1e-4
_GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)  # ITU-R 601, as torchvision


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How one blur kernel is drawn. Sizes are odd; ranges are closed [low, high]."""

    sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kinds: tuple[str, ...] = KERNEL_KINDS
    probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma: tuple[float, float] = (0.2, 3.0)
    beta_generalized: tuple[float, float] = (0.5, 4.0)
    beta_plateau: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One blur -> resize -> noise -> JPEG round. resize_probs are (up, down, keep)."""

    kernel: KernelConfig = KernelConfig()
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 30.0)  # in 0..255 units
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[float, float] = (30.0, 95.0)


FIRST_ORDER = StageConfig()
SECOND_ORDER = StageConfig(
    kernel=KernelConfig(sizes=(7, 9, 11), sigma=(0.2, 1.5)),
    blur_prob=0.8,
    resize_probs=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_sigma=(1.0, 25.0),
    poisson_scale=(0.05, 2.5),
)


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    """The whole second-order pipeline; `scale` is the HR/LQ size ratio."""

    scale: int = 4
    first: StageConfig = FIRST_ORDER
    second: StageConfig = SECOND_ORDER
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """The drawn parameters of one kernel; `make_kernel` turns it into weights."""

    kind: str
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    cutoff: float = 0.0  # sinc only: angular cut-off frequency omega_c


# --------------------------------------------------------------------------- kernels


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on the centred [size, size] grid, Sigma = R diag(sx^2, sy^2) R^T."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    x, y = np.meshgrid(ax, ax)  # x varies along columns, y along rows
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # coordinates in the rotated (principal) frame
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel [size, size], float32, sums to 1.

    k(r) = cutoff * J1(cutoff * r) / (2 pi r), with the r = 0 limit cutoff^2 / (4 pi).
    """
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    r = np.hypot(*np.meshgrid(ax, ax))
    safe_r = np.where(r == 0, 1.0, r)
    kernel = np.where(
        r == 0, cutoff**2 / (4 * np.pi), cutoff * special.j1(cutoff * safe_r) / (2 * np.pi * safe_r)
    )
    return (kernel / kernel.sum()).astype(np.float32)


def make_kernel(spec: KernelSpec) -> np.ndarray:
    """Kernel weights [size, size], float32, summing to 1, for a drawn `KernelSpec`.

    Gaussian: exp(-q / 2); generalised: exp(-q^beta / 2); plateau: 1 / (1 + q^beta), where q is
    the quadratic form x^T Sigma^-1 x.
    """
    if spec.kind == "sinc":
        return sinc_kernel(spec.size, spec.cutoff)
    q = _quadratic_form(spec.size, spec.sigma_x, spec.sigma_y, spec.theta)
    family = spec.kind.rsplit("_", 1)[0]
    if family in ("iso", "aniso"):
        kernel = np.exp(-0.5 * q)
    elif family == "generalized":
        kernel = np.exp(-0.5 * q**spec.beta)
    elif family == "plateau":
        kernel = 1.0 / (1.0 + q**spec.beta)
    else:
        raise ValueError(
            f"unknown kernel kind {spec.kind!r}; expected one of {KERNEL_KINDS} or 'sinc'"
        )
    return (kernel / kernel.sum()).astype(np.float32)


def _draw_beta(rng: np.random.Generator, low: float, high: float) -> float:
    # As BasicSR: half the draws from [low, 1], half from [1, high]. For the plateau range
    # [1, 2] the first half is exactly 1.
    if rng.uniform() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(1.0, high))


def sample_kernel_spec(rng: np.random.Generator, cfg: KernelConfig) -> KernelSpec:
    """Draws one blur kernel's kind and parameters (sinc with probability `cfg.sinc_prob`)."""
    size = int(rng.choice(cfg.sizes))
    if rng.uniform() < cfg.sinc_prob:
        # Large kernels may use a lower cut-off: they have room for the wider ringing.
        low = np.pi / 3 if size < 13 else np.pi / 5
        return KernelSpec("sinc", size, cutoff=float(rng.uniform(low, np.pi)))
    kind = str(rng.choice(cfg.kinds, p=cfg.probs))
    sigma_x = float(rng.uniform(*cfg.sigma))
    if kind.endswith("_iso") or kind == "iso":
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = float(rng.uniform(*cfg.sigma)), float(rng.uniform(-np.pi, np.pi))
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _draw_beta(rng, *cfg.beta_generalized)
    elif kind.startswith("plateau"):
        beta = _draw_beta(rng, *cfg.beta_plateau)
    return KernelSpec(kind, size, sigma_x, sigma_y, theta, beta)


# --------------------------------------------------------------------------- image operations


def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlates float32 [H, W, C] with a [k, k] kernel, reflect-101 borders.

    A kernel of low rank r (every isotropic Gaussian has r = 1) runs as r separable passes:
    3r <= k passes cost less than OpenCV's dense filter (which switches to a DFT from k = 13
    on). The rank drops only singular values whose sum of effects on any output pixel is at
    most `_SEPARABLE_TOL` (1/40 of an 8-bit level), so both paths agree to that tolerance.
    """
    u, s, vt = np.linalg.svd(kernel.astype(np.float64))
    size = kernel.shape[0]
    # max |K - K_r| summed over taps <= size * ||K - K_r||_F = size * sqrt(sum of dropped s^2)
    tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1])
    rank = int(np.count_nonzero(size * tail > _SEPARABLE_TOL))
    if 3 * rank > size:
        return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    out = None
    for i in range(rank):
        col = (u[:, i] * s[i]).astype(np.float32)
        row = vt[i].astype(np.float32)
        part = cv2.sepFilter2D(image, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
        out = part if out is None else cv2.add(out, part)
    return out


def resize(image: np.ndarray, height: int, width: int, mode: int) -> np.ndarray:
    """Resizes float32 [H, W, 3] to [height, width, 3] with an OpenCV interpolation flag."""
    return cv2.resize(image, (max(width, 1), max(height, 1)), interpolation=mode)


def add_gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool
) -> np.ndarray:
    """image + N(0, (sigma/255)^2), one noise plane shared by all channels if `gray`; clipped."""
    h, w, c = image.shape
    noise = rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32)
    return np.clip(image + noise * np.float32(sigma / 255.0), 0.0, 1.0)


def _poisson_counts(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    z = rng.standard_normal(lam.shape, dtype=np.float32)
    counts = np.maximum(np.rint(lam + np.sqrt(lam) * z), 0.0)
    dark = lam < _POISSON_EXACT_BELOW
    counts[dark] = rng.poisson(lam[dark])
    return counts


def add_poisson_noise(
    image: np.ndarray, rng: np.random.Generator, scale: float, gray: bool
) -> np.ndarray:
    """Shot noise as Real-ESRGAN: counts ~ Poisson(q * vals) on the 8-bit-quantised image q.

    `vals` is the number of distinct 8-bit levels rounded up to a power of two; the noise
    `(counts / vals - q) * scale` is added to the unquantised image, then clipped to [0, 1].
    """
    src = image @ _GRAY_WEIGHTS if gray else image  # [H, W] or [H, W, 3]
    levels = np.clip(np.rint(src * 255.0), 0, 255).astype(np.uint8)
    vals = 2.0 ** math.ceil(
        math.log2(max(np.count_nonzero(np.bincount(levels.ravel(), minlength=256)), 1))
    )
    q = levels.astype(np.float32) / np.float32(255.0)
    noise = _poisson_counts(q * np.float32(vals), rng) / np.float32(vals) - q
    if gray:
        noise = noise[..., None]
    return np.clip(image + noise * np.float32(scale), 0.0, 1.0)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG file bytes (4:2:0, OpenCV/libjpeg) of float32 RGB [H, W, 3] in [0, 1]."""
    rgb8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", rgb8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode an image of shape {image.shape}")
    return encoded.tobytes()


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of float32 RGB [H, W, 3] in [0, 1]; returns float32 [H, W, 3]."""
    encoded = np.frombuffer(encode_jpeg(image, quality), np.uint8)
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]  # OpenCV speaks BGR
    return decoded.astype(np.float32) * np.float32(1 / 255.0)


# --------------------------------------------------------------------------- the pipeline


def _draw_resize_scale(rng: np.random.Generator, stage: StageConfig) -> float:
    direction = rng.choice(3, p=stage.resize_probs)  # 0 up, 1 down, 2 keep
    if direction == 0:
        return float(rng.uniform(1.0, stage.resize_range[1]))
    if direction == 1:
        return float(rng.uniform(stage.resize_range[0], 1.0))
    return 1.0


def _noise_and_jpeg_quality(image, rng, stage: StageConfig):
    if rng.uniform() < stage.gaussian_noise_prob:
        sigma = rng.uniform(*stage.noise_sigma)
        image = add_gaussian_noise(image, rng, sigma, gray=rng.uniform() < stage.gray_noise_prob)
    else:
        scale = rng.uniform(*stage.poisson_scale)
        image = add_poisson_noise(image, rng, scale, gray=rng.uniform() < stage.gray_noise_prob)
    return image, int(round(rng.uniform(*stage.jpeg_quality)))


def degrade(
    hr: np.ndarray, rng: np.random.Generator, config: DegradationConfig = DegradationConfig()
) -> np.ndarray:
    """Makes the LQ image of one HR crop.

    Args:
      hr: uint8 [H, W, 3] RGB; H and W must be multiples of `config.scale`.
      rng: the generator every random choice is drawn from.
      config: pipeline parameters.
    Returns:
      uint8 [H / scale, W / scale, 3].
    """
    h, w = hr.shape[:2]
    if hr.ndim != 3 or hr.shape[2] != 3 or hr.dtype != np.uint8:
        raise ValueError(f"degrade expects uint8 [H, W, 3], got {hr.dtype} {hr.shape}")
    if h % config.scale or w % config.scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of scale {config.scale}")
    out_h, out_w = h // config.scale, w // config.scale
    image = hr.astype(np.float32) * np.float32(1 / 255.0)

    # First order: blur, resize by a random factor of the HR size, noise, JPEG.
    first = config.first
    image = blur(image, make_kernel(sample_kernel_spec(rng, first.kernel)))
    s = _draw_resize_scale(rng, first)
    image = resize(image, int(h * s), int(w * s), _RESIZE_MODES[rng.integers(3)])
    image, quality = _noise_and_jpeg_quality(image, rng, first)
    image = jpeg(image, quality)

    # Second order: the same, with the resize relative to the LQ size.
    second = config.second
    if rng.uniform() < second.blur_prob:
        image = blur(image, make_kernel(sample_kernel_spec(rng, second.kernel)))
    s = _draw_resize_scale(rng, second)
    image = resize(image, int(out_h * s), int(out_w * s), _RESIZE_MODES[rng.integers(3)])
    image, quality = _noise_and_jpeg_quality(image, rng, second)

    # Final: [resize to LQ size + sinc] and JPEG, in random order (other orders make twisted lines).
    sinc = None
    if rng.uniform() < config.final_sinc_prob:
        size = int(rng.choice(config.final_sinc_sizes))
        sinc = sinc_kernel(size, float(rng.uniform(np.pi / 3, np.pi)))
    mode = _RESIZE_MODES[rng.integers(3)]
    jpeg_first = rng.uniform() >= 0.5
    if jpeg_first:
        image = jpeg(image, quality)
    image = resize(image, out_h, out_w, mode)
    if sinc is not None:
        image = blur(image, sinc)
    if not jpeg_first:
        image = jpeg(image, quality)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class Degrade(grain.transforms.RandomMap):
    """grain transform: adds `"lq"` (uint8 [H/s, W/s, 3]) made from the element's `"hr"`."""

    def __init__(self, config: DegradationConfig = DegradationConfig()):
        self.config = config

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, "lq": degrade(element["hr"], rng, self.config)}
