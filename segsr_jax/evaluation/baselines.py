"""Baselines computed from the same LQ inputs as the predictions, scored with the same metrics.

``bicubic``: PIL's bicubic resize of the LQ image to the ground truth's size.
``realesrgan``: Real-ESRGAN x4plus (:mod:`segsr_jax.models.rrdbnet`, weights from
``python -m segsr_jax.weights.fetch realesrgan``), tiled (128 px LQ tiles, 16 px overlap),
then resized (bicubic) to the ground truth's size where that is not 4x the LQ.

Each baseline's outputs are written as ``<folder>/<stem>_sr.png``, so it is evaluated like any
prediction folder (pyiqa's metrics read files) and can be looked at afterwards.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segsr_jax import images
from segsr_jax.evaluation.pairing import EvaluationError

BASELINES = ("bicubic", "realesrgan")
REALESRGAN_TILE, REALESRGAN_OVERLAP = 128, 16  # LQ pixels

Upscaler = Callable[[np.ndarray, tuple[int, int]], np.ndarray]  # (lq uint8, (H, W)) -> uint8


def bicubic(lq: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``lq`` (uint8 ``[h, w, 3]``) resized to ``size_hw`` with PIL's bicubic filter."""
    return images.resize(lq, size_hw)


@functools.cache
def make_realesrgan_fn(graphdef):
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
      EvaluationError: the weights are not fetched (the message says how).
    """
    import jax
    from flax import nnx

    from segsr_jax.models.rrdbnet import load_rrdbnet
    from segsr_jax.weights.fetch import model_dir

    folder = Path(weights) if weights else model_dir("realesrgan")
    if not (folder / "model.safetensors").is_file():
        raise EvaluationError(
            f"--baseline realesrgan: no weights in {folder} (fetch them once with "
            "`python -m segsr_jax.weights.fetch realesrgan`)"
        )
    model = load_rrdbnet(folder)
    if model.config.scale != 4:
        raise EvaluationError(f"{folder}: a x{model.config.scale} model; the baseline is x4")
    graphdef, state = nnx.split(model)
    fn = make_realesrgan_fn(graphdef)

    def realesrgan(lq: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        x = (np.asarray(lq, np.float32) / 255.0)[None]
        y = np.asarray(jax.device_get(fn(state, x)))[0]
        return images.resize(np.round(y * 255.0).astype(np.uint8), size_hw)

    return realesrgan


def make_upscaler(name: str) -> Upscaler:
    """The upscaler of baseline ``name`` (one of :data:`BASELINES`)."""
    if name == "bicubic":
        return bicubic
    if name == "realesrgan":
        return make_realesrgan()
    raise EvaluationError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def write_baseline(
    upscaler: Upscaler, lq: dict[str, Path], sizes: dict[str, tuple[int, int]], folder: Path
) -> Path:
    """``upscaler``'s output for every stem of ``sizes`` (``{stem: (H, W)}`` of its ground
    truth), from its LQ image ``lq[stem]``, written to ``folder/<stem>_sr.png``.

    Raises:
      EvaluationError: a stem without an LQ image (all are named).
    """
    missing = sorted(stem for stem in sizes if stem not in lq)
    if missing:
        raise EvaluationError(f"no LQ image for {', '.join(missing)} (--lq)")
    for stem, size_hw in sizes.items():
        images.write_png(folder / f"{stem}_sr.png", upscaler(images.read_image(lq[stem]), size_hw))
    return folder
