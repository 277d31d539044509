"""The UNet's down / mid / up blocks (SD-1.x / SD-2.x layout).

Each class mirrors the diffusers module of the same name attribute for attribute
(``attentions[i].transformer_blocks[j].attn1.to_q``, ``ff.net[0].proj`` ...) so that
:mod:`segsr_jax.weights.torch_mapping` maps a diffusers state dict onto it by path alone.
Tensors are NHWC (``[B, H, W, C]``); text context is ``[B, L, D]``; the time embedding is
``[B, T]``. Parameters are float32, compute runs in ``dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D
from segsr_jax.models.remat import STAGE, boundary
from segsr_jax.models.transformer import Transformer2DModel


def _downsampler(channels: int, padding: int, dtype, rngs) -> nnx.List:
    # diffusers pads (0, 1) by hand when the conv itself is unpadded (downsample_padding=0).
    pad = (padding, padding) if padding > 0 else (0, 1)
    return nnx.List([Downsample2D(channels, pad=pad, dtype=dtype, rngs=rngs)])


class DownBlock2D(nnx.Module):
    """``num_layers`` resnets, then an optional stride-2 downsampler. Returns every
    intermediate state as a skip connection for the decoder (and the ControlNet)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        add_downsample: bool,
        downsample_padding: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            _downsampler(out_channels, downsample_padding, dtype, rngs) if add_downsample else None
        )

    @boundary(STAGE)
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None):
        """``x [B, H, W, Cin]`` -> ``(x [B, H', W', Cout], skips)``; ``context`` is unused."""
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(nnx.Module):
    """Resnet + transformer pairs, then an optional downsampler (skips as in DownBlock2D)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int,
        transformer_layers: int,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        eps: float,
        use_linear_projection: bool,
        add_downsample: bool,
        downsample_padding: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    out_channels,
                    heads,
                    out_channels // heads,
                    num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = (
            _downsampler(out_channels, downsample_padding, dtype, rngs) if add_downsample else None
        )

    @boundary(STAGE)
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array):
        """``x [B, H, W, Cin]``, ``context [B, L, D]`` -> ``(x, skips)``."""
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            x = attn(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nnx.Module):
    """``resnet, (transformer, resnet) x num_layers`` at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        *,
        heads: int,
        transformer_layers: int,
        cross_attention_dim: int,
        groups: int,
        eps: float,
        use_linear_projection: bool,
        output_scale_factor: float = 1.0,
        num_layers: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    channels,
                    channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    output_scale_factor=output_scale_factor,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers + 1)
            ]
        )
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    channels,
                    heads,
                    channels // heads,
                    num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    @boundary(STAGE)
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """``x [B, h, w, C]`` -> ``[B, h, w, C]``."""
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock2D(nnx.Module):
    """Resnets over ``concat(x, skip)`` (skips consumed last-first), then an optional
    nearest-neighbour x2 upsampler."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        add_upsample: bool,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    _up_resnet_in(i, num_layers, in_channels, prev_output_channels, out_channels),
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    @boundary(STAGE)
    def __call__(
        self,
        x: jax.Array,
        skips: tuple,
        temb: jax.Array,
        context: jax.Array | None = None,
        upsample_size=None,
    ) -> jax.Array:
        """``x [B, h, w, C]``, ``skips``: this block's ``len(resnets)`` skip tensors;
        ``upsample_size (H, W)`` for inputs that are not a multiple of the total downsampling."""
        for resnet, skip in zip(self.resnets, reversed(skips), strict=True):
            x = resnet(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(nnx.Module):
    """UpBlock2D with a transformer after every resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int,
        transformer_layers: int,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        eps: float,
        use_linear_projection: bool,
        add_upsample: bool,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    _up_resnet_in(i, num_layers, in_channels, prev_output_channels, out_channels),
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    out_channels,
                    heads,
                    out_channels // heads,
                    num_layers=transformer_layers,
                    cross_attention_dim=cross_attention_dim,
                    norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    @boundary(STAGE)
    def __call__(
        self, x: jax.Array, skips: tuple, temb: jax.Array, context: jax.Array, upsample_size=None
    ) -> jax.Array:
        """As :meth:`UpBlock2D.__call__`, with ``context [B, L, D]`` for cross-attention."""
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(skips), strict=True):
            x = resnet(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), temb)
            x = attn(x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def _up_resnet_in(
    i: int, num_layers: int, in_channels: int, prev_output_channels: int, out_channels: int
) -> int:
    """Input width of an up block's i-th resnet: (previous output or own width) + skip width;
    the last resnet's skip comes from the encoder level below (``in_channels``)."""
    x_channels = prev_output_channels if i == 0 else out_channels
    skip_channels = in_channels if i == num_layers - 1 else out_channels
    return x_channels + skip_channels
