"""How long the photo architecture (configs/photo.py) takes to restore a 128x96 photo on CPU.

    python benchmarks/photo_speed.py [--steps 20] [--config tiny]
    python benchmarks/photo_speed.py --checkpoint segsr_jax/assets/photo_checkpoint

Builds the model with random weights (speed does not depend on the values), saves it as a
sampleable checkpoint with the bundled model's character tokenizer and the config's sampling
defaults, and runs ``python -m segsr_jax.sample`` twice on one 128x96 image: the CLI prints
the sampling time and, separately, the compile time. ``--config tiny`` measures the bundled
tiny architecture the same way, for comparison. ``--checkpoint`` times a trained checkpoint
with its own sampling defaults instead (e.g. the bundled one, first stage included).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="photo", choices=["photo", "tiny"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint", default=None, help="time this checkpoint as it is")
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    from segsr_jax import checkpoint
    from segsr_jax.evaluation import tables
    from segsr_jax.images import write_png
    from segsr_jax.models.segsr import SegSR, SegSRConfig

    work = Path(tempfile.mkdtemp(prefix="photo_speed_"))
    if args.checkpoint:  # as trained, with its own sampling defaults
        ckpt = Path(args.checkpoint).resolve()
        model, _ = checkpoint.restore_model(
            ckpt, lambda c: SegSR(SegSRConfig.from_dict(c["model"]), rngs=nnx.Rngs(0))
        )
        name = str(args.checkpoint)
    else:
        cfg_module = importlib.import_module(f"configs.{args.config}")
        model = SegSR(cfg_module.model_config(), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        sampling = dict(
            sampler="ddim", steps=args.steps, guidance=1.0, prompt="", **cfg_module.INFERENCE
        )
        ckpt = work / "ckpt"
        checkpoint.save_model(ckpt, model, {"model": model.config.to_dict(), "sampling": sampling})
        shutil.copytree(ROOT / "segsr_jax/assets/tiny_checkpoint/tokenizer", ckpt / "tokenizer")
        name = args.config
    params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    write_png(work / "in" / "photo.png", rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    print(f"{name}: {params:,} params; {tables.cpu_model()}; jax {jax.__version__}")
    for run in (1, 2):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "segsr_jax.sample",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(work / "in"),
                "--output",
                str(work / f"out{run}"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "photo.png" in ln]
        print(f"run {run}: " + (" | ".join(lines) or out.stderr[-2000:]))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
