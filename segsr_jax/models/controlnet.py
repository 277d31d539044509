"""ControlNet (diffusers' ``ControlNetModel``) in Flax NNX, with two conditioning embeddings.

The ControlNet is a trainable copy of the UNet encoder (``conv_in``, time embedding, down and
mid blocks). A conditioning embedding is added to ``conv_in(sample)``; every encoder skip and
the mid output go through zero-initialised 1x1 convs (``controlnet_down_blocks``,
``controlnet_mid_block``) and are returned as residuals for the UNet. Zero init means a fresh
ControlNet leaves the UNet unchanged.

Conditioning (``ControlNetConfig.conditioning``):

- ``"pixel"``: diffusers' ``ControlNetConditioningEmbedding``: an RGB image at 8x the latent
  resolution through 3x3 convs (SiLU) with three stride-2 steps; loads diffusers checkpoints.
- ``"latent"``: SegSR's SRDM branch (its condition is already latent: the LQ's VAE latent
  and the bridge's ``C_t``): ``concat(Z_lq, C_t)`` at latent resolution
  through the same stack with stride 1; ``conditioning_channels`` is its channel count.

Both end in a zero-initialised 3x3 conv (``controlnet_cond_embedding.conv_out``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.layers import PARAM_DTYPE, TimestepEmbedding, conv
from segsr_jax.models.unet import (
    UNet2DCondition,
    UNetConfig,
    check_encoder_fields,
    embed_timesteps,
    make_down_blocks,
    make_mid_block,
    per_block,
    run_encoder,
)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ``ControlNetModel`` config fields we honour (diffusers' defaults), plus
    ``conditioning`` (``"pixel"`` or ``"latent"``, see the module docstring).

    The encoder fields mean what they mean in :class:`~segsr_jax.models.unet.UNetConfig`.
    ``controlnet_conditioning_channel_order="bgr"`` flips the condition's channels first.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning: str = "pixel"

    def __post_init__(self):
        check_encoder_fields(self)
        if self.conditioning not in ("pixel", "latent"):
            raise ValueError(f"conditioning={self.conditioning!r}; expected 'pixel' or 'latent'")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                "controlnet_conditioning_channel_order="
                f"{self.controlnet_conditioning_channel_order!r}; expected rgb/bgr"
            )
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels must not be empty")

    @property
    def cond_downscale(self) -> int:
        """How much larger than the latent the condition is (8 for pixel with 4 stages)."""
        if self.conditioning == "latent":
            return 1
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


def zero_conv(in_ch: int, out_ch: int, kernel: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A conv whose kernel and bias start at zero (its output is zero until trained)."""
    p = kernel // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        padding=((p, p), (p, p)),
        kernel_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        rngs=rngs,
    )


class ControlNetConditioningEmbedding(nnx.Module):
    """``conv_in``, ``blocks`` (pairs: 3x3 same width, 3x3 to the next width with ``stride``),
    SiLU after each, then the zero-initialised ``conv_out`` to ``out_channels``.

    ``stride=2`` is diffusers' pixel-space embedding; ``stride=1`` keeps latent resolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: tuple[int, ...],
        *,
        stride: int,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv_in = conv(in_channels, widths[0], 3, dtype=dtype, rngs=rngs)
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            blocks.append(conv(w_in, w_in, 3, dtype=dtype, rngs=rngs))
            blocks.append(conv(w_in, w_out, 3, stride=stride, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = zero_conv(widths[-1], out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, cond: jax.Array) -> jax.Array:
        """``cond [B, H, W, Cc]`` -> ``[B, H / stride^k, W / stride^k, out_channels]``."""
        h = jax.nn.silu(self.conv_in(cond))
        for block in self.blocks:
            h = jax.nn.silu(block(h))
        return self.conv_out(h)


class ControlNet(nnx.Module):
    """``down_residuals, mid_residual = cn(sample, t, context, cond)`` for the UNet (NHWC)."""

    def __init__(self, config: ControlNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        ch0 = config.block_out_channels[0]
        temb_dim = 4 * ch0
        self.conv_in = conv(config.in_channels, ch0, 3, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch0, temb_dim, dtype=dtype, rngs=rngs)
        self.controlnet_cond_embedding = _make_cond_embedding(config, dtype, rngs)
        self.down_blocks = make_down_blocks(config, temb_dim, dtype=dtype, rngs=rngs)
        self.mid_block = make_mid_block(config, temb_dim, dtype=dtype, rngs=rngs)
        self.controlnet_down_blocks = nnx.List(
            [zero_conv(ch, ch, 1, dtype=dtype, rngs=rngs) for ch in _skip_channels(config)]
        )
        ch_last = config.block_out_channels[-1]
        self.controlnet_mid_block = zero_conv(ch_last, ch_last, 1, dtype=dtype, rngs=rngs)

    def __call__(
        self, sample: jax.Array, timesteps, context: jax.Array, cond: jax.Array, scale=1.0
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """Residuals for the UNet.

        Args:
          sample: ``[B, h, w, in_channels]`` noisy latent (the UNet's input).
          timesteps: scalar or ``[B]``.
          context: ``[B, L, cross_attention_dim]`` text hidden states.
          cond: pixel conditioning ``[B, 8h, 8w, 3]`` (RGB, diffusers' range, usually [0, 1]),
            or latent conditioning ``[B, h, w, conditioning_channels]`` =
            ``concat(Z_lq, C_t)``.
          scale: multiplies every residual (diffusers' ``conditioning_scale``).

        Returns:
          ``(down_residuals, mid_residual)``: one ``[B, h_i, w_i, C_i]`` per UNet encoder skip
          (12 for SD-2) and the mid-block residual ``[B, h_min, w_min, C_last]``, in the
          compute dtype.
        """
        cfg = self.config
        want = (
            sample.shape[1] * cfg.cond_downscale,
            sample.shape[2] * cfg.cond_downscale,
            cfg.conditioning_channels,
        )
        if tuple(cond.shape[1:]) != want:
            raise ValueError(
                f"{cfg.conditioning} conditioning must be [B, {want[0]}, {want[1]}, "
                f"{want[2]}] for a latent of {tuple(sample.shape[1:3])}; got "
                f"{tuple(cond.shape)}"
            )
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = jnp.flip(cond, axis=-1)
        temb = embed_timesteps(self.time_embedding, cfg, timesteps, sample.shape[0])
        h = self.conv_in(sample) + self.controlnet_cond_embedding(cond)
        h, skips = run_encoder(self.down_blocks, self.mid_block, h, temb, context)
        down = tuple(
            zc(s) * scale for zc, s in zip(self.controlnet_down_blocks, skips, strict=True)
        )
        return down, self.controlnet_mid_block(h) * scale


def _make_cond_embedding(cfg: ControlNetConfig, dtype, rngs) -> ControlNetConditioningEmbedding:
    """The conditioning stack of ``cfg``: stride 2 (pixel) or 1 (latent)."""
    return ControlNetConditioningEmbedding(
        cfg.conditioning_channels,
        cfg.block_out_channels[0],
        cfg.conditioning_embedding_out_channels,
        stride=2 if cfg.conditioning == "pixel" else 1,
        dtype=dtype,
        rngs=rngs,
    )


def _skip_channels(cfg) -> list[int]:
    """Width of every encoder skip: ``conv_in``, each resnet / transformer output, and each
    downsampler output (the ``conv_in`` skip and 11 more for SD-2)."""
    n = len(cfg.down_block_types)
    layers = per_block(cfg.layers_per_block, n, "layers_per_block")
    chans = [cfg.block_out_channels[0]]
    for i, ch in enumerate(cfg.block_out_channels):
        chans += [ch] * (layers[i] + (1 if i < n - 1 else 0))
    return chans


def residual_channels(cfg) -> tuple[int, ...]:
    """Width of every residual a ControlNet of ``cfg`` hands the UNet: each encoder skip, then
    the mid block's."""
    return (*_skip_channels(cfg), cfg.block_out_channels[-1])


def controlnet_config_from_unet(unet_config: UNetConfig, overrides=None) -> ControlNetConfig:
    """The ControlNet config whose encoder equals ``unet_config``'s (every shared field
    copied), with ``overrides`` (a dict of :class:`ControlNetConfig` fields) applied."""
    shared = {f.name for f in dataclasses.fields(ControlNetConfig)}
    base = {k: v for k, v in dataclasses.asdict(unet_config).items() if k in shared}
    return ControlNetConfig(**{**base, **dict(overrides or {})})


def controlnet_from_unet(
    unet: UNet2DCondition, config_or_overrides=None, *, rngs: nnx.Rngs | None = None
) -> ControlNet:
    """A ControlNet whose encoder starts as a copy of ``unet``'s (diffusers'
    ``ControlNetModel.from_unet``).

    Args:
      unet: the UNet to copy ``conv_in``, ``time_embedding``, ``down_blocks`` and
        ``mid_block`` from.
      config_or_overrides: a full :class:`ControlNetConfig` (its encoder fields must match the
        UNet's), or a dict of fields to change from the UNet-derived config, e.g.
        ``{"conditioning": "latent", "conditioning_channels": 8}``; ``None`` gives diffusers'
        pixel conditioning.
      rngs: initialises the conditioning stack (its output conv and the residual convs are
        zero whatever the key); default ``nnx.Rngs(0)``.

    Returns:
      The ControlNet in the UNet's compute dtype; its outputs are zero until trained.
    """
    if isinstance(config_or_overrides, ControlNetConfig):
        config = config_or_overrides
    else:
        config = controlnet_config_from_unet(unet.config, config_or_overrides)
    dtype = unet.conv_in.dtype
    # Built abstractly: the encoder is copied and the zero convs are zeros, so only the small
    # conditioning stack needs real random values.
    cn = nnx.eval_shape(lambda: ControlNet(config, dtype=dtype, rngs=nnx.Rngs(0)))
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        _copy_params(getattr(cn, name), getattr(unet, name), name)
    for zc in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
        for var in (zc.kernel, zc.bias):
            var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
    cn.controlnet_cond_embedding = _make_cond_embedding(
        config, dtype, rngs if rngs is not None else nnx.Rngs(0)
    )
    return cn


def _copy_params(dst: nnx.Module, src: nnx.Module, name: str) -> None:
    """Copy every variable of ``src`` into the identically structured ``dst``."""
    src_flat = dict(nnx.to_flat_state(nnx.state(src)))
    dst_flat = dict(nnx.to_flat_state(nnx.state(dst)))
    shapes = lambda flat: {p: tuple(v.get_value().shape) for p, v in flat.items()}
    if shapes(src_flat) != shapes(dst_flat):
        diff = sorted(set(shapes(src_flat).items()) ^ set(shapes(dst_flat).items()), key=str)
        raise ValueError(
            f"ControlNet {name} does not match the UNet's (e.g. {diff[:3]}); "
            "its encoder fields must equal the UNet config's"
        )
    nnx.update(dst, nnx.state(src))
