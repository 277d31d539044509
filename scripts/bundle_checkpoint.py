"""Copy a trained checkpoint into the package as the bundled default model.

    python scripts/bundle_checkpoint.py --source runs/photo/joint/checkpoints \\
        --output segsr_jax/assets/photo_checkpoint --steps 20 --sampler ddim --guidance 1.0 \\
        --min-side 32 --cleaner realesrgan --strength 0.05 --tile 32 --tile-overlap 8

Keeps only what sampling needs (the EMA parameters when present, the config with the given
sampling defaults, and the tokenizer), so the package stays small.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from flax import nnx

from segsr_jax import checkpoint
from segsr_jax.diffusion.options import CLEANERS, SampleOptions
from segsr_jax.models.segsr import SegSR, SegSRConfig


def main(argv=None) -> None:
    """Bundle the checkpoint."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", required=True)
    p.add_argument("--output", default="segsr_jax/assets/tiny_checkpoint")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--min-side", type=int, default=32)
    p.add_argument("--prompt", default="")
    p.add_argument("--tile", type=int, default=None, help="latent tile (default: the sampler's)")
    p.add_argument("--tile-overlap", type=int, default=None)
    p.add_argument("--color-fix", default=None, choices=("adain", "wavelet", "none"))
    p.add_argument("--cleaner", default=None, choices=CLEANERS)
    p.add_argument("--strength", type=float, default=None)
    p.add_argument(
        "--prompt-mode",
        default=None,
        choices=("fixed", "tags"),
        help="default: the source's sampling default, else tags for a model trained with "
        "seg-tag prompts",
    )
    args = p.parse_args(argv)

    def build(cfg):
        return SegSR(SegSRConfig.from_dict(cfg["model"]), rngs=nnx.Rngs(0))

    model, cfg = checkpoint.restore_model(args.source, build)
    sampling = {
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance": args.guidance,
        "min_side": args.min_side,
        "prompt": args.prompt,
        "negative_prompt": "",
    }
    optional = ("tile", "tile_overlap", "color_fix", "cleaner", "strength", "prompt_mode")
    sampling.update({k: getattr(args, k) for k in optional if getattr(args, k) is not None})
    # A model trained with seg-tag prompts samples with them (training's max_tags).
    trained = cfg.get("train", {}).get("train", {}).get("prompt", {})
    source = cfg.get("sampling", {})
    if "prompt_mode" not in sampling:
        mode = source.get("prompt_mode", "tags" if trained.get("mode") == "tags" else None)
        if mode is not None:
            sampling["prompt_mode"] = mode
    if sampling.get("prompt_mode") == "tags":
        sampling["max_tags"] = source.get("max_tags", trained.get("max_tags", 3))
    SampleOptions.from_dict(sampling)  # refuse settings no sampler can run, before writing
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    checkpoint.save_model(
        out, model, {"model": cfg["model"], "sampling": sampling, "source": str(args.source)}
    )
    shutil.copytree(Path(args.source) / "tokenizer", out / "tokenizer")
    print(f"bundled {args.source} -> {out}")


if __name__ == "__main__":
    main()
