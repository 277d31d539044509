"""Per-example grain transforms before degradation: min-size filter, HR resize, crop and flips.

Elements are dicts: `"hr"` uint8 [H, W, 3] RGB, optionally `"label"` uint8 [H, W] (255 = ignore),
and an integer `"index"` (the record's position in its source). Every geometric operation is
applied to the image and its label with the same parameters, so they stay pixel-aligned; the
crop size is a multiple of the SR scale, so the LQ made from the crop is aligned too
(LQ pixel (i, j) covers HR pixels (s*i .. s*i+s-1, s*j .. s*j+s-1)).
"""

from __future__ import annotations

import dataclasses

import cv2
import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """Geometric augmentation of one HR example.

    Attributes:
      size: side of the square HR crop; must be a multiple of `scale`.
      scale: the SR factor the crop must stay divisible by.
      resize_range: HR rescale factor drawn uniformly from this range before cropping (None: no
        rescale). Factors that would make the short side smaller than `size` are raised to fit,
        so with a range, images smaller than the crop (down to `min_size`) are enlarged.
      hflip: random horizontal flip (p = 0.5), as SeeSR / Real-ESRGAN.
      rot90: also random vertical flips and transposes (the 8 dihedral symmetries).
      min_size: examples whose short side is below this are dropped (None: `size`).
    """

    size: int = 512
    scale: int = 4
    resize_range: tuple[float, float] | None = None
    hflip: bool = True
    rot90: bool = False
    min_size: int | None = None

    def __post_init__(self):
        if self.size % self.scale:
            raise ValueError(f"crop size {self.size} is not a multiple of scale {self.scale}")
        if self.resize_range is not None and not 0 < self.resize_range[0] <= self.resize_range[1]:
            raise ValueError(f"resize_range must be 0 < low <= high, got {self.resize_range}")


class MinSizeFilter(grain.transforms.Filter):
    """Keeps examples whose short side is at least `min_size` pixels."""

    def __init__(self, min_size: int):
        self.min_size = min_size

    def filter(self, element: dict) -> bool:
        return min(element["hr"].shape[:2]) >= self.min_size


def _rescale(element: dict, factor: float) -> dict:
    h, w = element["hr"].shape[:2]
    size = (max(round(w * factor), 1), max(round(h * factor), 1))
    # Area averaging when shrinking avoids aliasing; bicubic when enlarging keeps edges.
    mode = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    out = {**element, "hr": cv2.resize(element["hr"], size, interpolation=mode)}
    if "label" in element:
        # Labels are categories: nearest neighbour, never a blend of two class ids.
        out["label"] = cv2.resize(element["label"], size, interpolation=cv2.INTER_NEAREST)
    return out


def _apply_geometry(array: np.ndarray, top: int, left: int, size: int, flips: tuple) -> np.ndarray:
    crop = array[top : top + size, left : left + size]
    hflip, vflip, transpose = flips
    if hflip:
        crop = crop[:, ::-1]
    if vflip:
        crop = crop[::-1]
    if transpose:
        crop = crop.swapaxes(0, 1)
    return np.ascontiguousarray(crop)


class RandomCrop(grain.transforms.RandomMap):
    """Optional random HR rescale, then a random square crop and flips, for image and label."""

    def __init__(self, config: CropConfig):
        self.config = config

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        cfg = self.config
        h, w = element["hr"].shape[:2]
        if cfg.resize_range is not None:
            # Raised to the factor that fits the crop, so a small image is enlarged, not refused.
            factor = max(float(rng.uniform(*cfg.resize_range)), cfg.size / min(h, w))
            element = _rescale(element, factor)
            h, w = element["hr"].shape[:2]
        if min(h, w) < cfg.size:
            raise ValueError(
                f"example {element.get('index')} is {h}x{w}, smaller than the crop {cfg.size}; "
                "filter with MinSizeFilter(crop size) or set resize_range"
            )
        top = int(rng.integers(0, h - cfg.size + 1))
        left = int(rng.integers(0, w - cfg.size + 1))
        flips = (
            cfg.hflip and rng.uniform() < 0.5,
            cfg.rot90 and rng.uniform() < 0.5,
            cfg.rot90 and rng.uniform() < 0.5,
        )
        out = {**element, "hr": _apply_geometry(element["hr"], top, left, cfg.size, flips)}
        if "label" in element:
            out["label"] = _apply_geometry(element["label"], top, left, cfg.size, flips)
        return out
