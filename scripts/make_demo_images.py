"""Write the bundled demo LQ images: held-out synthetic scenes through the Real-ESRGAN
degradation (the same pipeline the tiny model is trained on), plus their HR and labels.

    python scripts/make_demo_images.py --output segsr_jax/assets/demo [--count 3] [--size 192]

The LQ images (``NAME.png``) go to ``--output``; HR and label maps to ``--output``/../demo_gt
so the sampler's default input folder holds only the inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from segsr_jax import images
from segsr_jax.data.degradations import DegradationConfig, degrade
from segsr_jax.data.synthetic import SceneConfig, make_scene

# Training scenes use source seed 0; the demo's are held out.
DEMO_SEED = 10_001


def main(argv=None) -> None:
    """Write the demo images."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", default="segsr_jax/assets/demo")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--size", type=int, default=192, help="HR side (LQ side = size / 4)")
    p.add_argument("--num-classes", type=int, default=8)
    args = p.parse_args(argv)
    out = Path(args.output)
    gt = out.parent / f"{out.name}_gt"
    cfg = SceneConfig(height=args.size, width=args.size, num_classes=args.num_classes)
    for i in range(args.count):
        hr, label = make_scene((DEMO_SEED, i), cfg)
        lq = degrade(hr, np.random.default_rng((DEMO_SEED, i)), DegradationConfig(scale=4))
        images.write_png(out / f"scene{i}.png", lq)
        images.write_png(gt / f"scene{i}_hr.png", hr)
        images.write_png(gt / f"scene{i}_label.png", label)
    print(f"wrote {args.count} demo images to {out} (ground truth in {gt})")


if __name__ == "__main__":
    main()
