"""A small SegSR trained from scratch on one GPU (no pretrained weights).

Same four stages as ``configs/tiny.py`` at 256 px crops with an f=8 VAE (32x32 latents), a
three-level UNet 128/256/512 wide, a MiT-B0-sized SegFormer, 16 synthetic classes and the
character-level tokenizer; bf16 compute. Point ``data`` at your own labelled images with
``--config.data.source=folder --config.data.path=IMAGES --config.data.labels=LABELS``
(labels from ``python -m segsr_jax.label``; set the model's class count to match)::

    python -m segsr_jax.train --config configs/small.py:vae --workdir runs/small/vae
    python -m segsr_jax.train --config configs/small.py:sr --workdir runs/small/sr
    python -m segsr_jax.train --config configs/small.py:seg --workdir runs/small/seg
    python -m segsr_jax.train --config configs/small.py:joint --workdir runs/small/joint
"""

from ml_collections import ConfigDict

from segsr_jax.data.synthetic import class_names
from segsr_jax.models.bridge import BridgeConfig
from segsr_jax.models.controlnet import controlnet_config_from_unet
from segsr_jax.models.seg_encoder import SegFormerConfig
from segsr_jax.models.segdm import SegDMConfig
from segsr_jax.models.segsr import SegSRConfig
from segsr_jax.models.text_encoder import CLIPTextConfig
from segsr_jax.models.unet import UNetConfig
from segsr_jax.models.vae import VAEConfig
from segsr_jax.training.prompts import CHAR_VOCAB_SIZE

NUM_CLASSES = 16
PREVIOUS = {"sr": "vae", "seg": "sr", "joint": "seg"}
# stage: (steps, learning rate, modules trained besides the stage's own)
STAGES = {
    "vae": (20_000, 2e-4, ()),
    "sr": (60_000, 1e-4, ("unet",)),
    "seg": (10_000, 1e-4, ("segformer",)),
    "joint": (20_000, 5e-5, ("unet",)),
}
# Sampling defaults the checkpoint carries for `python -m segsr_jax.sample` (the validation grid
# ignores them): the model is trained on 64 px LQ crops, so inputs are enlarged only below
# 64 px instead of the sampler's SD-sized 128.
INFERENCE = dict(min_side=64)


def model_config() -> SegSRConfig:
    """The small architecture (130 M parameters)."""
    vae = VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    )
    text = CLIPTextConfig(
        vocab_size=CHAR_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=96,
        hidden_act="gelu",
        bos_token_id=CHAR_VOCAB_SIZE - 2,
        eos_token_id=CHAR_VOCAB_SIZE - 1,
        pad_token_id=CHAR_VOCAB_SIZE - 1,
    )
    unet = UNetConfig(
        block_out_channels=(128, 256, 512),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=256,
        norm_num_groups=32,
        use_linear_projection=True,
    )
    bridge = BridgeConfig(
        latent_channels=4,
        seg_channels=16,
        hidden_channels=64,
        num_blocks=2,
        c_channels=4,
        i_channels=32,
        norm_groups=32,
    )
    controlnet = controlnet_config_from_unet(
        unet,
        {
            "conditioning": "latent",
            "conditioning_channels": 4 + bridge.c_channels,
            "conditioning_embedding_out_channels": (32, 64),
        },
    )
    segformer = SegFormerConfig(
        hidden_sizes=(32, 64, 160, 256),
        decoder_hidden_size=256,
        num_labels=NUM_CLASSES,
        id2label=class_names(NUM_CLASSES),
    )
    segdm = SegDMConfig(
        num_classes=NUM_CLASSES,
        embed_dim=16,
        feat_channels=256,
        cond_channels=32,
        hidden_channels=128,
        num_blocks=4,
        attention_blocks=(1, 3),
        num_heads=4,
        norm_groups=32,
    )
    return SegSRConfig(
        vae=vae,
        text=text,
        unet=unet,
        controlnet=controlnet,
        segformer=segformer,
        segdm=segdm,
        bridge=bridge,
        class_names=class_names(NUM_CLASSES),
    )


def get_config(stage: str = "vae") -> ConfigDict:
    """The small run of ``stage`` (``vae``, ``sr``, ``seg`` or ``joint``)."""
    steps, lr, also_train = STAGES[stage]
    c = ConfigDict()
    c.seed = 0
    c.num_steps = steps
    c.dtype = "bfloat16"
    c.model = model_config().to_dict()
    c.init_from = f"runs/small/{PREVIOUS[stage]}/checkpoints" if stage in PREVIOUS else ""
    c.tokenizer = "char"

    c.train = ConfigDict(
        dict(
            stage=stage,
            also_train=also_train,
            accum_steps=1,
            remat="none",
            frozen_dtype="float32",
            prompt=dict(mode="tags", text="", dropout=0.5, max_tags=4),
        )
    )
    c.loss = ConfigDict(
        dict(
            lambda_seg=1.0,
            lambda_lq_seg=1.0 if stage == "seg" else 0.0,
            kl_weight=1e-6,
            # joint: k > 0 trains SegDM on a k-step run of the model's own sampler (README,
            # "SegDM's trajectory"); k more forward passes of the whole model per step.
            seg_rollout_steps=0,
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
        )
    )
    c.optim = ConfigDict(
        dict(
            learning_rate=lr,
            warmup_steps=1000,
            schedule="cosine",
            decay_steps=steps,
            end_factor=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            grad_clip=1.0,
            ema_decay=0.999,
        )
    )

    c.data = ConfigDict(
        dict(
            source="synthetic",
            path="",
            labels="",
            num_examples=20_000,
            source_seed=0,
            scene_size=320,
            crop_size=256,
            scale=4,
            hflip=True,
            global_batch_size=16,
            seed=0,
            num_workers=8,
            prefetch_batches=2,
        )
    )

    c.mesh = ConfigDict(dict(data=-1, fsdp=1))
    c.sharding = ConfigDict(
        dict(
            param_axes=[(r"(unet|controlnet)/.*kernel$", ("in", "out"))],
            logical_rules=[("in", None), ("out", "fsdp")],
            min_size=2**18,
        )
    )

    c.checkpoint = ConfigDict(dict(every=2000, keep_last=3, keep_every=10_000, async_save=True))
    c.log = ConfigDict(dict(every=50, tensorboard=True))
    c.sample = ConfigDict(
        dict(
            every=0 if stage == "vae" else 5000,
            num_images=8,
            options=dict(
                sampler="ddim",
                steps=50,
                guidance=1.0,
                prompt="",
                negative_prompt="",
                color_fix="adain",
                seed=0,
                **INFERENCE,
            ),
        )
    )
    return c
