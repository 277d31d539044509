"""Baselines computed from the same LQ inputs as the predictions, scored with the same metrics.

``bicubic`` and ``realesrgan`` (:mod:`segsr_jax.upscalers`), each to the ground truth's size.

Each baseline's outputs are written as ``<folder>/<stem>_sr.png``, so it is evaluated like any
prediction folder (pyiqa's metrics read files) and can be looked at afterwards.
"""

from __future__ import annotations

from pathlib import Path

from segsr_jax import images, upscalers
from segsr_jax.evaluation.pairing import EvaluationError

BASELINES = upscalers.UPSCALERS


def make_upscaler(name: str) -> upscalers.Upscaler:
    """The upscaler of baseline ``name`` (one of :data:`BASELINES`).

    Raises:
      EvaluationError: an unknown name, or weights that are not fetched (the message says how).
    """
    if name not in BASELINES:
        raise EvaluationError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    try:
        return upscalers.make_upscaler(name)
    except (upscalers.WeightsNotFoundError, ValueError) as e:
        raise EvaluationError(f"--baseline {name}: {e}") from e


def write_baseline(
    upscaler: upscalers.Upscaler,
    lq: dict[str, Path],
    sizes: dict[str, tuple[int, int]],
    folder: Path,
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
