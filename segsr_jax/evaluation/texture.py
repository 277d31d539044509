"""Which texture an image shows, window by window, without a learned segmenter.

For the aliased-texture benchmark (:mod:`segsr_jax.data.aliased`): every class is a two-level
pattern of period 4 px, and they differ only in where their energy lies in frequency. In each
8 x 8 window of an image's luma, the high-pass ``Y - box4(Y)`` (the 4 x 4 mean removes exactly
a period-4 pattern's own average) is projected on the period-4 waves along x, along y and along
both diagonals; the share of the window's high-pass power each one holds decides::

    share along y > 0.3        horizontal stripes (a 2/2 square wave keeps 1/2 of its power
    share along x > 0.3        vertical stripes    in its fundamental)
    share on the diagonals > 0.3   diagonal stripes
    none, power above the floor    grain (random 2 x 2 blocks spread their power)
    power below the floor          flat (no texture: bicubic's output, a blurred SR)

Only windows that lie inside one labelled region are scored. Phase does not matter (powers),
period and orientation do: a generated stripe of the wrong period or direction is wrong.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from segsr_jax.metrics import rgb_to_y

WINDOW = 8
SHARE = 0.3
FLAT_POWER = 100.0  # high-pass power (levels^2) below which a window shows no texture
FLAT = -1


def window_classes(image: np.ndarray) -> np.ndarray:
    """Texture class of every ``WINDOW`` x ``WINDOW`` window of a uint8 ``[H, W, 3]`` image:
    int ``[H / 8, W / 8]``, 0-3 as :data:`segsr_jax.data.aliased.CLASS_NAMES`, -1 flat."""
    y = rgb_to_y(image).astype(np.float64)
    hf = y - uniform_filter(y, size=4, mode="reflect")
    nh, nw = y.shape[0] // WINDOW, y.shape[1] // WINDOW
    hf = hf[: nh * WINDOW, : nw * WINDOW]
    win = hf.reshape(nh, WINDOW, nw, WINDOW).transpose(0, 2, 1, 3)  # [nh, nw, 8, 8]
    r, c = np.mgrid[0:WINDOW, 0:WINDOW]

    def power(phase):  # |mean(hf * e^{-i phase})|^2 per window
        wave = np.exp(-1j * phase)
        return np.abs((win * wave).mean(axis=(2, 3))) ** 2

    total = (win**2).mean(axis=(2, 3))
    safe = np.maximum(total, 1e-9)
    along_y = power(np.pi / 2 * r) / safe
    along_x = power(np.pi / 2 * c) / safe
    diagonal = (power(np.pi / 2 * (r + c)) + power(np.pi / 2 * (r - c))) / safe
    shares = np.stack([along_y, along_x, diagonal], -1)
    out = np.where(shares.max(-1) > SHARE, shares.argmax(-1), 3)
    return np.where(total < FLAT_POWER, FLAT, out).astype(np.int64)


def window_labels(label: np.ndarray) -> np.ndarray:
    """The class of every window that lies inside one region, else 255: int ``[H/8, W/8]``."""
    nh, nw = label.shape[0] // WINDOW, label.shape[1] // WINDOW
    win = label[: nh * WINDOW, : nw * WINDOW].reshape(nh, WINDOW, nw, WINDOW)
    lo, hi = win.min(axis=(1, 3)), win.max(axis=(1, 3))
    return np.where(lo == hi, lo, 255).astype(np.int64)


def texture_confusion(image: np.ndarray, label: np.ndarray, num_classes: int = 4) -> np.ndarray:
    """``[K, K + 1]`` window counts: rows the true class, columns the texture found (the last
    column: flat)."""
    found, truth = window_classes(image), window_labels(label)
    keep = truth != 255
    cols = np.where(found[keep] == FLAT, num_classes, found[keep])
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    np.add.at(conf, (truth[keep], cols), 1)
    return conf


def texture_accuracy(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """``(share of windows with the right texture, per-class share [K])`` of a confusion."""
    k = conf.shape[0]
    per_class = np.diag(conf[:, :k]) / np.maximum(conf.sum(1), 1)
    return float(np.trace(conf[:, :k]) / max(conf.sum(), 1)), per_class
