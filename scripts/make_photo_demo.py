"""The bundled demo photos: 128x96 crops of held-out LQ photos that are in the public domain.

    python scripts/fetch_heldout.py                 # the held-out set, degraded x4
    python scripts/make_photo_demo.py               # -> segsr_jax/assets/photos/

Two of the eight held-out photos are public domain (docs/realphoto/heldout.md): scikit-image's
``astronaut`` (NASA) and ``rocket`` (SpaceX). Their LQ images (the training degradation, x4)
are cropped to 128x96, the size the photo model's speed target is set for, so both demo inputs
share one compiled sampler. Crops of the same LQ the evaluation uses: the demo shows nothing
the held-out table does not score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segsr_jax import images  # noqa: E402
from segsr_jax.weights.fetch import cache_dir  # noqa: E402

# name: (top, left) of the 96 x 128 crop in its LQ image (LQ pixels).
CROPS = {"astronaut": (4, 0), "rocket": (5, 16)}
SIZE_HW = (96, 128)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", default=None, help="default: <cache>/heldout")
    p.add_argument("--output", default=str(ROOT / "segsr_jax" / "assets" / "photos"))
    args = p.parse_args(argv)
    heldout = Path(args.heldout) if args.heldout else cache_dir() / "heldout"
    for name, (y, x) in CROPS.items():
        path = heldout / "lq" / f"{name}.png"
        if not path.is_file():
            print(f"error: {path} missing: run `python scripts/fetch_heldout.py`", file=sys.stderr)
            return 1
        lq = images.read_image(path)
        h, w = SIZE_HW
        images.write_png(Path(args.output) / f"{name}.png", lq[y : y + h, x : x + w])
    print(f"{len(CROPS)} demo photos -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
