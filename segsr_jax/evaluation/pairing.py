"""Which files belong together: predictions, ground truth, label maps and LQ inputs, paired by
stem.

Files are paired by stem once the suffixes ``_sr``, ``_hr``, ``_gt``, ``_lq``, ``_label``,
``_labels`` and ``_seg_labels`` are stripped (``scene0_sr.png`` <-> ``scene0_hr.png`` <->
``scene0_label.png`` <-> ``scene0_seg_labels.png`` <-> ``scene0.png`` as LQ); where a stem has
an ``_sr`` image, it alone is the prediction (the sampler's ``_seg``, ``_seg_labels`` and
``_sheet`` files beside it are ignored).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from segsr_jax import images

KNOWN_SUFFIXES = ("_seg_labels", "_labels", "_label", "_sr", "_hr", "_gt", "_lq")  # longest first
SAMPLER_EXTRAS = ("_seg", "_seg_labels", "_sheet")  # written by segsr_jax.sample beside _sr
GT_SUFFIXES = ("_hr", "_gt", "")
LABEL_SUFFIXES = ("_label", "_labels", "")
SEG_PRED_SUFFIXES = ("_seg_labels", "_labels", "_label", "")
LQ_SUFFIXES = ("_lq", "")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the files."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One prediction and its ground truth."""

    stem: str
    pred: Path
    gt: Path


def split_suffix(stem: str) -> tuple[str, str]:
    """``"scene0_sr"`` -> ``("scene0", "_sr")``; a stem without a known suffix -> ``(stem, "")``."""
    for suffix in KNOWN_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)], suffix
    return stem, ""


def index_folder(folder: str | os.PathLike, prefer: tuple[str, ...]) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder`` whose suffix is one of ``prefer``
    (``""``: none); where several files share a stem, the one whose suffix comes first in
    ``prefer`` wins (two files with the same suffix, e.g. ``a.png`` and ``a.jpg``, are an
    error)."""
    by_stem: dict[str, list[tuple[int, Path]]] = {}
    for path in images.list_images(folder):
        stem, suffix = split_suffix(path.stem)
        if suffix in prefer:
            by_stem.setdefault(stem, []).append((prefer.index(suffix), path))
    index = {}
    for stem, found in by_stem.items():
        found.sort(key=lambda item: item[0])
        if len(found) > 1 and found[0][0] == found[1][0]:
            raise EvaluationError(
                f"{folder}: {found[0][1].name} and {found[1][1].name} both "
                f"match image {stem!r}; keep one"
            )
        index[stem] = found[0][1]
    return index


def find_predictions(folder: str | os.PathLike) -> dict[str, Path]:
    """The predictions in ``folder``: ``{stem: path}``, the ``_sr`` file where there is one,
    without the sampler's other outputs (``X_seg.png``, ``X_sheet.png`` beside ``X_sr.png``)."""
    index = index_folder(folder, prefer=("_sr", ""))
    extras = {
        stem + extra
        for stem, path in index.items()
        if path.stem.endswith("_sr")
        for extra in SAMPLER_EXTRAS
    }
    return {stem: path for stem, path in index.items() if stem not in extras}


def pair_folders(
    pred: str | os.PathLike, gt: str | os.PathLike
) -> tuple[list[Pair], dict[str, Path], list[str]]:
    """``(pairs, predictions, stems without ground truth)`` of the prediction folder ``pred``
    and the ground-truth folder ``gt``.

    Raises:
      EvaluationError: no prediction has a ground truth.
    """
    preds = find_predictions(pred)
    gts = index_folder(gt, prefer=GT_SUFFIXES)
    pairs = [Pair(stem, path, gts[stem]) for stem, path in preds.items() if stem in gts]
    if not pairs:
        raise EvaluationError(
            f"no prediction in {pred} has a ground truth in {gt} "
            f"({len(preds)} predictions, {len(gts)} ground-truth images)"
        )
    return pairs, preds, sorted(stem for stem in preds if stem not in gts)


def read_labels(path: Path) -> np.ndarray:
    """A label PNG as uint8 ``[H, W]`` (modes L and P: the class ids as stored)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise images.ImageError(
                    f"{path}: a label map must be a single-channel uint8 "
                    f"image (mode L or P), got mode {img.mode}"
                )
            return np.asarray(img, np.uint8)
    except (OSError, SyntaxError) as e:  # PIL's unreadable / truncated-file errors
        raise images.ImageError(f"{path}: not a readable label map ({e})") from e


def read_image(path: Path) -> np.ndarray:
    """:func:`segsr_jax.images.read_image`, with a missing file as an ``ImageError`` too."""
    try:
        return images.read_image(path)
    except FileNotFoundError as e:
        raise images.ImageError(f"{path}: not found") from e


def labels_of_size(path: Path, shape: tuple[int, int], stem: str) -> np.ndarray:
    """The label map at ``path``, which must be ``shape`` (the image ``stem``'s size)."""
    lab = read_labels(path)
    if lab.shape != tuple(shape):
        raise EvaluationError(
            f"{path} is {lab.shape[1]}x{lab.shape[0]} but the image {stem} is {shape[1]}x{shape[0]}"
        )
    return lab
