"""``python -m segsr_jax.sample``: super-resolve images with a SegSR checkpoint.

With no flags it runs the bundled real-photo model on the two bundled demo photos. Per input image
``NAME`` it writes, into ``--output``:

* ``NAME_sr.png``: the super-resolved image (``upscale`` x the input size),
* ``NAME_seg.png`` / ``NAME_seg_labels.png``: the segmentation in colour / as raw labels,
* ``NAME_sheet.png``: LQ | SR | segmentation side by side.

Inputs whose names differ only in the extension (``pic.jpg``, ``pic.png``) get it in their
output names (``pic_jpg_sr.png``, ``pic_png_sr.png``). Outputs are written atomically; an
image whose outputs all exist is skipped unless ``--overwrite`` (so a killed or interrupted
batch resumes where it stopped: Ctrl-C stops at once, exit status 130). A bad input is
reported on one line naming the file, the others go on, and the exit status is 1 if any
failed.

A device out-of-memory (at compile or at run time) is retried with less at once: fewer tiles
per call (halved down to 1), then a smaller latent tile (halved down to
:data:`segsr_jax.inference.MIN_TILE`, the
overlap shrinking with it), then one image at a time; one line says each change, the reduced
setting is kept for the following images, and an image that fails even so is reported as
failed (exit status 1) while the others go on.

(Past 400 lines: over a third is the 25 flags and their help, and the resumable, OOM-tolerant
loop reads best whole; what a library user needs lives in segsr_jax.inference.)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# JAX-free, so --help stays instant: JAX is imported only after the arguments are parsed.
from segsr_jax.diffusion.options import (
    CLEANERS,
    PROMPT_MODES,
    SEG_GRIDS,
    SEG_MAPS,
    SampleOptions,
    parse_class_scale,
)
from segsr_jax.images import output_names, outputs_of, write_outputs


def bundled_paths() -> tuple[Path, Path]:
    """``(checkpoint, demo images)`` of the default: the real-photo model and two held-out,
    public-domain photos degraded x4 (``segsr_jax/assets/photo_checkpoint``, ``photos/``)."""
    root = Path(__file__).parent / "assets"
    return root / "photo_checkpoint", root / "photos"


def tiny_paths() -> tuple[Path, Path]:
    """``(checkpoint, demo scenes)`` of the miniature experiment's tiny model (synthetic
    texture scenes; ``segsr_jax/assets/tiny_checkpoint``, ``demo/``, ``demo_gt/``)."""
    root = Path(__file__).parent / "assets"
    return root / "tiny_checkpoint", root / "demo"


def parse_args(argv=None) -> argparse.Namespace:
    """The command-line flags (see ``--help``)."""
    ckpt, demo = bundled_paths()
    p = argparse.ArgumentParser(
        prog="python -m segsr_jax.sample",
        description=__doc__.split("\n\n(")[0],  # the note on this file's length is not help
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        default=str(ckpt),
        help="SegSR checkpoint folder (from segsr_jax.convert or training); "
        "default: the bundled real-photo model",
    )
    p.add_argument("--input", default=str(demo), help="an image file or a folder of images")
    p.add_argument("--output", default="outputs/sample", help="output folder")
    p.add_argument("--upscale", type=float, default=4.0, help="output size / input size")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the checkpoint's, else 50)",
    )
    p.add_argument(
        "--sampler",
        default=None,
        choices=("ddpm", "ddim", "dpmpp_2m"),
        help="default: the checkpoint's, else ddpm (SeeSR)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cleaner",
        default=None,
        choices=CLEANERS,
        help="first stage: realesrgan upscales the LQ with Real-ESRGAN x4plus before the "
        "diffusion model refines it (fetch its weights once: python -m "
        "segsr_jax.weights.fetch realesrgan); none: bicubic (default: the checkpoint's, "
        "else none)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="in (0, 1]: start from the LQ noised part of the way and run only the last "
        "strength x steps (keeps more of the input, costs fewer steps; default: the "
        "checkpoint's, else 1 as SeeSR)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="latent tile size (default: the checkpoint's, else 96)",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="latent tile overlap (default: the checkpoint's, else 32)",
    )
    p.add_argument(
        "--tiles-per-call",
        type=int,
        default=None,
        help="tiles denoised together (memory vs. speed; default: the "
        "checkpoint's, else 1 on CPU, where more is slower, and 4 on GPU/TPU)",
    )
    p.add_argument(
        "--color-fix",
        default=None,
        choices=("adain", "wavelet", "none"),
        help="default: the checkpoint's, else adain",
    )
    p.add_argument(
        "--min-side",
        type=int,
        default=None,
        help="LQ inputs with a shorter side are enlarged to it first (default: the "
        "checkpoint's, else 128 as SeeSR)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help=f"default: the checkpoint's, else {SampleOptions.prompt!r} (SeeSR)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help=f"default: the checkpoint's, else {SampleOptions.negative_prompt!r} (SeeSR)",
    )
    p.add_argument(
        "--prompt-mode",
        default=None,
        choices=PROMPT_MODES,
        help="tags: each image's prompt is the classes the LQ segmenter finds in it (what a "
        "model trained with seg-tag prompts saw), then --prompt; fixed: --prompt alone "
        "(default: the checkpoint's, else fixed)",
    )
    p.add_argument(
        "--seg-map",
        default=None,
        choices=SEG_MAPS,
        help="which segmentation NAME_seg.png holds: mean (SegDM's class probabilities "
        "averaged over the steps) or last (its last step; what a SegDM trained on the "
        "sampler's state should return) (default: the checkpoint's, else mean)",
    )
    p.add_argument(
        "--seg-grid",
        default=None,
        choices=SEG_GRIDS,
        help="the times SegDM is evaluated at: ddp (DDP's sampler grid, the last at 1/N of the "
        "first) or shared (the SR timesteps' own, the last at t = 0.001, where its map can "
        "drop; how results before 2026-12-04 were made) (default: the checkpoint's, else ddp)",
    )
    p.add_argument(
        "--class-scale",
        default=None,
        metavar="CLASS=SCALE,...",
        help="per-class generative strength, e.g. 'blue sky=0.3,dark foliage=1.5': where the "
        "segmentation sees the class, the generated change from the LQ is scaled (0 keeps "
        "the LQ, 1 as usual, >1 more detail); other classes keep 1",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="text guidance scale (default: the checkpoint's, else 5.5)",
    )
    p.add_argument(
        "--seg-prior",
        default=None,
        choices=("diffusion", "fixed", "none"),
        help="segmentation guidance: diffusion (SegSR: SegDM refined jointly), fixed "
        "(the LQ segmenter's map), none (SRDM alone); with fixed and none the "
        "written segmentation is the LQ segmenter's; default: the checkpoint's, "
        "else diffusion",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype; bfloat16 also stores the conv / dense / embedding "
        "weights in bfloat16 (norms stay float32): half the memory, for "
        "GPU/TPU; on CPU it is slower than float32",
    )
    p.add_argument(
        "--fsdp",
        type=int,
        default=1,
        help="shard the model's weights over this many devices (FSDP) for a model "
        "that does not fit one; the device count must be a multiple of it, "
        "and a batch is split over the remaining devices (default 1: every "
        "device holds the whole model)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="images of the same size sampled together"
    )
    p.add_argument("--overwrite", action="store_true", help="redo images already done")
    p.add_argument(
        "--report",
        action="store_true",
        help="also write OUTPUT/index.html: bicubic | SR sliders and segmentation overlays "
        "of every image, in one self-contained page (segsr_jax.report)",
    )
    p.add_argument(
        "--cache-dir",
        default=os.environ.get(
            "SEGSR_JAX_CACHE", str(Path.home() / ".cache" / "segsr_jax" / "xla")
        ),
        help="persistent XLA compilation cache ('' to disable)",
    )
    args = p.parse_args(argv)
    if not (math.isfinite(args.upscale) and args.upscale > 0):
        p.error(f"--upscale must be a positive number, not {args.upscale}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        p.error(f"--guidance must be a number >= 0, not {args.guidance}")
    for flag in ("steps", "tile", "tiles_per_call", "batch_size", "fsdp"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, not {value}")
    if args.class_scale is not None:
        try:
            args.class_scale = parse_class_scale(args.class_scale)
        except ValueError as e:
            p.error(f"--class-scale: {e}")
    if args.min_side is not None and args.min_side < 0:
        p.error(f"--min-side must be >= 0, not {args.min_side}")
    if args.tile_overlap is not None and args.tile_overlap < 0:
        p.error(f"--tile-overlap must be >= 0, not {args.tile_overlap}")
    if args.tile is not None and args.tile_overlap is not None:
        try:  # the options' own check; a checkpoint's tile is checked when it is known
            SampleOptions(tile=args.tile, tile_overlap=args.tile_overlap)
        except ValueError as e:
            p.error(f"{e} (--tile, --tile-overlap)")
    return args


@dataclass
class Job:
    """One input image on its way through the sampler."""

    path: Path
    lq: np.ndarray  # uint8 [h, w, 3] as read
    out_hw: tuple[int, int]  # final output size (upscale x input)
    work_hw: tuple[int, int]  # size the model sees (before padding)


def quiet_library_logs() -> None:
    """Hide library log lines that mean nothing to a user of this command: orbax's absl
    warnings (e.g. "Given directory is read only" for the installed bundled checkpoint) and
    transformers' "PyTorch was not found". Their errors still show; ours are printed."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers loads
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


@dataclass
class Progress:
    """What a run has done so far, for the message when it is interrupted."""

    written: int = 0
    total: int = 0


def _interrupt_once(signum, frame):
    # Ignore further SIGINTs (a second Ctrl-C; `timeout -s INT` signals twice) so that the
    # way out is not interrupted again halfway, printing tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run the command; returns the exit status (130 when interrupted by Ctrl-C)."""
    args = parse_args(argv)
    progress = Progress()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt_once) if in_main_thread else None
    try:
        status = run(args, progress)
        if args.report and status != 2:  # 2: nothing sampled (bad input, output or checkpoint)
            from segsr_jax.report import write_sample_report

            print(f"wrote {write_sample_report(args.input, args.output, args.checkpoint)}")
        return status
    except KeyboardInterrupt:
        # Outputs are written atomically: nothing partial is left, and a rerun resumes.
        print(
            f"interrupted: {progress.written} of {progress.total} images written; rerun the "
            "same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace, progress: Progress) -> int:
    """:func:`main` on parsed ``args``; counts the images written in ``progress``."""
    quiet_library_logs()
    from segsr_jax import images, parallel
    from segsr_jax.inference import (  # heavy imports after argument parsing
        Restorer,
        describe_setting,
        is_out_of_memory,
        shrink_after_oom,
    )

    if args.cache_dir:
        parallel.enable_compilation_cache(args.cache_dir)
    try:
        files = images.list_images(args.input)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        print(
            f"error: no images ({', '.join(images.IMAGE_SUFFIXES)}) in {args.input}",
            file=sys.stderr,
        )
        return 2
    # Before loading the model, so that a wrong --output fails in a second, not after sampling.
    out_dir = Path(args.output)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot use --output {out_dir} as the output folder: {e}", file=sys.stderr)
        return 2
    names = output_names(files)
    renamed = [f for f in files if names[f] != f.stem]
    if renamed:
        shown = ", ".join(f.name for f in renamed[:6]) + (", ..." if len(renamed) > 6 else "")
        print(
            f"note: inputs with the same name ({shown}) get their extension in their output "
            f"names, e.g. {renamed[0].name} -> {names[renamed[0]]}_sr.png",
            file=sys.stderr,
        )
    todo = [
        f
        for f in files
        if args.overwrite or not all(p.exists() for p in outputs_of(out_dir, names[f]))
    ]
    # A killed run leaves the temporary files of the writes it was in (images.write_atomic);
    # the images they belong to are redone now, so they go.
    stale = tuple(f".{p.name}." for f in todo for p in outputs_of(out_dir, names[f]))
    for leftover in out_dir.iterdir():
        if leftover.name.endswith(".tmp") and leftover.name.startswith(stale):
            leftover.unlink(missing_ok=True)
    skipped = len(files) - len(todo)
    if skipped:
        print(f"skipping {skipped} image(s) already done in {out_dir} (--overwrite to redo)")
    if not todo:
        return 0
    progress.total = len(todo)
    try:
        restorer = Restorer.from_checkpoint(args.checkpoint, dtype=args.dtype, fsdp=args.fsdp)
    except (OSError, ValueError) as e:
        print(f"error: cannot load checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    try:
        options = restorer.options(
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            tile=args.tile,
            tile_overlap=args.tile_overlap,
            tiles_per_call=args.tiles_per_call,
            color_fix=args.color_fix,
            min_side=args.min_side,
            seg_prior=args.seg_prior,
            seed=args.seed,
            strength=args.strength,
            cleaner=args.cleaner,
            prompt_mode=args.prompt_mode,
            seg_map=args.seg_map,
            seg_grid=args.seg_grid,
            class_scale=args.class_scale,
        )
        restorer.session.class_scale(options)  # names the model's classes when one is unknown
    except ValueError as e:  # e.g. --tile against the checkpoint's overlap
        print(f"error: {e} (the flags over the checkpoint's defaults)", file=sys.stderr)
        return 2
    if options.cleaner != "none":
        try:
            restorer.cleaner(options.cleaner)
        except (OSError, ValueError) as e:  # weights not fetched, or not loadable
            print(f"error: cleaner {options.cleaner}: {e}", file=sys.stderr)
            return 2
    print(
        f"model: {args.checkpoint} | sampler {options.sampler}, {options.denoising_steps} "
        f"steps{'' if options.strength == 1 else f' (strength {options.strength})'}, "
        f"guidance {options.guidance}, seg prior {options.seg_prior}, {args.dtype}"
        + ("" if options.cleaner == "none" else f", cleaner {options.cleaner}")
    )

    from tqdm import tqdm

    failed = 0
    jobs: list[Job] = []
    for path in todo:
        try:
            lq = images.read_image(path)
            jobs.append(Job(path, lq, *restorer.sizes(lq.shape[:2], args.upscale, options)))
        except images.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    # Same-size images share a compiled program and may share a batch.
    jobs.sort(key=lambda j: j.work_hw)
    batches = [
        chunk[i : i + args.batch_size]
        for _, group in itertools.groupby(jobs, key=lambda j: j.work_hw)
        for chunk in [list(group)]
        for i in range(0, len(chunk), args.batch_size)
    ]
    latent_factor = restorer.config.latent_factor
    max_batch = args.batch_size  # lowered to 1 after an out-of-memory (see shrink_after_oom)
    pending = collections.deque(batches)
    with tqdm(
        total=len(jobs) * options.denoising_steps,
        unit="step",
        desc="sampling",
        disable=None,
        dynamic_ncols=True,
    ) as bar:
        while pending:
            batch = pending.popleft()
            if len(batch) > max_batch:
                pending.extendleft(
                    reversed([batch[i : i + max_batch] for i in range(0, len(batch), max_batch)])
                )
                continue
            t0 = time.perf_counter()
            try:
                results, compile_s = restorer.restore_batch(
                    [j.lq for j in batch], batch[0].work_hw, options
                )
            except (ValueError, MemoryError) as e:
                print(f"error: {', '.join(str(j.path) for j in batch)}: {e}", file=sys.stderr)
                failed += len(batch)
                bar.update(len(batch) * options.denoising_steps)
                continue
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                latent_hw = tuple(-(-s // latent_factor) for s in batch[0].work_hw)
                now = describe_setting(options, len(batch), latent_hw)
                smaller = shrink_after_oom(options, len(batch), latent_hw)
                if smaller is None:
                    bar.write(
                        f"error: {', '.join(str(j.path) for j in batch)}: out of memory "
                        f"even at {now}, the smallest setting; skipped",
                        file=sys.stderr,
                    )
                    failed += len(batch)
                    bar.update(len(batch) * options.denoising_steps)
                    continue
                options, n, change = smaller
                max_batch = min(max_batch, n)
                bar.write(f"out of memory at {now}: retrying with {change}", file=sys.stderr)
                pending.appendleft(batch)
                continue
            run_s = time.perf_counter() - t0 - compile_s
            for job, result in zip(batch, results, strict=True):
                write_outputs(
                    outputs_of(out_dir, names[job.path]),
                    job.lq,
                    job.out_hw,
                    *result,
                    restorer.num_classes,
                )
                progress.written += 1
            bar.update(len(batch) * options.denoising_steps)
            msg = f"{', '.join(j.path.name for j in batch)}: {run_s:.2f} s"
            if compile_s:
                msg += f" (+ {compile_s:.1f} s compile)"
            bar.write(msg)
    done = sum(1 for j in jobs if all(p.exists() for p in outputs_of(out_dir, names[j.path])))
    print(f"wrote {done} image(s) to {out_dir}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    status = main()
    if status == 130:
        # The interrupted sampler call still runs on XLA's threads (JAX cannot cancel it), and
        # a normal interpreter exit waits for it, then may crash tearing it down. Every file
        # written is complete (written atomically), so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
