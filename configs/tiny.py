"""Tiny SegSR from scratch on CPU on the bundled synthetic scenes, and the experiment's arms.

The stages run one after another, each starting from the previous one's checkpoint::

    python -m segsr_jax.train --config configs/tiny.py:vae   --workdir runs/tiny/vae
    python -m segsr_jax.train --config configs/tiny.py:sr    --workdir runs/tiny/sr
    python -m segsr_jax.train --config configs/tiny.py:seg   --workdir runs/tiny/seg
    python -m segsr_jax.train --config configs/tiny.py:joint --workdir runs/tiny/joint
    python -m segsr_jax.sample --checkpoint runs/tiny/joint/checkpoints --input IMAGES

``joint`` is full SegSR (the bundled model). The experiment's two other arms start from the
same ``seg`` checkpoint and get the same steps, batch and learning rate as ``joint``::

    python -m segsr_jax.train --config configs/tiny.py:sronly --workdir runs/tiny/sronly
    python -m segsr_jax.train --config configs/tiny.py:prior  --workdir runs/tiny/prior

(``sronly``: SRDM alone, C_t = 0, sampled with ``seg_prior="none"``; ``prior``: the bridge and
SRDM learn from a fixed segmenter's map of the LQ image, sampled with ``seg_prior="fixed"``.)
The evaluation segmenter (semantic fidelity) is a SegFormer trained on clean HR scenes::

    python -m segsr_jax.train --config configs/tiny.py:segmenter --workdir runs/tiny/segmenter

(``init_from`` defaults to ``runs/tiny/<previous stage>/checkpoints``; override it with
``--config.init_from=...`` when the workdirs live elsewhere.) The model: a VAE with factor 4,
a two-level UNet 32/64 wide, a two-stage SegFormer, 8 classes, and a character-level
tokenizer written into the checkpoint. Times are in the README's experiment table.

``--config.loss.seg_rollout_steps=4`` on ``joint`` trains SegDM on the sampler's own state
instead of the HR forward process (the README's "SegDM's trajectory": its map then no longer
falls over the last steps); off here, as the bundled model was trained.
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

NUM_CLASSES = 8
PREVIOUS = {"sr": "vae", "seg": "sr", "joint": "seg", "sronly": "seg", "prior": "seg"}
# name: (training stage, steps, learning rate, modules trained besides the stage's own)
STAGES = {
    "vae": ("vae", 1200, 1e-3, ()),
    "sr": ("sr", 2500, 5e-4, ("unet",)),
    "seg": ("seg", 1000, 5e-4, ("segformer",)),
    "joint": ("joint", 1200, 2e-4, ("unet",)),
    "sronly": ("sr", 1200, 2e-4, ("unet",)),
    "prior": ("prior", 1200, 2e-4, ("unet",)),
    "segmenter": ("segmenter", 1000, 1e-3, ()),
}
# How each name's checkpoint is sampled (the experiment's arms).
SEG_PRIOR = {"sronly": "none", "prior": "fixed"}
ARMS = ("sronly", "prior", "joint")
# The bridge's output heads start at zero; at the arms' learning rate they stay nearly shut for
# the 1200 steps (C_t at a tenth of the LQ latent's scale), so the bridge learns 10x faster.
# Arm sronly has no bridge: the multiplier changes nothing there.
BRIDGE_LR = {"bridge": 10.0}
# Sampling defaults the checkpoint carries for `python -m segsr_jax.sample` (the validation grid
# ignores them): the model works on small scenes, so inputs are enlarged only below 32 px (the
# sampler's default, 128, made a 48 px input 2.7x larger and ~50x slower to sample), and it
# attends over 32x32-latent tiles (128 px, twice the 64 px training crop) rather than the
# SD-sized 96: 2.6x faster on a 96 px input on CPU, more on larger ones (attention is
# quadratic in the tile); the same time and PSNR on the 48 px demo scene.
INFERENCE = dict(min_side=32, tile=32, tile_overlap=8)


def model_config() -> SegSRConfig:
    """The tiny architecture (1.6 M parameters)."""
    vae = VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text = CLIPTextConfig(
        vocab_size=CHAR_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        hidden_act="gelu",
        bos_token_id=CHAR_VOCAB_SIZE - 2,
        eos_token_id=CHAR_VOCAB_SIZE - 1,
        pad_token_id=CHAR_VOCAB_SIZE - 1,
    )
    unet = UNetConfig(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    bridge = BridgeConfig(
        latent_channels=4,
        seg_channels=8,
        hidden_channels=16,
        num_blocks=1,
        c_channels=4,
        i_channels=8,
        norm_groups=8,
    )
    controlnet = controlnet_config_from_unet(
        unet,
        dict(
            conditioning="latent",
            conditioning_channels=4 + 4,
            conditioning_embedding_out_channels=(16, 32),
        ),
    )
    segformer = SegFormerConfig(
        num_encoder_blocks=2,
        depths=(1, 1),
        sr_ratios=(2, 1),
        hidden_sizes=(16, 32),
        patch_sizes=(7, 3),
        strides=(4, 2),
        num_attention_heads=(1, 2),
        mlp_ratios=(2, 2),
        decoder_hidden_size=32,
        num_labels=NUM_CLASSES,
        id2label=class_names(NUM_CLASSES),
    )
    segdm = SegDMConfig(
        num_classes=NUM_CLASSES,
        embed_dim=8,
        feat_channels=32,
        cond_channels=8,
        hidden_channels=32,
        num_blocks=2,
        attention_blocks=(1,),
        num_heads=2,
        norm_groups=8,
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


def get_config(name: str = "vae") -> ConfigDict:
    """The tiny run ``name``: a stage of SegSR (``vae``, ``sr``, ``seg``, ``joint``), an
    experiment arm (``sronly``, ``prior``) or the evaluation ``segmenter``."""
    if name not in STAGES:
        raise ValueError(f"unknown tiny run {name!r}; choose one of {sorted(STAGES)}")
    stage, steps, lr, also_train = STAGES[name]
    c = ConfigDict()
    c.seed = 0
    c.num_steps = steps
    c.dtype = "float32"
    c.model = model_config().to_dict()
    c.init_from = f"runs/tiny/{PREVIOUS[name]}/checkpoints" if name in PREVIOUS else ""
    c.tokenizer = "char"

    c.train = ConfigDict(
        dict(
            stage=stage,
            also_train=also_train,
            accum_steps=1,
            remat="none",
            frozen_dtype="float32",
            prompt=dict(mode="tags", text="", dropout=0.5, max_tags=3),
        )
    )
    c.loss = ConfigDict(
        dict(
            lambda_seg=1.0,
            lambda_lq_seg=1.0 if stage == "seg" else 0.0,
            kl_weight=1e-6,
            perceptual_weight=1.0,
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
            warmup_steps=50,
            schedule="cosine",
            decay_steps=steps,
            end_factor=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            grad_clip=1.0,
            ema_decay=0.99,
            lr_multipliers=BRIDGE_LR if name in ARMS else {},
        )
    )

    c.data = ConfigDict(
        dict(
            source="synthetic",
            path="",
            labels="",
            num_examples=2048,
            source_seed=0,
            scene_size=96,
            crop_size=64,
            scale=4,
            hflip=True,
            global_batch_size=8,
            seed=0,
            num_workers=0,
            prefetch_batches=2,
        )
    )

    c.mesh = ConfigDict(dict(data=-1, fsdp=1))
    c.sharding = ConfigDict(
        dict(
            param_axes=[(r"(unet|controlnet)/.*kernel$", ("in", "out"))],
            logical_rules=[("in", None), ("out", "fsdp")],
            min_size=2**16,
        )
    )

    c.checkpoint = ConfigDict(dict(every=200, keep_last=2, keep_every=0, async_save=True))
    c.log = ConfigDict(dict(every=20, tensorboard=True))
    c.sample = ConfigDict(
        dict(
            every=0 if stage in ("vae", "segmenter") else steps,
            num_images=8,
            options=dict(
                sampler="ddim",
                steps=10,
                guidance=1.0,
                prompt="",
                negative_prompt="",
                color_fix="adain",
                seed=0,
                seg_prior=SEG_PRIOR.get(name, "diffusion"),
                **INFERENCE,
            ),
        )
    )
    return c
