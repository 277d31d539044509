"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) in Flax NNX.

Covers the options SD-1.x / SD-2.x checkpoints use: cross-attention / plain down and up blocks,
per-block head counts, linear or 1x1-conv transformer projections, norm groups,
``flip_sin_to_cos`` / ``freq_shift``, several transformer layers per block, and the ControlNet
residual inputs. Everything else in diffusers' config is refused by the loader
(:mod:`segsr_jax.weights.unet`) unless it has its neutral value.

The encoder helpers here (:func:`make_down_blocks`, :func:`make_mid_block`,
:func:`embed_timesteps`) are shared with :mod:`segsr_jax.models.controlnet`, whose encoder is
a copy of this one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.layers import TimestepEmbedding, conv, group_norm, timestep_embedding
from segsr_jax.models.unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The ``UNet2DConditionModel`` config fields we honour; defaults are diffusers' defaults
    (so a ``config.json`` that omits a key means what it means to diffusers).

    ``attention_head_dim`` has diffusers' historical meaning: the *number of heads* (int or
    one per block); ``num_attention_heads``, when given, takes precedence. Per-block fields
    (``layers_per_block``, ``cross_attention_dim``, ``transformer_layers_per_block``) take an
    int or one value per down block; up blocks use them reversed.
    ``upcast_attention`` is accepted and changes nothing:
    :func:`~segsr_jax.models.attention.attention` already runs its softmax in float32 for
    low-precision inputs.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
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

    def __post_init__(self):
        check_encoder_fields(self)
        n = len(self.down_block_types)
        if len(self.up_block_types) != n:
            raise ValueError(
                f"up_block_types {self.up_block_types} must have {n} entries, like down_block_types"
            )
        bad = [t for t in self.up_block_types if t not in _UP_TYPES]
        if bad:
            raise ValueError(f"unsupported up block type(s) {bad}; supported: {_UP_TYPES}")

    @classmethod
    def sd2_base(cls) -> UNetConfig:
        """``stabilityai/stable-diffusion-2-base``'s UNet (865,910,724 parameters)."""
        return cls(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        )


def per_block(value, n: int, name: str) -> tuple:
    """An int-or-sequence config value as one entry per down block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}={value!r} must have one entry per block ({n})")
        if not all(isinstance(v, int) for v in value):
            raise ValueError(f"{name}={value!r}: per-block entries must be ints")
        return tuple(value)
    return (value,) * n


def block_heads(cfg) -> tuple[int, ...]:
    """Number of attention heads per down block (diffusers: ``num_attention_heads or
    attention_head_dim``)."""
    heads = (
        cfg.num_attention_heads if cfg.num_attention_heads is not None else cfg.attention_head_dim
    )
    return per_block(heads, len(cfg.down_block_types), "attention heads")


def check_encoder_fields(cfg) -> None:
    """Validate the encoder fields shared by :class:`UNetConfig` and ``ControlNetConfig``."""
    n = len(cfg.down_block_types)
    if len(cfg.block_out_channels) != n:
        raise ValueError(
            f"block_out_channels {cfg.block_out_channels} must have {n} entries, "
            f"like down_block_types"
        )
    bad = [t for t in cfg.down_block_types if t not in _DOWN_TYPES]
    if bad:
        raise ValueError(f"unsupported down block type(s) {bad}; supported: {_DOWN_TYPES}")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
        per_block(getattr(cfg, name), n, name)
    heads = block_heads(cfg)
    for ch, h in zip(cfg.block_out_channels, heads, strict=True):
        if ch % cfg.norm_num_groups:
            raise ValueError(
                f"block width {ch} is not divisible by norm_num_groups={cfg.norm_num_groups}"
            )
        if h <= 0 or ch % h:
            raise ValueError(f"block width {ch} is not divisible into {h} attention heads")


def make_down_blocks(cfg, temb_dim: int, *, dtype, rngs: nnx.Rngs) -> nnx.List:
    """The encoder's down blocks from a :class:`UNetConfig` or ``ControlNetConfig``."""
    n = len(cfg.down_block_types)
    layers = per_block(cfg.layers_per_block, n, "layers_per_block")
    cross = per_block(cfg.cross_attention_dim, n, "cross_attention_dim")
    tlayers = per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
    heads = block_heads(cfg)
    blocks, out_ch = [], cfg.block_out_channels[0]
    for i, kind in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, cfg.block_out_channels[i]
        common = dict(
            num_layers=layers[i],
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            add_downsample=i < n - 1,
            downsample_padding=cfg.downsample_padding,
            dtype=dtype,
            rngs=rngs,
        )
        if kind == "CrossAttnDownBlock2D":
            blocks.append(
                CrossAttnDownBlock2D(
                    in_ch,
                    out_ch,
                    temb_dim,
                    transformer_layers=tlayers[i],
                    heads=heads[i],
                    cross_attention_dim=cross[i],
                    use_linear_projection=cfg.use_linear_projection,
                    **common,
                )
            )
        else:
            blocks.append(DownBlock2D(in_ch, out_ch, temb_dim, **common))
    return nnx.List(blocks)


def make_mid_block(cfg, temb_dim: int, *, dtype, rngs: nnx.Rngs) -> UNetMidBlock2DCrossAttn:
    """The cross-attention mid block at the lowest resolution (settings of the last block)."""
    n = len(cfg.down_block_types)
    tlayers = per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
    return UNetMidBlock2DCrossAttn(
        cfg.block_out_channels[-1],
        temb_dim,
        heads=block_heads(cfg)[-1],
        transformer_layers=tlayers[-1],
        cross_attention_dim=per_block(cfg.cross_attention_dim, n, "cross_attention_dim")[-1],
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        use_linear_projection=cfg.use_linear_projection,
        output_scale_factor=cfg.mid_block_scale_factor,
        dtype=dtype,
        rngs=rngs,
    )


def embed_timesteps(time_embedding: TimestepEmbedding, cfg, timesteps, batch: int) -> jax.Array:
    """Sinusoidal features of ``timesteps`` (scalar, ``[1]`` or ``[B]``) through the time MLP
    -> ``[B, 4 * block_out_channels[0]]``."""
    t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
    feats = timestep_embedding(
        t,
        cfg.block_out_channels[0],
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        downscale_freq_shift=cfg.freq_shift,
    )
    return time_embedding(feats)


def run_encoder(down_blocks, mid_block, h: jax.Array, temb: jax.Array, context: jax.Array):
    """``conv_in`` output ``h [B, H, W, C0]`` through the down and mid blocks.

    Returns ``(mid [B, h, w, C], skips)`` where ``skips`` are the ``conv_in`` output and every
    down-block state (12 for SD-2), highest resolution first.
    """
    skips = [h]
    for block in down_blocks:
        h, block_skips = block(h, temb, context)
        skips.extend(block_skips)
    return mid_block(h, temb, context), tuple(skips)


class UNet2DCondition(nnx.Module):
    """The conditional denoiser: ``eps = unet(z_t, t, text)``, NHWC.

    Attribute names follow diffusers (``conv_in``, ``time_embedding``, ``down_blocks``,
    ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``).
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        ch0 = config.block_out_channels[0]
        temb_dim = 4 * ch0
        self.conv_in = conv(config.in_channels, ch0, 3, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch0, temb_dim, dtype=dtype, rngs=rngs)
        self.down_blocks = make_down_blocks(config, temb_dim, dtype=dtype, rngs=rngs)
        self.mid_block = make_mid_block(config, temb_dim, dtype=dtype, rngs=rngs)
        self.up_blocks = self._make_up_blocks(config, temb_dim, dtype, rngs)
        self.conv_norm_out = group_norm(
            ch0, config.norm_num_groups, config.norm_eps, dtype=dtype, rngs=rngs
        )
        self.conv_out = conv(ch0, config.out_channels, 3, dtype=dtype, rngs=rngs)

    @staticmethod
    def _make_up_blocks(cfg: UNetConfig, temb_dim: int, dtype, rngs) -> nnx.List:
        n = len(cfg.up_block_types)
        rev = lambda v, name: tuple(reversed(per_block(v, n, name)))
        chans = tuple(reversed(cfg.block_out_channels))
        layers = rev(cfg.layers_per_block, "layers_per_block")
        cross = rev(cfg.cross_attention_dim, "cross_attention_dim")
        tlayers = rev(cfg.transformer_layers_per_block, "transformer_layers_per_block")
        heads = tuple(reversed(block_heads(cfg)))
        blocks, out_ch = [], chans[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, chans[i]
            in_ch = chans[min(i + 1, n - 1)]  # width of the encoder level this block mirrors
            # One resnet more than the encoder level: it also consumes the downsampler's skip.
            common = dict(
                num_layers=layers[i] + 1,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                add_upsample=i < n - 1,
                dtype=dtype,
                rngs=rngs,
            )
            if kind == "CrossAttnUpBlock2D":
                blocks.append(
                    CrossAttnUpBlock2D(
                        in_ch,
                        prev_ch,
                        out_ch,
                        temb_dim,
                        transformer_layers=tlayers[i],
                        heads=heads[i],
                        cross_attention_dim=cross[i],
                        use_linear_projection=cfg.use_linear_projection,
                        **common,
                    )
                )
            else:
                blocks.append(UpBlock2D(in_ch, prev_ch, out_ch, temb_dim, **common))
        return nnx.List(blocks)

    def __call__(
        self,
        sample: jax.Array,
        timesteps,
        context: jax.Array,
        down_residuals=None,
        mid_residual: jax.Array | None = None,
    ) -> jax.Array:
        """Predict the noise (or v) of ``sample``.

        Args:
          sample: ``[B, H, W, in_channels]`` noisy latent.
          timesteps: scalar or ``[B]`` diffusion step(s).
          context: ``[B, L, cross_attention_dim]`` text hidden states.
          down_residuals: optional sequence of ControlNet residuals, one per encoder skip
            (``conv_in`` output first; 12 for SD-2), each ``[B, h_i, w_i, C_i]``, added to the
            skips before the decoder reads them.
          mid_residual: optional ``[B, h, w, C_last]`` added to the mid-block output.

        Returns:
          ``[B, H, W, out_channels]`` in the compute dtype.
        """
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        temb = embed_timesteps(self.time_embedding, cfg, timesteps, sample.shape[0])
        h, skips = run_encoder(
            self.down_blocks, self.mid_block, self.conv_in(sample), temb, context
        )
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(
                    f"down_residuals has {len(down_residuals)} tensors; this UNet "
                    f"has {len(skips)} encoder skips"
                )
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True))
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size, so odd latent sizes work as in diffusers.
            size = skips[-1].shape[1:3] if i < len(self.up_blocks) - 1 else None
            h = block(h, block_skips, temb, context, upsample_size=size)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
