"""A tiny random SegSR for tests (built here, not read from configs/)."""

from __future__ import annotations

import jax
from flax import nnx

from segsr_jax.models.bridge import BridgeConfig
from segsr_jax.models.controlnet import controlnet_config_from_unet
from segsr_jax.models.seg_encoder import SegFormerConfig
from segsr_jax.models.segdm import SegDMConfig
from segsr_jax.models.segsr import SegSR, SegSRConfig
from segsr_jax.models.text_encoder import CLIPTextConfig
from segsr_jax.models.unet import UNetConfig
from segsr_jax.models.vae import VAEConfig

K = 4


def tiny_config(**overrides) -> SegSRConfig:
    """VAE with factor 2, a 2-level UNet of width 16/32, a 2-stage SegFormer, K=4 classes."""
    vae = VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        hidden_act="gelu",
        eos_token_id=2,
        bos_token_id=0,
        pad_token_id=1,
    )
    unet = UNetConfig(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=16,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    bridge = BridgeConfig(
        latent_channels=4,
        seg_channels=4,
        hidden_channels=8,
        num_blocks=1,
        c_channels=2,
        i_channels=3,
        norm_groups=4,
    )
    cn = controlnet_config_from_unet(
        unet,
        dict(
            conditioning="latent",
            conditioning_channels=4 + 2,
            conditioning_embedding_out_channels=(8, 8),
        ),
    )
    seg = SegFormerConfig(
        num_encoder_blocks=2,
        depths=(1, 1),
        sr_ratios=(2, 1),
        hidden_sizes=(8, 16),
        patch_sizes=(7, 3),
        strides=(4, 2),
        num_attention_heads=(1, 2),
        mlp_ratios=(2, 2),
        decoder_hidden_size=8,
        num_labels=K,
    )
    segdm = SegDMConfig(
        num_classes=K,
        embed_dim=4,
        feat_channels=8,
        cond_channels=3,
        hidden_channels=8,
        num_blocks=1,
        attention_blocks=(0,),
        num_heads=2,
        norm_groups=4,
    )
    cfg = dict(
        vae=vae, text=text, unet=unet, controlnet=cn, segformer=seg, segdm=segdm, bridge=bridge
    )
    cfg.update(overrides)
    return SegSRConfig(**cfg)


def tiny_model(seed: int = 0, **overrides) -> SegSR:
    """A tiny random SegSR. Initialised from an RBG key: the default threefry initialisers
    compile one XLA program per parameter shape, which made this take ~40 s on 2 cores."""
    key = jax.random.key(seed, impl="rbg")
    return SegSR(tiny_config(**overrides), rngs=nnx.Rngs(key))


def save_checkpoint(path, model: SegSR, sampling: dict | None = None):
    """Save ``model`` as a sampleable checkpoint folder with a tiny CLIP tokenizer."""
    from segsr_jax import checkpoint
    from tests.models.test_text_encoder import _write_sd2_style_folder

    checkpoint.save_model(
        path, model, {"model": model.config.to_dict(), "sampling": dict(sampling or {})}
    )
    _write_sd2_style_folder(
        path / "tokenizer", max_length=model.config.text.max_position_embeddings
    )
    return path
