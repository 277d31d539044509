"""Synthetic labelled scenes: K texture classes composed into random region layouts.

Tests and the bundled demo need (HR, label) pairs that exist offline, with true labels, where
the class decides how a region must be restored: brick must come back as brick courses, grass as
blades, text as glyphs, sky as smooth gradient. Each class is one distinct texture, cut from the
photographs and grey textures shipped inside scikit-image (no download) or drawn procedurally;
a scene is a domain-warped Voronoi partition (organic, blob-like region boundaries) whose cells
are filled with the textures of randomly chosen classes.

Everything is a pure function of (seed, index): the same call gives the same bytes everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import cv2
import numpy as np
from skimage import data as skdata


def _tint(gray: np.ndarray, dark: tuple, light: tuple) -> np.ndarray:
    """Maps a grey texture [H, W] onto the colour ramp dark -> light: uint8 [H, W, 3]."""
    t = gray.astype(np.float32)[..., None] / 255.0
    rgb = np.asarray(dark, np.float32) * (1 - t) + np.asarray(light, np.float32) * t
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1] of `shape`: `cells` random values per side, bicubic."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _procedural(name: str) -> np.ndarray:
    """The procedural textures, uint8 [256, 256, 3], from a fixed generator."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    if name == "stripes":  # diagonal two-colour stripes, period ~11 px
        g = 0.5 + 0.5 * np.sin((x * 0.8 + y * 0.6) * 2 * np.pi / 11)
        return _tint(g * 255, (30, 40, 120), (235, 220, 90))
    if name == "checker":  # 16 px checkerboard
        g = ((x // 16 + y // 16) % 2) * 255
        return _tint(g, (20, 20, 20), (240, 240, 240))
    if name == "dots":  # regular polka dots on a plain ground
        d = np.hypot((x % 24) - 12, (y % 24) - 12)
        return _tint((d > 6) * 255.0, (200, 30, 60), (250, 235, 215))
    if name == "sky":  # smooth vertical gradient with faint large-scale variation
        g = 255 * (y / 255.0) + 12 * _smooth_noise(rng, (256, 256), 4)
        return _tint(g, (40, 90, 200), (170, 210, 250))
    if name == "clouds":  # multi-octave smooth noise (fractal), soft white on blue-grey
        g = sum(
            _smooth_noise(rng, (256, 256), c) / (i + 1) for i, c in enumerate((4, 8, 16, 32, 64))
        )
        g = (g - g.min()) / (g.max() - g.min()) * 255
        return _tint(g, (90, 110, 140), (250, 250, 250))
    raise KeyError(name)


# name -> builder of a uint8 [h, w, 3] texture. Order matters: `num_classes=K` uses the first K.
_TEXTURES = {
    "brick": lambda: _tint(skdata.brick(), (60, 25, 20), (235, 140, 110)),
    "grass": lambda: _tint(skdata.grass(), (10, 50, 10), (150, 230, 90)),
    "gravel": lambda: _tint(skdata.gravel(), (40, 38, 35), (225, 215, 200)),
    "fur": lambda: skdata.chelsea()[0:75, 40:340],
    "wood": lambda: skdata.coffee()[0:400, 480:600],
    "fabric": lambda: skdata.astronaut()[300:480, 30:120],
    "text": lambda: _tint(skdata.page()[20:170, 20:360], (15, 15, 40), (250, 248, 235)),
    "stripes": lambda: _procedural("stripes"),
    "sky": lambda: _procedural("sky"),
    "dots": lambda: _procedural("dots"),
    "stars": lambda: skdata.hubble_deep_field()[0:512, 0:512],
    "cells": lambda: skdata.immunohistochemistry()[20:220, 20:240],
    "truss": lambda: skdata.rocket()[20:340, 5:85],
    "checker": lambda: _procedural("checker"),
    "clouds": lambda: _procedural("clouds"),
    "crater": lambda: _tint(skdata.moon(), (20, 20, 25), (235, 230, 220)),
}
CLASS_NAMES = tuple(_TEXTURES)


@functools.cache
def _texture(name: str) -> np.ndarray:
    return np.ascontiguousarray(_TEXTURES[name]())


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Scene size and layout.

    Attributes:
      height, width: HR size in pixels.
      num_classes: K, the first K of `CLASS_NAMES` (at most 16).
      regions: (min, max) number of Voronoi cells; neighbouring cells may share a class.
      warp: boundary displacement amplitude as a fraction of the short side.
    """

    height: int = 512
    width: int = 512
    num_classes: int = 8
    regions: tuple[int, int] = (3, 8)
    warp: float = 0.08

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(
                f"num_classes must be in [1, {len(CLASS_NAMES)}], got {self.num_classes}"
            )
        if not 1 <= self.regions[0] <= self.regions[1]:
            raise ValueError(f"regions must be 1 <= min <= max, got {self.regions}")


def class_names(num_classes: int) -> tuple[str, ...]:
    """The names of classes 0..num_classes-1."""
    return CLASS_NAMES[:num_classes]


def _layout(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """Region id of every pixel, int [H, W]: nearest Voronoi centre of the warped position."""
    h, w = cfg.height, cfg.width
    n = int(rng.integers(cfg.regions[0], cfg.regions[1] + 1))
    centres = rng.uniform(0, 1, (n, 2)).astype(np.float32) * np.float32([h, w])
    amplitude = cfg.warp * min(h, w)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y += amplitude * _smooth_noise(rng, (h, w), 6)
    x += amplitude * _smooth_noise(rng, (h, w), 6)
    # Squared distances to every centre, [n, H, W] (n <= a dozen, so a few MiB at 512 px).
    d = (y[None] - centres[:, 0, None, None]) ** 2 + (x[None] - centres[:, 1, None, None]) ** 2
    region = np.argmin(d, axis=0)
    return region


def _mirror_indices(start: int, length: int, period: int) -> np.ndarray:
    """Indices start..start+length-1 folded into [0, period) by mirroring (0..p-1, p-1..0, ...)."""
    i = (start + np.arange(length)) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def _fill(texture: np.ndarray, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A [h, w, 3] window of the texture mirror-tiled (no seams), at a random offset."""
    th, tw = texture.shape[:2]
    rows = _mirror_indices(int(rng.integers(0, 2 * th)), h, th)
    cols = _mirror_indices(int(rng.integers(0, 2 * tw)), w, tw)
    return texture.take(rows, axis=0).take(cols, axis=1)


def make_scene(seed, config: SceneConfig = SceneConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One labelled scene, a pure function of `seed` (anything `np.random.default_rng` takes,
    e.g. an int or a tuple of ints) and `config`.

    Returns:
      image: uint8 [H, W, 3] RGB.
      label: uint8 [H, W], class ids in [0, num_classes).
    """
    rng = np.random.default_rng(seed)
    region = _layout(rng, config)
    region_class = rng.integers(0, config.num_classes, region.max() + 1)
    label = region_class[region].astype(np.uint8)
    image = np.zeros((config.height, config.width, 3), np.uint8)
    for c in np.unique(label):
        fill = _fill(_texture(CLASS_NAMES[c]), rng, config.height, config.width)
        np.copyto(image, fill, where=(label == c)[..., None])
    return image, label


class SyntheticSource:
    """grain-compatible source of `num_examples` scenes, `{"hr", "label", "index"}` like the
    file sources; example i is `make_scene((seed, i), config)`."""

    def __init__(self, num_examples: int, config: SceneConfig = SceneConfig(), seed: int = 0):
        self.num_examples = num_examples
        self.config = config
        self.seed = seed
        self.class_names = class_names(config.num_classes)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        image, label = make_scene((self.seed, int(index)), self.config)
        return {"hr": image, "label": label, "index": np.int64(index)}
