"""Image-restoration and segmentation metrics (numpy, pure functions).

Pixel convention: images are uint8 RGB ``[H, W, 3]`` (0..255); label maps are integer
``[H, W]`` with 255 as "ignore". Fidelity metrics follow the convention of BasicSR and the
Real-ISR papers evaluated with it (SeeSR, StableSR, ...): PSNR and SSIM on the float (unrounded)
Y channel of MATLAB's ``rgb2ycbcr`` after cropping ``crop_border`` pixels from every side.

References:
  * BasicSR ``basicsr/metrics/psnr_ssim.py`` (``calculate_psnr``, ``calculate_ssim``, ``_ssim``)
    and ``basicsr/utils/color_util.py`` (``rgb2ycbcr``, ``y_only=True``).
  * Z. Wang et al., "Image quality assessment: from error visibility to structural
    similarity", IEEE TIP 2004 (SSIM; 11x11 Gaussian window, sigma 1.5, K1 .01, K2 .03).
  * A. Mittal, R. Soundararajan, A. C. Bovik, "Making a 'Completely Blind' Image Quality
    Analyzer", IEEE SPL 2013, and its MATLAB release ``niqe_release.zip`` (NIQE).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage, special

# LPIPS-VGG is a Flax model (``segsr_jax.lpips``); it is reachable from here too, imported
# only when asked for, so that these numpy metrics do not start JAX.
_LPIPS_NAMES = ("LPIPS", "load_lpips", "lpips_from_params")


def __getattr__(name: str):
    if name in _LPIPS_NAMES:
        from segsr_jax import lpips

        return getattr(lpips, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ITU-R BT.601 luma for R, G, B in [0, 1], scaled to the "studio" range [16, 235]: MATLAB's
# rgb2ycbcr, which BasicSR's rgb2ycbcr(y_only=True) reproduces (``img @ [65.481, 128.553,
# 24.966] + 16`` on [0, 1] input; its bgr2ycbcr reverses the order for OpenCV's BGR).
Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0

NIQE_BLOCK = 96  # patch side of the NIQE model (Mittal et al. 2013)
NIQE_SHARPNESS = 0.75  # patches kept when fitting: sharpness > 0.75 * the image's maximum


def rgb_to_y(img_u8: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` -> float64 Y ``[H, W]`` in [16, 235] (MATLAB ``rgb2ycbcr``,
    BT.601, not rounded): ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1]."""
    img = np.asarray(img_u8)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    return img.astype(np.float64) / 255.0 @ Y_WEIGHTS + Y_OFFSET


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool):
    """Both images cropped and converted: float64 ``[h, w, C]`` (C = 1 for Y)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image sizes differ: {a.shape} vs {b.shape}")
    if crop_border < 0 or 2 * crop_border >= min(a.shape[:2]):
        raise ValueError(
            f"crop_border {crop_border} leaves nothing of a {a.shape[1]}x{a.shape[0]} image"
        )
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        return rgb_to_y(a)[..., None], rgb_to_y(b)[..., None]
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a, b) if a.ndim == 3 else (a[..., None], b[..., None])


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """PSNR in dB of two uint8 images ``[H, W, 3]`` with peak 255 (inf when identical).

    ``crop_border`` pixels are removed from each side first; ``y_channel`` scores the float Y
    channel (:func:`rgb_to_y`), otherwise the MSE is over all RGB values (BasicSR's
    ``calculate_psnr``).
    """
    a, b = _prepare(a, b, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(DATA_RANGE**2 / mse))


@functools.cache
def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation of ``[H, W]`` with ``outer(kernel, kernel)``, keeping only the
    outputs whose window lies inside the image (MATLAB ``filter2(..., 'valid')``)."""
    r = len(kernel) // 2
    y = ndimage.correlate1d(x, kernel, axis=0, mode="constant")
    y = ndimage.correlate1d(y, kernel, axis=1, mode="constant")
    return y[r:-r, r:-r]


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    k = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA)
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a**2
    var_b = _filter_valid(b * b, k) - mu_b**2
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """SSIM of two uint8 images ``[H, W, 3]`` as BasicSR's ``calculate_ssim`` (and pyiqa's
    ``ssim``): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255,
    population (1/N) moments, only windows fully inside the (cropped) image ("valid"), the map
    averaged; on the float Y channel, or the mean over R, G and B with ``y_channel=False``."""
    a, b = _prepare(a, b, crop_border, y_channel)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after the "
            f"border crop, got {a.shape[1]}x{a.shape[0]}"
        )
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])]))


# --- Segmentation ------------------------------------------------------------------------


def confusion(
    pred_labels: np.ndarray, true_labels: np.ndarray, num_classes: int, ignore: int = 255
) -> np.ndarray:
    """Confusion matrix ``[K, K]`` (int64; rows: true class, columns: predicted class) of two
    label maps ``[H, W]``, skipping pixels whose true label is ``ignore``.

    Raises:
      ValueError: different shapes, or a label (other than ignored truth) outside [0, K).
    """
    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"label maps differ in size: predicted {pred.shape}, true {true.shape}")
    keep = true != ignore
    pred, true = pred[keep].astype(np.int64), true[keep].astype(np.int64)
    for what, x in (("true", true), ("predicted", pred)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            bad = [int(v) for v in np.unique(x) if not 0 <= v < num_classes]
            raise ValueError(f"{what} labels {bad} are outside [0, {num_classes})")
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """``(mIoU, per-class IoU [K])`` of a confusion matrix (rows true, columns predicted).

    IoU_k = TP / (TP + FP + FN). Classes absent from both truth and prediction (union 0) have
    IoU NaN and are left out of the mean; a class only predicted counts with IoU 0. A dataset's
    mIoU is that of the confusion matrix summed over its images (mmsegmentation's convention).
    """
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = union > 0
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


# --- NIQE --------------------------------------------------------------------------------


@functools.cache
def _niqe_window() -> np.ndarray:
    """MATLAB ``fspecial('gaussian', 7, 7/6)``: the 7x7 window of the MSCN coefficients."""
    g = _gaussian_1d(7, 7 / 6)
    return np.outer(g, g)


@functools.cache
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    """The shape grid 0.2:0.001:10 of the MATLAB release and its ratio
    Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))."""
    alpha = np.arange(0.2, 10.0 + 5e-4, 0.001)
    r = special.gamma(2 / alpha) ** 2 / (special.gamma(1 / alpha) * special.gamma(3 / alpha))
    return alpha, r


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching AGGD fit of each row of ``x [N, M]`` (Mittal et al.'s
    ``estimateaggdparam``): ``(alpha, beta_left, beta_right)``, each ``[N]``; NaN for a row
    with no negative or no positive value."""
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.sum(np.where(x < 0, x * x, 0), 1) / np.sum(x < 0, 1))
        right = np.sqrt(np.sum(np.where(x > 0, x * x, 0), 1) / np.sum(x > 0, 1))
        g = left / right
        rhat = np.mean(np.abs(x), 1) ** 2 / np.mean(x * x, 1)
        rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    grid, ratio = _aggd_table()
    alpha = grid[np.argmin((ratio[None] - rnorm[:, None]) ** 2, axis=1)]
    scale = np.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    return alpha, left * scale, right * scale


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each MSCN block ``[N, b, b]`` -> ``[N, 18]``: the AGGD of the
    coefficients (shape, mean scale), then of their products with the right, lower,
    lower-right and lower-left neighbours (shape, mean, left scale, right scale), neighbours
    taken circularly within the block as MATLAB's ``circshift``."""
    n = blocks.shape[0]
    alpha, bl, br = _aggd(blocks.reshape(n, -1))
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        pair = blocks * np.roll(blocks, shift, axis=(1, 2))
        alpha, bl, br = _aggd(pair.reshape(n, -1))
        mean = (br - bl) * special.gamma(2 / alpha) / special.gamma(1 / alpha)
        feats += [alpha, mean, bl, br]
    return np.stack(feats, 1)


def _imresize_matrix(n_in: int, scale: float) -> np.ndarray:
    """``[n_out, n_in]`` weights of MATLAB ``imresize(..., scale)`` along one axis: bicubic
    (a = -0.5) with antialiasing (kernel stretched by 1/scale when shrinking) and symmetric
    edge padding, so NIQE's second scale matches the MATLAB release."""
    n_out = int(np.ceil(n_in * scale))
    stretch = min(scale, 1.0)
    width = 4.0 / stretch
    u = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    idx = left[:, None] + np.arange(int(np.ceil(width)) + 2)[None]
    d = np.abs(stretch * (u[:, None] - idx))
    cubic = np.where(
        d <= 1,
        1.5 * d**3 - 2.5 * d**2 + 1,
        np.where(d <= 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0.0),
    )
    w = stretch * cubic
    w /= w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.repeat(np.arange(n_out), idx.shape[1]), cols.ravel()), w.ravel())
    return out


def _niqe_features(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, 36], sharpness [N])`` of the 96x96 blocks of a float image ``[H, W]``
    (cropped to whole blocks): 18 features at full and at half resolution; sharpness is the
    block's mean local deviation at full resolution."""
    nh, nw = y.shape[0] // NIQE_BLOCK, y.shape[1] // NIQE_BLOCK
    if nh == 0 or nw == 0:
        raise ValueError(
            f"NIQE needs at least {NIQE_BLOCK}x{NIQE_BLOCK} pixels, got {y.shape[1]}x{y.shape[0]}"
        )
    img = np.asarray(y, np.float64)[: nh * NIQE_BLOCK, : nw * NIQE_BLOCK]
    feats, sharpness = [], None
    for scale in (1, 2):
        # MSCN coefficients (Eq. 1), filtered with edge replication as MATLAB's 'replicate'.
        mu = ndimage.correlate(img, _niqe_window(), mode="nearest")
        sigma = np.sqrt(
            np.abs(ndimage.correlate(img * img, _niqe_window(), mode="nearest") - mu * mu)
        )
        mscn = (img - mu) / (sigma + 1)
        b = NIQE_BLOCK // scale
        blocks = mscn.reshape(nh, b, nw, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
        feats.append(_block_features(blocks))
        if scale == 1:
            sharpness = sigma.reshape(nh, b, nw, b).mean((1, 3)).ravel()
            img = _imresize_matrix(img.shape[0], 0.5) @ img @ _imresize_matrix(img.shape[1], 0.5).T
    return np.concatenate(feats, 1), sharpness


def _nan_mean_cov(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``nanmean`` and MATLAB ``nancov`` (rows with a NaN dropped; zeros below two rows)."""
    mu = np.nanmean(feats, 0)
    rows = feats[~np.isnan(feats).any(1)]
    cov = (
        np.cov(rows, rowvar=False) if len(rows) > 1 else np.zeros((feats.shape[1], feats.shape[1]))
    )
    return mu, cov


def niqe(
    img_u8: np.ndarray, mu_prisparam: np.ndarray, cov_prisparam: np.ndarray, crop_border: int = 0
) -> float:
    """NIQE (lower is better) of a uint8 RGB image ``[H, W, 3]`` against a pristine model.

    As the MATLAB release (``computequality.m``): the image is cut into 96x96 blocks without
    overlap (the remainder dropped), each block described by 18 AGGD features of its MSCN
    coefficients at two scales (the second after MATLAB's bicubic ``imresize(0.5)``), and the
    score is ``sqrt((mu_p - mu_d)^T pinv((C_p + C_d) / 2) (mu_p - mu_d))`` between the
    pristine Gaussian ``(mu_prisparam [36], cov_prisparam [36, 36])`` and the one fitted to
    the image's blocks. The image is scored on its Y channel (:func:`rgb_to_y`, BasicSR's
    ``calculate_niqe`` default; the release uses ``rgb2gray``) after the border crop.
    """
    y = rgb_to_y(img_u8)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    feats, _ = _niqe_features(y)
    mu, cov = _nan_mean_cov(feats)
    d = np.ravel(mu_prisparam) - mu
    return float(np.sqrt(d @ np.linalg.pinv((np.asarray(cov_prisparam) + cov) / 2) @ d))


def fit_niqe_params(
    images: list[np.ndarray], sharpness_threshold: float = NIQE_SHARPNESS
) -> dict[str, np.ndarray]:
    """Fit a pristine NIQE model to uint8 RGB images (the release's ``estimatemodelparam``):
    the blocks of each image sharper than ``sharpness_threshold`` times its sharpest block are
    pooled. Returns ``{"mu_prisparam": [36], "cov_prisparam": [36, 36]}``."""
    pooled = []
    for img in images:
        feats, sharpness = _niqe_features(rgb_to_y(img))
        pooled.append(feats[sharpness > sharpness_threshold * sharpness.max()])
    mu, cov = _nan_mean_cov(np.concatenate(pooled))
    return {"mu_prisparam": mu, "cov_prisparam": cov}
