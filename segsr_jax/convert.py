"""``python -m segsr_jax.convert``: diffusers / transformers checkpoints -> one SegSR checkpoint.

::

    python -m segsr_jax.convert --pipeline stable-diffusion-2-base/ \\
        --segformer segformer-b5-finetuned-ade-640-640/ --output checkpoints/segsr_sd2

Reads the pipeline folder's ``vae/``, ``text_encoder/``, ``unet/`` and ``tokenizer/`` and the
SegFormer folder (all offline), starts the SRDM ControlNet as a copy of the UNet encoder with
latent conditioning (its new layers zero-initialised, so the untrained SRDM equals the UNet),
initialises SegDM and the bridge (the bridge's heads at zero), and writes an Orbax checkpoint
with the model config and the tokenizer inside. Training (``segsr_jax.train``) starts from it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    """The command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m segsr_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pipeline",
        required=True,
        help="diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/)",
    )
    p.add_argument(
        "--segformer",
        default=None,
        help="transformers SegFormer folder (config.json + model.safetensors); "
        "without it a randomly initialised SegFormer of --segformer-variant "
        "is used and must be trained",
    )
    p.add_argument("--segformer-variant", default="b5", choices=[f"b{i}" for i in range(6)])
    p.add_argument(
        "--num-classes",
        type=int,
        default=150,
        help="classes of a random SegFormer (ignored with --segformer)",
    )
    p.add_argument("--output", required=True, help="checkpoint folder to create")
    p.add_argument(
        "--prediction-type",
        default=None,
        choices=("epsilon", "v_prediction"),
        help="default: from the pipeline's scheduler/scheduler_config.json",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


def _prediction_type(pipeline: Path) -> str:
    import json

    cfg = pipeline / "scheduler" / "scheduler_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("prediction_type", "epsilon")
    return "epsilon"


def convert(
    pipeline: str | Path,
    output: str | Path,
    *,
    segformer: str | Path | None = None,
    segformer_variant: str = "b5",
    num_classes: int = 150,
    prediction_type: str | None = None,
) -> Path:
    """Convert and write the checkpoint; returns its folder. See the module docstring."""
    from flax import nnx

    from segsr_jax import checkpoint, weights
    from segsr_jax.models.controlnet import controlnet_from_unet
    from segsr_jax.models.seg_encoder import SegFormer, SegFormerConfig
    from segsr_jax.models.segsr import SegSR, SegSRConfig

    pipeline, output = Path(pipeline), Path(output)
    print(f"reading {pipeline}")
    vae = weights.load_vae(pipeline)
    text = weights.load_text_encoder(pipeline)
    unet = weights.load_unet(pipeline)
    weights.load_tokenizer(pipeline)  # fail now, not after the slow part, if it is missing
    if segformer is not None:
        print(f"reading {segformer}")
        seg = weights.load_segformer(segformer)
    else:
        print(
            f"warning: no --segformer: SegFormer-{segformer_variant.upper()} starts from "
            "random weights",
            file=sys.stderr,
        )
        seg = SegFormer(getattr(SegFormerConfig, segformer_variant)(num_classes), rngs=nnx.Rngs(1))
    config = SegSRConfig.compose(
        vae=vae.config,
        text=text.config,
        unet=unet.config,
        segformer=seg.config,
        prediction_type=prediction_type or _prediction_type(pipeline),
    )
    controlnet = controlnet_from_unet(unet, config.controlnet, rngs=nnx.Rngs(2))
    model = SegSR(
        config,
        rngs=nnx.Rngs(3),
        parts={
            "vae": vae,
            "text_encoder": text,
            "unet": unet,
            "controlnet": controlnet,
            "segformer": seg,
        },
    )
    # Write next to the target and move into place only when complete.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        checkpoint.save_model(
            tmp,
            model,
            {
                "model": config.to_dict(),
                "sampling": {},
                "source": {"pipeline": str(pipeline), "segformer": str(segformer or "")},
            },
        )
        tok = pipeline / "tokenizer" if (pipeline / "tokenizer").is_dir() else pipeline
        shutil.copytree(tok, tmp / "tokenizer")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {output}")
    return output


def main(argv=None) -> int:
    """Run the command; returns the exit status."""
    args = parse_args(argv)
    from segsr_jax.weights import CheckpointError

    if Path(args.output).exists() and not args.overwrite:
        print(f"error: {args.output} exists (--overwrite to replace it)", file=sys.stderr)
        return 2
    try:
        convert(
            args.pipeline,
            args.output,
            segformer=args.segformer,
            segformer_variant=args.segformer_variant,
            num_classes=args.num_classes,
            prediction_type=args.prediction_type,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
