"""``python -m segsr_jax.evaluate``: score super-resolved images against their ground truth.

    python -m segsr_jax.evaluate --pred DIR --gt DIR [--labels DIR] [--segmenter PATH] \
        [--seg-pred DIR] [--crop-border N] [--rgb] [--out DIR] [--niqe-params FILE] \
        [--no-pyiqa] [--no-lpips] [--lq DIR --baseline bicubic --baseline realesrgan] \
        [--html] [--per-image] [--name NAME]

Files are paired by stem once the suffixes ``_sr``, ``_hr``, ``_gt``, ``_lq``, ``_label``,
``_labels`` and ``_seg_labels`` are stripped (``scene0_sr.png`` <-> ``scene0_hr.png`` <->
``scene0_label.png`` <-> ``scene0_seg_labels.png``); where a stem has an ``_sr`` image, it
alone is the prediction (the sampler's ``_seg``, ``_seg_labels`` and ``_sheet`` files beside
it are ignored). Predictions without ground truth are listed and skipped.

Metrics: PSNR and SSIM (float Y channel unless ``--rgb``, after cropping ``--crop-border``
pixels per side), NIQE when ``--niqe-params`` gives a pristine model, LPIPS-VGG (``lpips_vgg``,
our JAX port) when its weights are fetched (``python -m segsr_jax.weights.fetch lpips``),
pyiqa's lpips (AlexNet), dists, musiq, maniqa and clipiqa when pyiqa is installed, and two mIoUs
against ``--labels`` (uint8 class maps, 255 = ignore): ``semantic_miou``, a SegFormer's
(``--segmenter``) segmentation of each prediction at full size, and ``seg_miou``, the model's
own predicted labels (``--seg-pred``). A mean row's mIoU is the dataset mIoU of the summed
confusion matrix.

Baselines: ``--baseline bicubic`` and ``--baseline realesrgan`` (repeatable) upscale the LQ
inputs of ``--lq`` (``scene0.png`` or ``scene0_lq.png``) to the ground truth's size, write
them to ``<out>/baselines/<name>/``, and score them with the same metrics: extra rows.

Output: a table on stdout, ``<out>/metrics.csv`` (``method, name, ...``: per image and
``mean``) and ``<out>/metrics.json`` (means, per image, per-class IoU, settings, counts; the
baselines under ``"baselines"``), written atomically; with ``--html`` also ``<out>/index.html``
(:mod:`segsr_jax.report`: sliders against bicubic, the baselines and the ground truth, the
segmentation overlay, the metrics). Bad input (no pairs, sizes that differ, unreadable files)
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segsr_jax.evaluation import (
    BASELINES,
    EvaluationError,
    evaluate_folders,
    format_table,
    load_segmenter,
    semantic_labels,
    write_results,
)

# Imported by scripts/tiny_experiment.py from this module.
__all__ = ["evaluate_folders", "load_segmenter", "main", "semantic_labels"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (see the module docstring)."""
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
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS-VGG (our JAX port)")
    p.add_argument("--lq", help="folder of the LQ inputs (for --baseline and --html)")
    p.add_argument(
        "--baseline",
        action="append",
        choices=BASELINES,
        default=[],
        help="also score this upscaling of the --lq images (repeatable)",
    )
    p.add_argument("--html", action="store_true", help="also write <out>/index.html")
    p.add_argument("--per-image", action="store_true", help="print a row per image")
    p.add_argument("--name", help="name of this run in the table and JSON (default: --pred's)")
    args = p.parse_args(argv)
    args.baseline = list(dict.fromkeys(args.baseline))
    if args.baseline and not args.lq:
        p.error("--baseline needs --lq (the LQ inputs the predictions were made from)")
    name = args.name or Path(args.pred).name
    if name in args.baseline:
        p.error(f"the run's name {name!r} is a baseline's; choose another with --name")
    return args


def run(args: argparse.Namespace) -> int:
    """Evaluate, print and write; returns the exit status."""
    from segsr_jax import images
    from segsr_jax.evaluation import (
        load_lpips_if_fetched,
        load_niqe_params,
        make_upscaler,
        pair_folders,
        write_baseline,
    )
    from segsr_jax.evaluation.pairing import LQ_SUFFIXES, index_folder, read_image
    from segsr_jax.weights.checkpoint_files import CheckpointError

    errors: tuple[type[Exception], ...] = (
        EvaluationError,
        images.ImageError,
        FileNotFoundError,
        CheckpointError,
    )
    if args.segmenter:
        from segsr_jax.checkpoint import CheckpointMismatchError

        errors += (CheckpointMismatchError,)
    out = Path(args.out or args.pred)
    try:
        niqe_params = load_niqe_params(args.niqe_params) if args.niqe_params else None
        if args.segmenter and not args.labels:
            raise EvaluationError("--segmenter needs --labels")
        segmenter = load_segmenter(args.segmenter) if args.segmenter else None
        lpips_notes: list[str] = []
        lpips = None if args.no_lpips else load_lpips_if_fetched(lpips_notes)
        common = dict(
            labels=args.labels,
            segmenter=segmenter,
            segmenter_path=args.segmenter,
            crop_border=args.crop_border,
            y_channel=not args.rgb,
            niqe_params=niqe_params,
            use_pyiqa=not args.no_pyiqa,
            lpips=lpips,
        )
        evaluations = [
            evaluate_folders(args.pred, args.gt, seg_pred=args.seg_pred, name=args.name, **common)
        ]
        pairs = pair_folders(args.pred, args.gt)[0]
        lq = index_folder(args.lq, LQ_SUFFIXES) if args.lq else {}
        sizes = {pair.stem: read_image(pair.gt).shape[:2] for pair in pairs}
        baseline_dirs = {}
        for name in args.baseline:
            folder = write_baseline(make_upscaler(name), lq, sizes, out / "baselines" / name)
            baseline_dirs[name] = folder
            evaluations.append(evaluate_folders(folder, args.gt, name=name, **common))
        if args.no_lpips:
            lpips_notes.append("LPIPS-VGG skipped (--no-lpips)")
        for ev in evaluations:
            ev.notes[:0] = lpips_notes
        print(format_table(evaluations, per_image=args.per_image))
        csv_path, json_path = write_results(evaluations, out)
        print(f"wrote {csv_path} and {json_path}")
        if args.html:
            names = tuple(segmenter.config.id2label) if segmenter is not None else ()
            print(f"wrote {write_html(args, evaluations, pairs, lq, baseline_dirs, out, names)}")
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def write_html(
    args, evaluations, pairs, lq, baseline_dirs, out: Path, class_names: tuple[str, ...]
) -> Path:
    """``<out>/index.html`` (:mod:`segsr_jax.report`) of these evaluations; the legend names
    classes by ``class_names`` (the segmenter's)."""
    from segsr_jax import report
    from segsr_jax.evaluation import header
    from segsr_jax.evaluation.pairing import SEG_PRED_SUFFIXES, index_folder

    seg_labels = (
        index_folder(args.seg_pred, SEG_PRED_SUFFIXES)
        if args.seg_pred
        else index_folder(args.pred, ("_seg_labels",))  # the sampler writes them beside _sr
    )
    columns = evaluations[0].columns
    return report.write_report(
        out / "index.html",
        report.evaluation_items(
            evaluations, pairs, lq=lq, baseline_dirs=baseline_dirs, seg_labels=seg_labels
        ),
        title=f"Evaluation: {evaluations[0].name} against {Path(args.gt).name}",
        class_names=class_names,
        columns=columns,
        headers={c: header(c) for c in columns},
        summary={ev.name: ev.mean for ev in evaluations},
        notes=list(dict.fromkeys(n for ev in evaluations for n in ev.notes)),
    )


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
