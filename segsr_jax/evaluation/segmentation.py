"""Semantic fidelity: a SegFormer's labels of each prediction, and dataset mIoU.

``semantic_miou`` segments every prediction at full size with a SegFormer (a transformers folder
or a segsr_jax checkpoint's own) through :func:`segsr_jax.label.make_segment_fn`, the one
segmentation program of the package; ``seg_miou`` scores the model's own predicted labels. A
mean row's mIoU is the dataset mIoU of the confusion matrix summed over images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from segsr_jax import metrics
from segsr_jax.evaluation.pairing import EvaluationError

IGNORE = 255  # the ignore label of uint8 label maps


def load_segmenter(path: str | os.PathLike):
    """A SegFormer from a transformers folder (with ``config.json``, or holding
    ``segformer/``) or from a segsr_jax checkpoint folder (the model's own SegFormer)."""
    from flax import nnx

    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"--segmenter {path}: not found")
    if (path / "config.json").is_file() or (path / "segformer" / "config.json").is_file():
        from segsr_jax.weights import load_segformer

        return load_segformer(path)
    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(path)
    return nnx.merge(restorer.graphdef, restorer.state).segformer


def semantic_labels(segformer, image_u8: np.ndarray) -> np.ndarray:
    """``segformer``'s labels of one uint8 RGB image ``[H, W, 3]``: uint8 ``[H, W]`` (logits
    upsampled to the image's own size; one compile per image shape)."""
    import jax
    from flax import nnx

    from segsr_jax.label import make_segment_fn

    graphdef, state = nnx.split(segformer)
    labels = make_segment_fn(graphdef)(state, np.asarray(image_u8, np.uint8)[None])
    return np.asarray(jax.device_get(labels))[0]


def finite_or_none(x):
    """A float for JSON: NaN and infinities become None."""
    return float(x) if x is not None and math.isfinite(x) else None


class MiouAccumulator:
    """Sums confusion matrices over images (255 bins: every uint8 class but the ignore)."""

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes
        self.total = np.zeros((IGNORE, IGNORE), np.int64)

    def add(self, pred: np.ndarray, true: np.ndarray, where: str) -> float:
        """Adds one image; returns its own mIoU."""
        k = self.num_classes or IGNORE
        try:
            conf = metrics.confusion(pred, true, k, ignore=IGNORE)
        except ValueError as e:
            raise EvaluationError(f"{where}: {e}") from e
        self.total[:k, :k] += conf
        return metrics.miou(conf)[0]

    def result(self, names: tuple[str, ...]) -> tuple[float, list[dict]]:
        """``(dataset mIoU, [{"id", "name", "iou"}, ...])`` over the images added so far."""
        seen = np.flatnonzero(self.total.sum(0) + self.total.sum(1))
        k = self.num_classes or (int(seen.max()) + 1 if seen.size else 0)
        value, iou = metrics.miou(self.total[:k, :k])
        return value, [
            {
                "id": i,
                "name": names[i] if i < len(names) else f"class_{i}",
                "iou": finite_or_none(iou[i]),
            }
            for i in range(k)
        ]
