"""The UNet's spatial transformer (SD-1.x / SD-2.x layout): ``Transformer2DModel`` and its
blocks (self-attention, cross-attention to the text, GEGLU feed-forward).

Each class mirrors the diffusers module of the same name attribute for attribute
(``transformer_blocks[j].attn1.to_q``, ``ff.net[0].proj`` ...) so that
:mod:`segsr_jax.weights.torch_mapping` maps a diffusers state dict onto it by path alone.
Tensors are NHWC (``[B, H, W, C]``); text context is ``[B, L, D]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.attention import Attention
from segsr_jax.models.layers import conv, group_norm, layer_norm, linear
from segsr_jax.models.remat import BLOCK, boundary


class GEGLU(nnx.Module):
    """``proj`` to twice the width, then ``value * gelu(gate)`` (exact, erf-based GELU)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = linear(dim_in, 2 * dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``net = [GEGLU, Dropout, Linear]``; index 1 (dropout, no parameters) is kept as ``None``
    so that the output layer sits at ``net[2]`` as in diffusers' state dicts."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List(
            [
                GEGLU(dim, inner, dtype=dtype, rngs=rngs),
                None,
                linear(inner, dim, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        cross_attention_dim: int,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm1 = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(
            dim,
            heads=heads,
            dim_head=head_dim,
            cross_attention_dim=cross_attention_dim,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm3 = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x [B, L, dim]``, ``context [B, Lc, Dc]`` -> ``[B, L, dim]``."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, ``proj_in``, transformer blocks over the ``H*W`` tokens, ``proj_out``, residual.

    ``use_linear_projection`` picks a dense ``proj_in`` / ``proj_out`` (SD-2) or 1x1 convs
    (SD-1.x); on NHWC they compute the same map, but the checkpoint layouts differ, so the
    module holds whichever kind the checkpoint has.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        head_dim: int,
        *,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
        if use_linear_projection:
            self.proj_in = linear(in_channels, inner, dtype=dtype, rngs=rngs)
            self.proj_out = linear(inner, in_channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = conv(in_channels, inner, 1, dtype=dtype, rngs=rngs)
            self.proj_out = conv(inner, in_channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    heads,
                    head_dim,
                    cross_attention_dim=cross_attention_dim,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    @boundary(BLOCK)
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x [B, H, W, C]``, ``context [B, L, D]`` -> ``[B, H, W, C]``."""
        b, h, w, _ = x.shape
        tokens = self.proj_in(self.norm(x))  # 1x1 conv and dense agree on NHWC
        tokens = tokens.reshape(b, h * w, tokens.shape[-1])
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_projection:
            out = self.proj_out(tokens).reshape(b, h, w, -1)
        else:
            out = self.proj_out(tokens.reshape(b, h, w, -1))
        return out + x
