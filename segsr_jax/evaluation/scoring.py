"""Score a folder of predictions against its ground truth: one row per image, a mean row.

The columns are fixed before the first image: the metrics of
:func:`segsr_jax.evaluation.measures.build_measures`, then ``semantic_miou`` (a SegFormer's
labels of each prediction) and ``seg_miou`` (the model's own labels) against ``labels`` where
asked for. Every image gets every column (NaN where it has no label map, or where an optional
pyiqa metric failed on it, with a note).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np

from segsr_jax.evaluation import measures as measures_lib
from segsr_jax.evaluation import pairing
from segsr_jax.evaluation.pairing import EvaluationError, Pair
from segsr_jax.evaluation.segmentation import IGNORE, MiouAccumulator, semantic_labels

MIOU_COLUMNS = ("semantic_miou", "seg_miou")


@dataclasses.dataclass
class Evaluation:
    """Scores of a folder: one row per image (``{"name": stem, column: value}``), the mean row,
    per-class IoU lists, and what was evaluated how."""

    name: str
    columns: list[str]
    rows: list[dict]
    mean: dict
    per_class_iou: dict
    settings: dict
    counts: dict
    notes: list[str]


class _MiouColumns:
    """The mIoU columns asked for, their label maps and their running confusion matrices."""

    def __init__(self, labels, segmenter, seg_pred, stems: list[str], warn):
        self.labels, self.seg_pred, self.segmenter = labels, seg_pred, segmenter
        self.label_index = (
            pairing.index_folder(labels, pairing.LABEL_SUFFIXES) if labels is not None else {}
        )
        self.seg_index = (
            pairing.index_folder(seg_pred, pairing.SEG_PRED_SUFFIXES)
            if seg_pred is not None
            else {}
        )
        num_classes = segmenter.config.num_labels if segmenter is not None else None
        if num_classes is not None and num_classes > IGNORE:
            raise EvaluationError(
                f"the segmenter has {num_classes} classes; uint8 label maps with "
                f"{IGNORE} as ignore hold at most {IGNORE}"
            )
        self.class_names = tuple(segmenter.config.id2label) if segmenter is not None else ()
        self.accumulators = {}
        if segmenter is not None:
            self.accumulators["semantic_miou"] = MiouAccumulator(num_classes)
        if seg_pred is not None:
            self.accumulators["seg_miou"] = MiouAccumulator(num_classes)
        self.missing = {"labels": [], "seg_pred": []}
        if labels is not None:
            _warn_unused_labels(labels, self.label_index, stems, bool(self.accumulators), warn)

    @property
    def columns(self) -> list[str]:
        return list(self.accumulators)

    def _labels(self, stem, index, shape, kind) -> np.ndarray | None:
        if stem not in index:
            self.missing[kind].append(stem)
            return None
        return pairing.labels_of_size(index[stem], shape, stem)

    def score(self, pair: Pair, sr: np.ndarray) -> dict:
        """This image's mIoU columns (NaN where a label map is missing)."""
        if not self.accumulators:
            return {}
        row = dict.fromkeys(self.accumulators, float("nan"))
        true = self._labels(pair.stem, self.label_index, sr.shape[:2], "labels")
        if "semantic_miou" in row and true is not None:
            row["semantic_miou"] = self.accumulators["semantic_miou"].add(
                semantic_labels(self.segmenter, sr),
                true,
                f"{self.label_index[pair.stem]} vs {pair.pred}",
            )
        if "seg_miou" in row:
            own = self._labels(pair.stem, self.seg_index, sr.shape[:2], "seg_pred")
            if true is not None and own is not None:
                row["seg_miou"] = self.accumulators["seg_miou"].add(
                    own, true, f"{self.label_index[pair.stem]} vs {self.seg_index[pair.stem]}"
                )
        return row

    def finish(self, warn) -> tuple[dict, dict]:
        """``(dataset mIoU per column, per-class IoU per column)``; warns about missing maps."""
        for kind, folder in (("labels", self.labels), ("seg_pred", self.seg_pred)):
            if self.missing[kind]:
                warn(
                    f"warning: {len(self.missing[kind])} image(s) without a label map in "
                    f"{folder}, left out of the mIoU: " + ", ".join(self.missing[kind])
                )
        mean, per_class = {}, {}
        for column, acc in self.accumulators.items():
            mean[column], per_class[column] = acc.result(self.class_names)
        return mean, per_class


def _warn_unused_labels(labels, label_index: dict, stems: list[str], scored: bool, warn) -> None:
    """Warn when ``--labels`` cannot give an mIoU: nothing to score it with, or no label file
    that matches a prediction (all mIoU values would be missing)."""
    if not scored:
        warn(
            f"warning: --labels {labels} is used only with --segmenter or --seg-pred; no mIoU "
            "without them"
        )
    elif not any(stem in label_index for stem in stems):
        warn(
            f"warning: no label map in {labels} matches a prediction ({len(label_index)} "
            "label files), so no mIoU: a label file is matched by its stem without the "
            "suffix _label or _labels (scene0_sr.png <-> scene0_label.png, scene0_labels.png "
            "or scene0.png)"
        )


def _score_image(
    pair: Pair, measures: list[measures_lib.Measure], failures: dict[str, list[str]]
) -> tuple[dict, np.ndarray]:
    """``({"name", metric: value, ...}, the prediction)`` of one pair."""
    sr, hr = pairing.read_image(pair.pred), pairing.read_image(pair.gt)
    if sr.shape != hr.shape:
        raise EvaluationError(
            f"{pair.pred.name} is {sr.shape[1]}x{sr.shape[0]} but "
            f"{pair.gt} is {hr.shape[1]}x{hr.shape[0]}"
        )
    scored = measures_lib.Scored(sr, hr, pair.pred, pair.gt)
    row = {"name": pair.stem}
    for measure in measures:
        if not measure.fallible:
            try:
                row[measure.name] = float(measure.score(scored))
            except ValueError as e:  # bad input for our metrics (e.g. smaller than the crop)
                raise EvaluationError(f"{pair.pred}: {e}") from e
            continue
        try:
            row[measure.name] = float(measure.score(scored))
        # pyiqa's failures are of any type; one image's failure is recorded, the run goes on.
        except Exception as e:  # noqa: BLE001
            row[measure.name] = float("nan")
            failures.setdefault(measure.name, []).append(
                f"{pair.pred.name} ({type(e).__name__}: {e})"
            )
    return row, sr


def _mean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN when there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def evaluate_folders(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    segmenter=None,
    segmenter_path: str | None = None,
    seg_pred: str | os.PathLike | None = None,
    crop_border: int = 4,
    y_channel: bool = True,
    niqe_params: dict | None = None,
    use_pyiqa: bool = True,
    lpips=None,
    name: str | None = None,
    progress: bool = True,
    warn=lambda msg: print(msg, file=sys.stderr),
) -> Evaluation:
    """Score every prediction in ``pred`` that has a ground truth in ``gt``.

    Args:
      pred, gt: image folders (paired as :mod:`segsr_jax.evaluation.pairing` says).
      labels: label-map folder; needed by ``segmenter`` and ``seg_pred``.
      segmenter: a built :class:`~segsr_jax.models.seg_encoder.SegFormer` (or None): its
        labels of each prediction are scored as ``semantic_miou``; ``segmenter_path`` is only
        recorded in the settings.
      seg_pred: folder of predicted label maps, scored as ``seg_miou``.
      crop_border: pixels removed from each side before PSNR, SSIM and NIQE.
      y_channel: PSNR/SSIM on the Y channel (else on RGB).
      niqe_params: ``{"mu_prisparam", "cov_prisparam"}`` (NIQE is omitted without it).
      use_pyiqa: try pyiqa's metrics.
      lpips: a :class:`segsr_jax.lpips.LPIPS` for the ``lpips_vgg`` column (None: no column).
      warn: where warnings (missing files) go.

    Raises:
      EvaluationError / images.ImageError: no pairs, sizes that differ, unreadable files,
        labels outside the segmenter's classes.
    """
    from tqdm import tqdm

    if (segmenter is not None or seg_pred is not None) and labels is None:
        raise EvaluationError("--segmenter and --seg-pred need --labels")
    pairs, preds, missing_gt = pairing.pair_folders(pred, gt)
    if missing_gt:
        warn(
            f"warning: {len(missing_gt)} prediction(s) without ground truth in {gt}, skipped: "
            + ", ".join(missing_gt)
        )

    notes: list[str] = []
    if niqe_params is None:
        notes.append(
            "NIQE omitted: no --niqe-params (a pristine model, e.g. the MATLAB "
            "release's modelparameters.mat) was given"
        )
    iqa = {}
    if use_pyiqa:
        iqa = measures_lib.make_pyiqa_metrics(notes)
    else:
        notes.append("pyiqa metrics skipped (--no-pyiqa)")
    measures = measures_lib.build_measures(
        crop_border=crop_border,
        y_channel=y_channel,
        niqe_params=niqe_params,
        lpips_model=lpips,
        pyiqa_metrics=iqa,
    )
    mious = _MiouColumns(labels, segmenter, seg_pred, [p.stem for p in pairs], warn)
    columns = [m.name for m in measures] + mious.columns

    rows, failures = [], {}
    # disable=None: no bar when stderr is not a terminal (a log file, a pipe).
    for pair in tqdm(pairs, desc="evaluate", unit="img", disable=None if progress else True):
        row, sr = _score_image(pair, measures, failures)
        row.update(mious.score(pair, sr))
        rows.append(row)

    for column, failed in failures.items():
        notes.append(
            f"{column} failed on {len(failed)} of {len(rows)} image(s), left out of its mean: "
            + "; ".join(failed)
        )
    mean = {c: _mean([r[c] for r in rows]) for c in columns if c not in MIOU_COLUMNS}
    miou_mean, per_class = mious.finish(warn)
    mean.update(miou_mean)
    if per_class:
        notes.append("the mean row's mIoU is the dataset mIoU (confusion summed over images)")
    settings = {
        "pred": str(pred),
        "gt": str(gt),
        "labels": _str(labels),
        "segmenter": segmenter_path,
        "seg_pred": _str(seg_pred),
        "crop_border": crop_border,
        "y_channel": y_channel,
        "niqe": niqe_params is not None,
        "lpips_vgg": lpips is not None,
        "pyiqa": list(iqa),
    }
    counts = {
        "images": len(rows),
        "predictions": len(preds),
        "missing_gt": missing_gt,
        "missing_labels": mious.missing["labels"],
        "missing_seg_pred": mious.missing["seg_pred"],
    }
    return Evaluation(
        name or Path(pred).name, columns, rows, mean, per_class, settings, counts, notes
    )


def _str(path) -> str | None:
    return None if path is None else str(path)
