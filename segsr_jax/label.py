"""Pseudo-labels for an image folder from a SegFormer checkpoint.

    python -m segsr_jax.label --checkpoint SEGFORMER_DIR --images DIR --output DIR \
        [--window 512] [--overlap 128] [--batch-size 8] [--dtype float32|bfloat16]

Real SR datasets (LSDIR, DIV2K, ...) have no masks; SegSR trains on SegFormer's labels of the HR
images. Every image is cut into `window`-sized tiles overlapping by at least `overlap` (images
smaller than a window are edge-padded to one), tiles from consecutive images are batched into one
jitted program of static shape, and each output pixel is taken from the tile in which it lies most
centrally, so every pixel is labelled with at least `overlap / 2` pixels of context on each side
that has image. Labels are the argmax of the logits upsampled bilinearly to the tile size (as
transformers' `post_process_semantic_segmentation`).

Output: `<output>/<stem>.png` (uint8 class ids, the layout `ImageFolderSource(labels=...)`
reads) and `<output>/histogram.json` (pixels and images per class, with the class names, and
the corrupt inputs skipped). Resumable: images whose PNG exists are skipped; PNGs are written
under a temporary name and renamed, so an interrupted run leaves no half-written label.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segsr_jax.data.sources import CorruptRecordError, decode_image, list_images
from segsr_jax.images import write_png
from segsr_jax.models.seg_encoder import normalize_images, resize_bilinear
from segsr_jax.tiles import owned_ranges, tile_starts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Job:
    """One image in flight: its label map fills up as its tiles come back."""

    out_path: pathlib.Path
    label: np.ndarray  # uint8 [H, W]
    remaining: int


def segment(seg, images: jax.Array) -> jax.Array:
    """A SegFormer's labels of uint8 RGB ``images [B, H, W, 3]`` -> uint8 ``[B, H, W]``: the
    logits (1/4 resolution) upsampled bilinearly to the images' own size, then the argmax (as
    transformers' ``post_process_semantic_segmentation``)."""
    logits, _ = seg(normalize_images(images))
    logits = resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


@functools.cache
def make_segment_fn(graphdef):
    """Jitted ``(state, images uint8 [B, H, W, 3]) -> labels uint8 [B, H, W]``
    (:func:`segment`); cached per model structure, so every caller with the same SegFormer
    shares one compiled program per input shape. Used for label windows here and for whole
    images by :mod:`segsr_jax.evaluation`."""

    def segment_fn(state, images):
        return segment(nnx.merge(graphdef, state), images)

    return jax.jit(segment_fn)


class _Labeller:
    """Queues tiles across images and runs them in batches of a fixed size."""

    def __init__(self, seg, window: int, overlap: int, batch_size: int):
        graphdef, self.state = nnx.split(seg)
        self.label_fn = make_segment_fn(graphdef)
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.tiles: list[np.ndarray] = []
        self.places: list[tuple] = []

    def add(self, image: np.ndarray, out_path: pathlib.Path) -> None:
        h, w = image.shape[:2]
        padded = np.pad(
            image, ((0, max(self.window - h, 0)), (0, max(self.window - w, 0)), (0, 0)), mode="edge"
        )
        ys = tile_starts(h, self.window, self.overlap)
        xs = tile_starts(w, self.window, self.overlap)
        job = _Job(out_path, np.zeros((h, w), np.uint8), len(ys) * len(xs))
        for y, (y0, y1) in zip(ys, owned_ranges(ys, h, self.window), strict=True):
            for x, (x0, x1) in zip(xs, owned_ranges(xs, w, self.window), strict=True):
                self.tiles.append(padded[y : y + self.window, x : x + self.window])
                self.places.append((job, y, x, y0, y1, x0, x1))
                if len(self.tiles) == self.batch_size:
                    self.flush()

    def flush(self) -> None:
        """Runs the queued tiles (zero-padded to the batch size: one compiled shape)."""
        if not self.tiles:
            return
        n = len(self.tiles)
        batch = np.zeros((self.batch_size, self.window, self.window, 3), np.uint8)
        batch[:n] = np.stack(self.tiles)
        labels = np.asarray(jax.device_get(self.label_fn(self.state, batch)))
        for tile_label, (job, y, x, y0, y1, x0, x1) in zip(labels, self.places, strict=False):
            job.label[y0:y1, x0:x1] = tile_label[y0 - y : y1 - y, x0 - x : x1 - x]
            job.remaining -= 1
            if job.remaining == 0:
                write_png(job.out_path, job.label)  # atomic: a killed run leaves no half PNG
        self.tiles, self.places = [], []


def label_folder(
    seg, images: str, output: str, *, window: int = 512, overlap: int = 128, batch_size: int = 8
) -> dict:
    """Labels every image under `images` that has no label in `output` yet; returns (and
    writes to `output/histogram.json`) the class histogram over all labels of the folder."""
    names = seg.config.id2label
    if len(names) > 255:
        raise ValueError(f"{len(names)} classes do not fit uint8 labels with 255 as ignore")
    if window % 32 or not 0 <= overlap < window:
        raise ValueError(
            f"window must be a multiple of 32 and 0 <= overlap < window, got {window}, {overlap}"
        )
    out = pathlib.Path(output)
    found = list_images(images)
    labeller = _Labeller(seg, window, overlap, batch_size)
    corrupt, skipped = [], 0
    for stem, path in found.items():
        target = out / f"{stem}.png"
        if target.exists():
            skipped += 1
            continue
        try:
            image = decode_image(path.read_bytes())
        except (CorruptRecordError, OSError) as e:
            log.warning("skipping corrupt image %s: %s", path, e)
            corrupt.append([stem, str(e)])
            continue
        labeller.add(image, target)
    labeller.flush()
    log.info(
        "labelled %d images, %d already done, %d corrupt",
        len(found) - skipped - len(corrupt),
        skipped,
        len(corrupt),
    )

    pixels = np.zeros(len(names), np.int64)
    containing = np.zeros(len(names), np.int64)
    labelled = 0
    for stem in found:
        target = out / f"{stem}.png"
        if target.exists():
            counts = np.bincount(np.asarray(Image.open(target)).ravel(), minlength=len(names))
            pixels += counts[: len(names)]
            containing += counts[: len(names)] > 0
            labelled += 1
    histogram = {
        "images": labelled,
        "corrupt": corrupt,
        "classes": [
            {"id": i, "name": n, "pixels": int(p), "images": int(c)}
            for i, (n, p, c) in enumerate(zip(names, pixels, containing, strict=True))
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "histogram.json").write_text(json.dumps(histogram, indent=1))
    return histogram


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="transformers SegFormer folder")
    parser.add_argument("--images", required=True, help="image folder (searched recursively)")
    parser.add_argument("--output", required=True, help="label PNG folder")
    parser.add_argument("--window", type=int, default=512, help="tile side (multiple of 32)")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per jitted call")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from segsr_jax.weights import load_segformer
    from segsr_jax.weights.checkpoint_files import CheckpointError

    try:
        seg = load_segformer(args.checkpoint, dtype=jnp.dtype(args.dtype))
    except (CheckpointError, OSError) as e:
        print(f"error: cannot load a SegFormer from {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    histogram = label_folder(
        seg,
        args.images,
        args.output,
        window=args.window,
        overlap=args.overlap,
        batch_size=args.batch_size,
    )
    top = sorted(histogram["classes"], key=lambda c: -c["pixels"])[:10]
    corrupt = len(histogram["corrupt"])
    print(f"{histogram['images']} label maps in {args.output}; {corrupt} corrupt images skipped")
    print("most frequent classes: " + ", ".join(f"{c['name']} ({c['images']} images)" for c in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
