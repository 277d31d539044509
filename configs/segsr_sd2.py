"""SegSR at paper scale: SD-2-base (UNet, VAE, OpenCLIP-H text) + SegFormer-B5 (ADE20K).

Starts from a SegSR checkpoint made by ``python -m segsr_jax.convert`` from
``stabilityai/stable-diffusion-2-base`` and ``nvidia/segformer-b5-finetuned-ade-640-640``
(the ControlNet copied from the UNet, SegDM and the bridge fresh), and trains on 512 px crops of
a pseudo-labelled dataset prepared with ``python -m segsr_jax.label`` and
``python -m segsr_jax.data.prepare``::

    python -m segsr_jax.train --config configs/segsr_sd2.py:sr --workdir runs/sd2/sr \\
        --config.init_from=ckpt/segsr_sd2_converted --config.data.path=data/lsdir_shards
    python -m segsr_jax.train --config configs/segsr_sd2.py:seg --workdir runs/sd2/seg \\
        --config.init_from=runs/sd2/sr/checkpoints --config.data.path=...
    python -m segsr_jax.train --config configs/segsr_sd2.py:joint --workdir runs/sd2/joint \\
        --config.init_from=runs/sd2/seg/checkpoints --config.data.path=...

Optimiser (SeeSR's): AdamW lr 5e-5, betas (0.9, 0.999), weight decay 1e-2, grad
clip 1.0, constant after 500 warm-up steps, effective batch 32, text dropped with p = 0.5.
Parallelism: bf16 compute with float32 master weights; FSDP over 4 devices (the UNet and
ControlNet kernels split their output channels), data parallel over the rest; the global batch
is split over every device.
"""

from ml_collections import ConfigDict

from segsr_jax import parallel
from segsr_jax.diffusion.options import SEESR_NEGATIVE_PROMPT, SEESR_PROMPT
from segsr_jax.models.bridge import BridgeConfig
from segsr_jax.models.seg_encoder import SegFormerConfig
from segsr_jax.models.segdm import SegDMConfig
from segsr_jax.models.segsr import SegSRConfig
from segsr_jax.models.text_encoder import CLIPTextConfig
from segsr_jax.models.unet import UNetConfig
from segsr_jax.models.vae import VAEConfig

NUM_CLASSES = 150  # ADE20K


def model_config() -> SegSRConfig:
    """SD-2-base + SegFormer-B5 with the default SegDM and bridge (1.75 B parameters): the
    architecture ``python -m segsr_jax.convert`` writes (``SegSRConfig.compose``), so the
    converted checkpoint restores into it."""
    bridge = BridgeConfig(
        latent_channels=4,
        seg_channels=16,
        hidden_channels=128,
        num_blocks=2,
        c_channels=4,
        i_channels=64,
        norm_groups=32,
    )
    segformer = SegFormerConfig.b5(NUM_CLASSES)
    segdm = SegDMConfig(
        num_classes=NUM_CLASSES,
        embed_dim=16,
        feat_channels=segformer.decoder_hidden_size,
        cond_channels=64,
        hidden_channels=256,
        num_blocks=4,
        attention_blocks=(1, 3),
        num_heads=4,
        norm_groups=32,
        bit_scale=0.01,
    )
    return SegSRConfig.compose(
        vae=VAEConfig.sd2(),
        text=CLIPTextConfig.sd2(),
        unet=UNetConfig.sd2_base(),
        segformer=segformer,
        segdm=segdm,
        bridge=bridge,
        class_names=segformer.id2label,
    )


def get_config(stage: str = "sr") -> ConfigDict:
    """The paper-scale run of ``stage`` (``sr``, ``seg`` or ``joint``)."""
    c = ConfigDict()
    c.seed = 0
    c.num_steps = {"sr": 100_000, "seg": 40_000, "joint": 60_000}[stage]
    c.dtype = "bfloat16"
    c.model = model_config().to_dict()
    c.init_from = ""  # required: the converted checkpoint, or the previous stage's run
    c.tokenizer = "from_init"

    # remat 'none': on the CPU memory plan (benchmarks/RESULTS.md) 'blocks' did not lower the
    # peak (0.7 GiB higher at per-chip batch 1); try --config.train.remat=blocks on hardware.
    # frozen_dtype bfloat16: the frozen UNet/VAE/CLIP/SegFormer matrices (1.39 B params) are
    # stored in bf16, the dtype the bf16 compute casts them to anyway: 2.6 GB less per copy,
    # what lets the full-size smoke run fit 24 GiB (scripts/sd2_smoke.py).
    c.train = ConfigDict(
        dict(
            stage=stage,
            also_train=(),
            accum_steps=1,
            remat="none",
            frozen_dtype="bfloat16",
            prompt=dict(mode="tags", text="", dropout=0.5, max_tags=8),
        )
    )
    c.loss = ConfigDict(
        dict(
            lambda_seg=1.0,
            lambda_lq_seg=0.0,
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
            learning_rate=5e-5,
            warmup_steps=500,
            schedule="constant",
            decay_steps=0,
            end_factor=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            grad_clip=1.0,
            ema_decay=0.9999,
        )
    )

    c.data = ConfigDict(
        dict(
            source="array_record",
            path="",
            labels="",
            num_examples=0,
            source_seed=0,
            scene_size=0,
            crop_size=512,
            scale=4,
            hflip=True,
            global_batch_size=32,
            seed=0,
            num_workers=8,
            prefetch_batches=2,
        )
    )

    c.mesh = ConfigDict(dict(data=-1, fsdp=4))
    # Conv / linear kernels of the UNet and ControlNet ([kh, kw, in, out], [in, out]) and the
    # text encoder's projections split their output channels over 'fsdp' (all multiples of
    # 64), its token embedding its vocabulary: parallel.FSDP_RULES, as `sample --fsdp` uses.
    c.sharding = ConfigDict(
        dict(
            param_axes=[(p, list(n)) for p, n in parallel.FSDP_RULES.param_axes],
            logical_rules=[list(r) for r in parallel.FSDP_RULES.logical_rules],
            min_size=parallel.FSDP_RULES.min_size,
        )
    )

    c.checkpoint = ConfigDict(dict(every=2000, keep_last=3, keep_every=20_000, async_save=True))
    c.log = ConfigDict(dict(every=50, tensorboard=True))
    c.sample = ConfigDict(
        dict(
            every=5000,
            num_images=8,
            options=dict(
                sampler="ddpm",
                steps=50,
                guidance=5.5,
                prompt=SEESR_PROMPT,
                negative_prompt=SEESR_NEGATIVE_PROMPT,
                color_fix="adain",
                seed=0,
            ),
        )
    )
    return c
