"""A validation set for choosing the real-photo model's sampling settings, from training photos.

    python scripts/photo_validation.py --images data/photo/images --out data/photo/validation

Held-out means held out: the held-out evaluation photos (``scripts/fetch_heldout.py``) may
not be used to choose anything, so settings such as the cleaner or the strength are chosen
here instead, on centre crops of some of the *training* photos (their 384 px versions, every
``--every``-th in sorted order), degraded x4 with the training degradation from a seed made
from each file name, exactly as the held-out set is. The model has seen these photos in
training (as random 64 px crops of freshly degraded copies), so scores here flatter it; they
rank settings, they are not results.

Writes ``<out>/hr/<name>.png`` (``--crop`` x ``--crop`` centre crop), ``<out>/lq/<name>.png``
and ``<out>/bicubic/<name>_sr.png`` (so ``python -m segsr_jax.evaluate`` can score
baselines with no model), the layout of the held-out set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.fetch_heldout import make_lq, photo_seed  # noqa: E402
from segsr_jax import images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="data/photo/images", help="prepare_photos.py's images/")
    p.add_argument("--out", default="data/photo/validation")
    p.add_argument("--every", type=int, default=7, help="take every N-th 384 px photo")
    p.add_argument("--crop", type=int, default=256, help="HR centre crop side (multiple of 4)")
    args = p.parse_args(argv)
    photos = sorted(Path(args.images).rglob("*_s384.png"))[:: args.every]
    if not photos:
        print(f"error: no *_s384.png photos under {args.images}", file=sys.stderr)
        return 1
    out = Path(args.out)
    for path in photos:
        img = images.read_image(path)
        h, w = img.shape[:2]
        c = min(args.crop, h, w) // 4 * 4
        y, x = (h - c) // 2, (w - c) // 2
        name = path.stem.removesuffix("_s384")
        hr, lq = make_lq(np.ascontiguousarray(img[y : y + c, x : x + c]), photo_seed(name))
        images.write_png(out / "hr" / f"{name}.png", hr)
        images.write_png(out / "lq" / f"{name}.png", lq)
        images.write_png(out / "bicubic" / f"{name}_sr.png", images.resize(lq, hr.shape[:2]))
    print(f"{len(photos)} validation photos -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
