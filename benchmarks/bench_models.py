"""The benchmark models: configs (medium, SD-2 size, tiny), host-random SegSR weights, and
the diffusers reference models with the same weights loaded through our converter.

Shared by ``sample_bench.py``, ``gpu_all.py``, ``large_image_bench.py`` and
``train_bench.py``; nothing here times anything.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segsr_jax import weights
from segsr_jax.models import layers
from segsr_jax.models.bridge import BridgeConfig
from segsr_jax.models.controlnet import ControlNet
from segsr_jax.models.seg_encoder import SegFormerConfig
from segsr_jax.models.segdm import SegDMConfig
from segsr_jax.models.segsr import SegSR, SegSRConfig
from segsr_jax.models.text_encoder import CLIPTextConfig
from segsr_jax.models.unet import UNet2DCondition
from segsr_jax.models.vae import VAEConfig
from segsr_jax.weights.torch_mapping import load_state_dict
from segsr_jax.weights.unet import controlnet_config_from_diffusers, unet_config_from_diffusers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# diffusers' default pixel-space conditioning widths; SegSR runs the same stack at stride 1.
COND_WIDTHS = (16, 32, 96, 256)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A benchmark model: diffusers UNet kwargs plus our configs for the other parts."""

    unet: dict
    vae: VAEConfig
    segformer: SegFormerConfig
    segdm: SegDMConfig
    bridge: BridgeConfig


def _sd_vae(widths: tuple[int, ...], layers: int) -> VAEConfig:
    n = len(widths)
    return VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=4,
    )


CONFIGS = {
    # The medium config: 35.0M UNet + 15.2M ControlNet parameters. SegDM and the DMB
    # are scaled to the UNet as the defaults are to SD-2 (SegDM 256 wide vs UNet 320, DMB 128).
    "medium": BenchConfig(
        unet=dict(
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            attention_head_dim=(2, 4, 8, 8),
            cross_attention_dim=256,
            use_linear_projection=True,
            sample_size=32,
        ),
        vae=_sd_vae((32, 64, 128, 128), 1),
        segformer=SegFormerConfig.b0(),
        segdm=SegDMConfig(
            hidden_channels=64, num_blocks=4, attention_blocks=(1, 3), num_heads=2, norm_groups=32
        ),
        bridge=BridgeConfig(hidden_channels=32, num_blocks=2, norm_groups=32),
    ),
    # SD-2-base sized SegSR: the real UNet/ControlNet/VAE shapes, SegFormer-B5, default SegDM/DMB.
    "sd2": BenchConfig(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            sample_size=64,
        ),
        vae=_sd_vae((128, 256, 512, 512), 2),
        segformer=SegFormerConfig.b5(),
        segdm=SegDMConfig(),
        bridge=BridgeConfig(),
    ),
    # A seconds-scale config (smoke runs; the large-image benchmark): SD's f=8 VAE layout and
    # SegFormer's key reduction (sr 8, 4), at widths of 8-64.
    "tiny": BenchConfig(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=8,
            use_linear_projection=True,
            sample_size=8,
        ),
        vae=VAEConfig(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            norm_num_groups=4,
        ),
        segformer=SegFormerConfig(
            num_encoder_blocks=2,
            depths=(1, 1),
            sr_ratios=(8, 4),
            hidden_sizes=(8, 16),
            patch_sizes=(7, 3),
            strides=(4, 2),
            num_attention_heads=(1, 2),
            mlp_ratios=(2, 2),
            decoder_hidden_size=8,
            num_labels=4,
        ),
        segdm=SegDMConfig(
            embed_dim=4,
            hidden_channels=8,
            num_blocks=1,
            attention_blocks=(0,),
            num_heads=2,
            norm_groups=4,
        ),
        bridge=BridgeConfig(hidden_channels=8, num_blocks=1, norm_groups=4),
    ),
}


def segsr_config(bench: BenchConfig, unet_config) -> SegSRConfig:
    """The SegSR config around the benchmark's UNet (latent ControlNet with COND_WIDTHS)."""
    width = unet_config.cross_attention_dim
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=8 if width % 8 == 0 else 2,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    return SegSRConfig.compose(
        vae=bench.vae,
        text=text,
        unet=unet_config,
        segformer=bench.segformer,
        segdm=bench.segdm,
        bridge=bench.bridge,
        conditioning_embedding_out_channels=COND_WIDTHS,
    )


class _ShapeRngs:
    """Stands in for ``nnx.Rngs`` under ``nnx.eval_shape``: a real one bumps a traced counter
    per draw, which costs time quadratic in the model size with this flax (about 13 s for
    the SD-2 UNet alone here); only shapes are wanted."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda: jax.random.key(0)


def random_model(
    cfg: SegSRConfig, dtype=jnp.float32, seed: int = 0, parts: dict | None = None
) -> SegSR:
    """A SegSR with random weights drawn on the host: kernels ``N(0, 1 / fan_in)``,
    embeddings ``N(0, 1)``, norm scales / variances 1, biases / means 0; the modules in
    ``parts`` (e.g. ``{"unet": loaded_unet}``) are used as given instead.

    JAX's initialisers would compile one small program per parameter shape (tens of seconds
    for the tiny config on this machine); the numbers only have to be well scaled.
    """
    parts = dict(parts or {})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SegSR(cfg, dtype=dtype, rngs=_ShapeRngs())))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        if path[0] in parts:
            continue
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif path[-1] == "embedding":
            value = rng.standard_normal(shape)
        elif path[-1] in ("scale", "var"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    model = nnx.merge(graphdef, state)
    for name, module in parts.items():
        setattr(model, name, module)
    return model


def _perturb(module, seed: int = 0) -> None:
    """Add seeded noise of 10% of each tensor's spread (0.01 for constant tensors, so zero
    convs become non-zero) to every float parameter, in place, on the module's device."""
    import torch

    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            spread = float(p.std()) if p.numel() > 1 else 0.0
            scale = 0.1 * spread if spread > 0 else 0.01
            p.add_(torch.randn(p.shape, generator=gen, device=device) * scale)


def build_models(bench: BenchConfig, dtype_name: str, device: str, folder: Path | None):
    """diffusers UNet + latent-stride ControlNet (perturbed), and SegSR with the same weights.

    With ``folder``, the diffusers models are saved there with ``save_pretrained`` and loaded
    through ``segsr_jax.weights.load_unet`` / ``load_controlnet``; without, their state dicts
    go through the same mapping in memory (``torch_mapping.load_state_dict``), which spares
    writing and reading 5 GB for SD-2 size.

    Returns ``(unet_ref, cn_ref, model, build_seconds)``; the torch models are on ``device``
    in ``dtype_name``, ``model`` is our SegSR in that compute dtype.
    """
    import diffusers
    import torch

    t0 = time.perf_counter()
    with torch.device(device):  # random init on the GPU is seconds for SD-2, not minutes
        unet_ref = diffusers.UNet2DConditionModel(**bench.unet)
        unet_cfg = unet_config_from_diffusers(dict(unet_ref.config))
        cfg = segsr_config(bench, unet_cfg)
        cn_ref = diffusers.ControlNetModel.from_unet(
            unet_ref,
            conditioning_embedding_out_channels=COND_WIDTHS,
            conditioning_channels=cfg.controlnet.conditioning_channels,
        )
    _perturb(unet_ref, 0)
    _perturb(cn_ref, 1)
    dtype = DTYPES[dtype_name]
    if folder is not None:
        unet_ref.save_pretrained(folder / "unet")
        cn_ref.save_pretrained(folder / "controlnet")
        unet = weights.load_unet(folder, dtype=dtype)
        cn = weights.load_controlnet(folder, dtype=dtype, conditioning="latent")
    else:
        unet = _convert(unet_ref, lambda: UNet2DCondition(unet_cfg, dtype=dtype, rngs=_ShapeRngs()))
        cn_cfg = dataclasses.replace(
            controlnet_config_from_diffusers(dict(cn_ref.config)), conditioning="latent"
        )
        cn = _convert(cn_ref, lambda: ControlNet(cn_cfg, dtype=dtype, rngs=_ShapeRngs()))
    # SegSR's conditioning is at latent resolution: the same conv stack without the strides.
    for conv in cn_ref.controlnet_cond_embedding.blocks:
        conv.stride = (1, 1)
    model = random_model(cfg, dtype, parts={"unet": unet, "controlnet": cn})
    torch_dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    unet_ref.to(dtype=torch_dtype).eval()
    cn_ref.to(dtype=torch_dtype).eval()
    return unet_ref, cn_ref, model, time.perf_counter() - t0


def _convert(module_ref, factory):
    """A torch module's state dict through our PyTorch -> NNX mapping, in memory."""
    tensors = {k: v.detach().float().cpu().numpy() for k, v in module_ref.state_dict().items()}
    return load_state_dict(factory, tensors, source=type(module_ref).__name__)


def step_inputs(cfg: SegSRConfig, batch: int, latent: int, seed: int = 0) -> dict:
    """Random float32 inputs of one step (NHWC numpy), 77 context tokens."""
    rng = np.random.default_rng(seed)
    lat = cfg.vae.latent_channels
    shape = (batch, latent, latent)
    return dict(
        z=rng.standard_normal((*shape, lat)).astype(np.float32),
        s=0.01 * rng.standard_normal((*shape, cfg.segdm.embed_dim)).astype(np.float32),
        z_lq=rng.standard_normal((*shape, lat)).astype(np.float32),
        f_lq=rng.standard_normal((*shape, cfg.segdm.feat_channels)).astype(np.float32),
        c_t=0.1 * rng.standard_normal((*shape, cfg.bridge.c_channels)).astype(np.float32),
        context=rng.standard_normal((batch, 77, cfg.unet.cross_attention_dim)).astype(np.float32),
        t=np.full((batch,), 981, np.int32),
    )


def with_compute_dtype_kernels(model: SegSR) -> SegSR:
    """A copy of ``model`` with its weights in each layer's compute dtype
    (:func:`segsr_jax.models.layers.inference_weights`, what ``Restorer`` does). The
    stand-alone step programs get these, like the torch models' bfloat16 weights."""
    return layers.inference_weights(model)
