"""Plain x4 upscalers: bicubic and Real-ESRGAN x4plus, as baselines and as a first-stage cleaner.

An upscaler is ``(lq uint8 [h, w, 3], (H, W)) -> uint8 [H, W, 3]``.

``bicubic``: PIL's bicubic resize. ``realesrgan``: Real-ESRGAN x4plus
(:mod:`segsr_jax.models.rrdbnet`, weights from ``python -m segsr_jax.weights.fetch realesrgan``),
tiled (128 px LQ tiles, 16 px overlap), then resized (bicubic) where ``(H, W)`` is not 4x.

Used twice: ``python -m segsr_jax.evaluate --baseline`` scores them on the same inputs as a
model, and ``SampleOptions.cleaner`` hands the sampler Real-ESRGAN's output instead of the
bicubic-upscaled LQ (DiffBIR's two stages: a regression network removes the degradation, the
diffusion model adds the detail it cannot).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segsr_jax import images

UPSCALERS = ("bicubic", "realesrgan")
REALESRGAN_TILE, REALESRGAN_OVERLAP = 128, 16  # LQ pixels

Upscaler = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


class WeightsNotFoundError(FileNotFoundError):
    """An upscaler's weights are not in the cache (the message says how to fetch them)."""


def bicubic(lq: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``lq`` (uint8 ``[h, w, 3]``) resized to ``size_hw`` with PIL's bicubic filter."""
    return images.resize(lq, size_hw)


@functools.cache
def _realesrgan_fn(graphdef):
    """Jitted ``(state, x [1, h, w, 3] in [0, 1]) -> [1, 4h, 4w, 3]`` in ``[0, 1]``: tiled
    :func:`segsr_jax.models.rrdbnet.upscale`, clipped. Compiles once per LQ shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax.models.rrdbnet import upscale

    def realesrgan_fn(state, x):
        model = nnx.merge(graphdef, state)
        y = upscale(model, x, tile=REALESRGAN_TILE, overlap=REALESRGAN_OVERLAP)
        return jnp.clip(y, 0.0, 1.0)

    return jax.jit(realesrgan_fn)


def make_realesrgan(weights: str | os.PathLike | None = None) -> Upscaler:
    """The Real-ESRGAN x4plus upscaler from the fetched weights (or the folder ``weights``).

    Raises:
      WeightsNotFoundError: the weights are not fetched (the message says how).
      ValueError: the folder holds a network of another scale.
    """
    import jax
    from flax import nnx

    from segsr_jax.models.rrdbnet import load_rrdbnet
    from segsr_jax.weights.fetch import model_dir

    folder = Path(weights) if weights else model_dir("realesrgan")
    if not (folder / "model.safetensors").is_file():
        raise WeightsNotFoundError(
            f"no Real-ESRGAN weights in {folder} (fetch them once with "
            "`python -m segsr_jax.weights.fetch realesrgan`)"
        )
    model = load_rrdbnet(folder)
    if model.config.scale != 4:
        raise ValueError(f"{folder}: a x{model.config.scale} model; Real-ESRGAN here is x4")
    graphdef, state = nnx.split(model)
    fn = _realesrgan_fn(graphdef)

    def realesrgan(lq: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        x = (np.asarray(lq, np.float32) / 255.0)[None]
        y = np.asarray(jax.device_get(fn(state, x)))[0]
        return images.resize(np.round(y * 255.0).astype(np.uint8), size_hw)

    return realesrgan


def make_upscaler(name: str) -> Upscaler:
    """The upscaler ``name`` (one of :data:`UPSCALERS`).

    Raises:
      ValueError: an unknown name. WeightsNotFoundError: as :func:`make_realesrgan`.
    """
    if name == "bicubic":
        return bicubic
    if name == "realesrgan":
        return make_realesrgan()
    raise ValueError(f"unknown upscaler {name!r}; choose from {', '.join(UPSCALERS)}")
