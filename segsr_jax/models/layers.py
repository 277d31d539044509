"""Building blocks shared by the VAE, UNet and ControlNet.

Attribute names follow diffusers' module names exactly (``norm1``, ``conv1``, ``to_q``,
``to_out[0]`` ...) so that :mod:`segsr_jax.weights.torch_mapping` can map a PyTorch state dict
onto these modules by name alone. Tensors are NHWC; parameters are float32 and the compute
dtype is ``dtype``. Normalisation statistics are always computed in float32 (Flax promotes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

PARAM_DTYPE = jnp.float32


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding="torch",
         groups: int = 1, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D convolution with PyTorch's symmetric padding convention.

    ``padding="torch"`` pads ``kernel // 2`` on every side, as ``nn.Conv2d(padding=k//2)`` does;
    Flax's ``"SAME"`` differs from that for stride 2 (it pads only the high side).
    """
    if padding == "torch":
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
                    feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                    param_dtype=PARAM_DTYPE, rngs=rngs)


def linear(in_f: int, out_f: int, *, use_bias: bool = True, dtype=jnp.float32,
           rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer with float32 parameters and compute dtype ``dtype``."""
    return nnx.Linear(in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=PARAM_DTYPE,
                      rngs=rngs)


def group_norm(channels: int, groups: int, eps: float, *, dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm over the last (channel) axis; statistics in float32 whatever ``dtype`` is."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype,
                         param_dtype=PARAM_DTYPE, rngs=rngs)


def layer_norm(features: int, eps: float = 1e-5, *, dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis; statistics in float32 whatever ``dtype`` is."""
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       downscale_freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of ``timesteps [B]`` -> ``[B, dim]`` float32 (diffusers' ``Timesteps``)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = linear(in_dim, embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (default "default" time-embedding norm, SiLU, no up/down).

    ``temb_channels=None`` drops the time projection (the VAE's blocks).
    """

    def __init__(self, in_ch: int, out_ch: int, *, temb_channels: int | None, groups: int,
                 eps: float, groups_out: int | None = None, output_scale_factor: float = 1.0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_ch, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (linear(temb_channels, out_ch, dtype=dtype, rngs=rngs)
                              if temb_channels is not None else None)
        self.norm2 = group_norm(out_ch, groups_out or groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs)
                              if in_ch != out_ch else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """``x [B, H, W, Cin]``, ``temb [B, T]`` -> ``[B, H, W, Cout]``."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution named ``conv`` (diffusers' ``Downsample2D`` with ``use_conv``).

    ``pad=(lo, hi)``: the UNet uses PyTorch ``padding=1`` -> ``(1, 1)``; the VAE encoder pads
    ``(0, 1)`` by hand before an unpadded conv.
    """

    def __init__(self, channels: int, out_channels: int | None = None, *, pad=(1, 1),
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, out_channels or channels, 3, stride=2,
                         padding=(tuple(pad), tuple(pad)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv named ``conv`` (diffusers' ``Upsample2D``)."""

    def __init__(self, channels: int, out_channels: int | None = None, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = conv(channels, out_channels or channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        b, h, w, c = x.shape
        oh, ow = output_size if output_size is not None else (2 * h, 2 * w)
        if (oh, ow) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # PyTorch 'nearest' for an explicit size: src = floor(dst * in / out)
            rows = (jnp.arange(oh) * h) // oh
            cols = (jnp.arange(ow) * w) // ow
            x = x[:, rows][:, :, cols]
        return self.conv(x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head scaled dot-product attention.

    ``q [B, Lq, H*D]``, ``k, v [B, Lk, H*D]`` -> ``[B, Lq, H*D]``. Uses
    ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when eligible); the softmax
    runs in float32 for low-precision inputs.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.reshape(b, lq, heads, d)
    k = k.reshape(b, lk, heads, d)
    v = v.reshape(b, lk, heads, d)
    out = jax.nn.dot_product_attention(q, k, v)
    return out.reshape(b, lq, inner)


class Attention(nnx.Module):
    """diffusers' ``Attention`` for the UNet: ``to_q/to_k/to_v`` and ``to_out[0]``.

    Self-attention when ``context`` is None, cross-attention otherwise.
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int,
                 cross_attention_dim: int | None = None, qkv_bias: bool = False,
                 out_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([linear(inner, query_dim, use_bias=out_bias, dtype=dtype,
                                       rngs=rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x [B, L, Dq]``, ``context [B, Lc, Dc]`` -> ``[B, L, Dq]``."""
        ctx = x if context is None else context
        out = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads)
        return self.to_out[0](out)
