"""``python -m segsr_jax.evaluate``: score super-resolved images against their ground truth.

    python -m segsr_jax.evaluate --pred DIR --gt DIR [--labels DIR] [--segmenter PATH] \
        [--seg-pred DIR] [--crop-border N] [--rgb] [--out DIR] [--niqe-params FILE] \
        [--no-pyiqa] [--per-image] [--name NAME]

Files are paired by stem once the suffixes ``_sr``, ``_hr``, ``_gt``, ``_label``, ``_labels``
and ``_seg_labels`` are stripped (``scene0_sr.png`` <-> ``scene0_hr.png`` <->
``scene0_label.png`` <-> ``scene0_seg_labels.png``); where a stem has an ``_sr`` image, it
alone is the prediction (the sampler's ``_seg``, ``_seg_labels`` and ``_sheet`` files beside
it are ignored). Predictions without ground truth are listed and skipped.

Metrics: PSNR and SSIM (:mod:`segsr_jax.metrics`; float Y channel unless ``--rgb``, after
cropping ``--crop-border`` pixels per side), NIQE when ``--niqe-params`` gives a pristine model,
pyiqa's lpips, dists, musiq, maniqa and clipiqa when pyiqa is installed, and two mIoUs against
``--labels`` (uint8 class maps, 255 = ignore): ``semantic_miou``, a SegFormer's (``--segmenter``)
segmentation of each prediction at full size, and ``seg_miou``, the model's own predicted labels
(``--seg-pred``). A mean row's mIoU is the dataset mIoU of the summed confusion matrix.

Output: a table on stdout, ``<out>/metrics.csv`` (per image and ``mean``) and
``<out>/metrics.json`` (means, per image, per-class IoU, settings, counts), written atomically.
Bad input (no pairs, sizes that differ, unreadable files) exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from segsr_jax import images, metrics

KNOWN_SUFFIXES = ("_seg_labels", "_labels", "_label", "_sr", "_hr", "_gt")  # longest first
SAMPLER_EXTRAS = ("_seg", "_seg_labels", "_sheet")  # written by segsr_jax.sample beside _sr
PYIQA_METRICS = ("lpips", "dists", "musiq", "maniqa", "clipiqa")
FULL_REFERENCE = ("lpips", "dists")
IGNORE = 255
HEADERS = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "niqe": "NIQE",
    "semantic_miou": "sem mIoU",
    "seg_miou": "seg mIoU",
}


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the files."""


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


# --- Segmenter -------------------------------------------------------------------------------


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


@functools.cache
def make_segment_fn(graphdef):
    """Jitted ``(state, images uint8 [B, H, W, 3]) -> labels uint8 [B, H, W]``: the logits
    upsampled bilinearly to the image size, then argmax (as ``segsr_jax.label``, at the
    image's own size instead of a square window). Compiles once per image shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax.models.seg_encoder import normalize_images, resize_bilinear

    def segment_fn(state, batch):
        logits, _ = nnx.merge(graphdef, state)(normalize_images(batch))
        logits = resize_bilinear(logits.astype(jnp.float32), batch.shape[1:3])
        return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    return jax.jit(segment_fn)


def semantic_labels(segformer, image_u8: np.ndarray) -> np.ndarray:
    """``segformer``'s labels of one uint8 RGB image ``[H, W, 3]``: uint8 ``[H, W]``."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(segformer)
    labels = make_segment_fn(graphdef)(state, np.asarray(image_u8, np.uint8)[None])
    return np.asarray(jax.device_get(labels))[0]


# --- pyiqa -----------------------------------------------------------------------------------


def make_pyiqa_metrics(notes: list[str]) -> dict:
    """``{name: pyiqa metric}`` for those of :data:`PYIQA_METRICS` that pyiqa can build; each
    one that cannot (no pyiqa, weights not downloadable, ...) is explained in ``notes``."""
    try:
        import pyiqa
    except ImportError:
        notes.append("pyiqa metrics omitted: pyiqa is not installed")
        return {}
    built = {}
    for name in PYIQA_METRICS:
        try:
            built[name] = pyiqa.create_metric(name)
        # pyiqa fails in many ways (missing weights, no network, CUDA); one metric's failure
        # must not stop the others, and each is reported.
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name} omitted: pyiqa.create_metric failed ({type(e).__name__}: {e})")
    return built


# --- Evaluation ------------------------------------------------------------------------------


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


class _MiouAccumulator:
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
        seen = np.flatnonzero(self.total.sum(0) + self.total.sum(1))
        k = self.num_classes or (int(seen.max()) + 1 if seen.size else 0)
        value, iou = metrics.miou(self.total[:k, :k])
        return value, [
            {"id": i, "name": names[i] if i < len(names) else f"class_{i}", "iou": _finite(iou[i])}
            for i in range(k)
        ]


def _finite(x):
    """A float for JSON: NaN and infinities become None."""
    return float(x) if x is not None and math.isfinite(x) else None


def _read(path: Path) -> np.ndarray:
    try:
        return images.read_image(path)
    except FileNotFoundError as e:
        raise images.ImageError(f"{path}: not found") from e


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
    name: str | None = None,
    progress: bool = True,
    warn=lambda msg: print(msg, file=sys.stderr),
) -> Evaluation:
    """Score every prediction in ``pred`` that has a ground truth in ``gt``.

    Args:
      pred, gt: image folders (paired as the module docstring says).
      labels: label-map folder; needed by ``segmenter`` and ``seg_pred``.
      segmenter: a built :class:`~segsr_jax.models.seg_encoder.SegFormer` (or None): its
        labels of each prediction are scored as ``semantic_miou``; ``segmenter_path`` is only
        recorded in the settings.
      seg_pred: folder of predicted label maps, scored as ``seg_miou``.
      crop_border: pixels removed from each side before PSNR, SSIM and NIQE.
      y_channel: PSNR/SSIM on the Y channel (else on RGB).
      niqe_params: ``{"mu_prisparam", "cov_prisparam"}`` (NIQE is omitted without it).
      use_pyiqa: try pyiqa's metrics.
      warn: where warnings (missing files) go.

    Raises:
      EvaluationError / images.ImageError: no pairs, sizes that differ, unreadable files,
        labels outside the segmenter's classes.
    """
    from tqdm import tqdm

    if (segmenter is not None or seg_pred is not None) and labels is None:
        raise EvaluationError("--segmenter and --seg-pred need --labels")
    preds = find_predictions(pred)
    gts = index_folder(gt, prefer=("_hr", "_gt", ""))
    pairs = [(stem, path, gts[stem]) for stem, path in preds.items() if stem in gts]
    missing_gt = sorted(stem for stem in preds if stem not in gts)
    if not pairs:
        raise EvaluationError(
            f"no prediction in {pred} has a ground truth in {gt} "
            f"({len(preds)} predictions, {len(gts)} ground-truth images)"
        )
    if missing_gt:
        warn(
            f"warning: {len(missing_gt)} prediction(s) without ground truth in {gt}, skipped: "
            + ", ".join(missing_gt)
        )

    notes: list[str] = []
    columns = ["psnr", "ssim"]
    if niqe_params is not None:
        columns.append("niqe")
    else:
        notes.append(
            "NIQE omitted: no --niqe-params (a pristine model, e.g. the MATLAB "
            "release's modelparameters.mat) was given"
        )
    iqa = {}
    if use_pyiqa:
        iqa = make_pyiqa_metrics(notes)
    else:
        notes.append("pyiqa metrics skipped (--no-pyiqa)")
    columns += list(iqa)

    label_index = index_folder(labels, ("_label", "_labels", "")) if labels is not None else {}
    seg_index = (
        index_folder(seg_pred, ("_seg_labels", "_labels", "_label", ""))
        if seg_pred is not None
        else {}
    )
    num_classes = segmenter.config.num_labels if segmenter is not None else None
    if num_classes is not None and num_classes > IGNORE:
        raise EvaluationError(
            f"the segmenter has {num_classes} classes; uint8 label maps with "
            f"{IGNORE} as ignore hold at most {IGNORE}"
        )
    class_names = tuple(segmenter.config.id2label) if segmenter is not None else ()
    semantic = _MiouAccumulator(num_classes) if segmenter is not None else None
    own = _MiouAccumulator(num_classes) if seg_pred is not None else None
    columns += [c for c, acc in (("semantic_miou", semantic), ("seg_miou", own)) if acc]
    missing = {"labels": [], "seg_pred": []}

    if labels is not None:
        _warn_unused_labels(
            labels,
            label_index,
            [stem for stem, _, _ in pairs],
            segmenter is not None or seg_pred is not None,
            warn,
        )

    rows = []
    # disable=None: no bar when stderr is not a terminal (a log file, a pipe).
    for stem, pred_path, gt_path in tqdm(
        pairs, desc="evaluate", unit="img", disable=None if progress else True
    ):
        sr, hr = _read(pred_path), _read(gt_path)
        if sr.shape != hr.shape:
            raise EvaluationError(
                f"{pred_path.name} is {sr.shape[1]}x{sr.shape[0]} but "
                f"{gt_path} is {hr.shape[1]}x{hr.shape[0]}"
            )
        row = {"name": stem}
        try:
            row["psnr"] = metrics.psnr(sr, hr, crop_border, y_channel)
            row["ssim"] = metrics.ssim(sr, hr, crop_border, y_channel)
            if niqe_params is not None:
                row["niqe"] = metrics.niqe(
                    sr, niqe_params["mu_prisparam"], niqe_params["cov_prisparam"], crop_border
                )
        except ValueError as e:
            raise EvaluationError(f"{pred_path}: {e}") from e
        for metric_name, metric in list(iqa.items()):
            args = (
                (str(pred_path), str(gt_path))
                if metric_name in FULL_REFERENCE
                else (str(pred_path),)
            )
            try:
                row[metric_name] = float(metric(*args))
            except Exception as e:  # noqa: BLE001 -- as in make_pyiqa_metrics
                notes.append(
                    f"{metric_name} dropped: failed on {pred_path.name} ({type(e).__name__}: {e})"
                )
                del iqa[metric_name]
                columns.remove(metric_name)
                for done in rows:
                    done.pop(metric_name, None)
        if semantic is not None or own is not None:
            true = _labels_for(stem, label_index, hr.shape[:2], "labels", missing)
            if semantic is not None:
                row["semantic_miou"] = float("nan")
                if true is not None:
                    row["semantic_miou"] = semantic.add(
                        semantic_labels(segmenter, sr), true, f"{label_index[stem]} vs {pred_path}"
                    )
            if own is not None:
                seg = _labels_for(stem, seg_index, hr.shape[:2], "seg_pred", missing)
                row["seg_miou"] = float("nan")
                if true is not None and seg is not None:
                    row["seg_miou"] = own.add(
                        seg, true, f"{label_index[stem]} vs {seg_index[stem]}"
                    )
        rows.append(row)
    for kind, folder in (("labels", labels), ("seg_pred", seg_pred)):
        if missing[kind]:
            warn(
                f"warning: {len(missing[kind])} image(s) without a label map in {folder}, "
                "left out of the mIoU: " + ", ".join(missing[kind])
            )

    mean = {
        c: float(np.mean([r[c] for r in rows if c in r]))
        for c in columns
        if c not in ("semantic_miou", "seg_miou")
    }
    per_class = {}
    for column, acc in (("semantic_miou", semantic), ("seg_miou", own)):
        if acc is not None:
            mean[column], per_class[column] = acc.result(class_names)
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
        "pyiqa": list(iqa),
    }
    counts = {
        "images": len(rows),
        "predictions": len(preds),
        "missing_gt": missing_gt,
        "missing_labels": missing["labels"],
        "missing_seg_pred": missing["seg_pred"],
    }
    return Evaluation(
        name or Path(pred).name, columns, rows, mean, per_class, settings, counts, notes
    )


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


def _str(path) -> str | None:
    return None if path is None else str(path)


def _labels_for(stem, index, shape, kind, missing) -> np.ndarray | None:
    """The label map of ``stem`` (None, recorded in ``missing``, when there is none)."""
    if stem not in index:
        missing[kind].append(stem)
        return None
    lab = read_labels(index[stem])
    if lab.shape != tuple(shape):
        raise EvaluationError(
            f"{index[stem]} is {lab.shape[1]}x{lab.shape[0]} but the image "
            f"{stem} is {shape[1]}x{shape[0]}"
        )
    return lab


# --- Output ----------------------------------------------------------------------------------


def format_table(ev: Evaluation, per_image: bool = False) -> str:
    """The table printed on stdout: per-image rows (optional), then the mean row."""
    heads = ["image"] + [HEADERS.get(c, c.upper()) for c in ev.columns]
    body = ev.rows if per_image else []
    lines = [[r["name"]] + [f"{r.get(c, float('nan')):.4f}" for c in ev.columns] for r in body]
    lines.append([f"mean ({ev.name}, {len(ev.rows)})"] + [f"{ev.mean[c]:.4f}" for c in ev.columns])
    widths = [max(len(x[i]) for x in [heads, *lines]) for i in range(len(heads))]
    fmt = lambda cells: "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([fmt(heads)] + [fmt(x) for x in lines] + [f"note: {n}" for n in ev.notes])


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) atomically."""
    images.write_atomic(path, text.encode("utf-8"))


def write_results(ev: Evaluation, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``<out_dir>/metrics.csv`` (per image + ``mean``) and ``metrics.json``."""
    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", *ev.columns])
    for row in [*ev.rows, {"name": "mean", **ev.mean}]:
        writer.writerow([row["name"], *(repr(float(row.get(c, float("nan")))) for c in ev.columns)])
    doc = {
        "name": ev.name,
        "mean": {c: _finite(v) for c, v in ev.mean.items()},
        "per_image": [
            {k: (v if k == "name" else _finite(v)) for k, v in r.items()} for r in ev.rows
        ],
        "per_class_iou": ev.per_class_iou,
        "settings": ev.settings,
        "counts": ev.counts,
        "notes": ev.notes,
    }
    csv_path, json_path = out / "metrics.csv", out / "metrics.json"
    _write_atomic(csv_path, buf.getvalue())
    _write_atomic(json_path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return csv_path, json_path


def load_niqe_params(path: str | os.PathLike) -> dict:
    """``{"mu_prisparam" [36], "cov_prisparam" [36, 36]}`` from an ``.npz`` or a MATLAB
    ``.mat`` (BasicSR's ``mu_pris_param`` / ``cov_pris_param`` spelling is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--niqe-params {path}: not found")
    if path.suffix == ".mat":
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        try:
            data = loadmat(path)
        # scipy's errors for a file that is not a MATLAB file, or a damaged one.
        except (MatReadError, OSError, ValueError, TypeError) as e:
            raise EvaluationError(
                f"--niqe-params {path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})"
            ) from e
    else:
        try:
            loaded = np.load(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # numpy: not an npz
            raise EvaluationError(
                f"--niqe-params {path}: not a readable .npz file ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise EvaluationError(
                f"--niqe-params {path}: a single array, not an .npz with "
                "mu_prisparam and cov_prisparam"
            )
        with loaded as npz:
            data = dict(npz)
    out = {}
    for key in ("mu_prisparam", "cov_prisparam"):
        alt = key.replace("pris", "pris_")
        if key not in data and alt not in data:
            raise EvaluationError(f"{path} has no {key!r} (it holds {sorted(data)})")
        out[key] = np.asarray(data[key] if key in data else data[alt], np.float64)
    out["mu_prisparam"] = out["mu_prisparam"].ravel()
    n = out["mu_prisparam"].size
    if out["cov_prisparam"].shape != (n, n) or n != 36:
        raise EvaluationError(
            f"{path}: expected mu [36] and cov [36, 36], got "
            f"{out['mu_prisparam'].shape} and {out['cov_prisparam'].shape}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m segsr_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, help="folder of super-resolved images")
    p.add_argument("--gt", required=True, help="folder of ground-truth HR images")
    p.add_argument("--labels", help="folder of ground-truth label maps (uint8, 255 = ignore)")
    p.add_argument(
        "--segmenter",
        help="SegFormer for semantic mIoU: a transformers folder or a segsr_jax checkpoint folder",
    )
    p.add_argument("--seg-pred", help="folder of predicted label maps (<stem>_seg_labels.png)")
    p.add_argument(
        "--crop-border",
        type=int,
        default=4,
        help="pixels cropped per side for PSNR/SSIM/NIQE (default 4, the x4 scale)",
    )
    p.add_argument("--rgb", action="store_true", help="PSNR/SSIM on RGB instead of Y")
    p.add_argument("--out", help="folder for metrics.csv / metrics.json (default: --pred)")
    p.add_argument(
        "--niqe-params", help="pristine NIQE model (.npz or .mat with mu_prisparam, cov_prisparam)"
    )
    p.add_argument("--no-pyiqa", action="store_true", help="skip pyiqa's metrics")
    p.add_argument("--per-image", action="store_true", help="print a row per image")
    p.add_argument("--name", help="name of this run in the table and JSON (default: --pred's)")
    args = p.parse_args(argv)

    errors: tuple[type[Exception], ...] = (EvaluationError, images.ImageError, FileNotFoundError)
    if args.segmenter:
        from segsr_jax.checkpoint import CheckpointMismatchError
        from segsr_jax.weights import CheckpointError

        errors += (CheckpointError, CheckpointMismatchError)
    try:
        niqe_params = load_niqe_params(args.niqe_params) if args.niqe_params else None
        if args.segmenter and not args.labels:
            raise EvaluationError("--segmenter needs --labels")
        segmenter = load_segmenter(args.segmenter) if args.segmenter else None
        ev = evaluate_folders(
            args.pred,
            args.gt,
            labels=args.labels,
            segmenter=segmenter,
            segmenter_path=args.segmenter,
            seg_pred=args.seg_pred,
            crop_border=args.crop_border,
            y_channel=not args.rgb,
            niqe_params=niqe_params,
            use_pyiqa=not args.no_pyiqa,
            name=args.name,
        )
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(ev, per_image=args.per_image))
    csv_path, json_path = write_results(ev, args.out or args.pred)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
