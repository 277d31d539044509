"""SegDM: the segmentation diffusion model (DDP-style, x0-prediction of class logits).

A label map ``y [B, h, w]`` (K classes, 255 = ignore) lives in diffusion space as the analog
embedding ``S_0 = (sigmoid(E[y]) * 2 - 1) * bit_scale`` (DDP, Ji et al. 2023: bit_scale 0.01
for ADE20K). The denoiser reads ``concat(S_t, F_lq, I_t)`` — the noisy map, the LQ image's
segmentation features and the bridge's image condition — and predicts the K-class logits of
the clean map. Sampling re-embeds the softmax of those logits as the x0 estimate
(:meth:`SegDM.embed_probs`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models import attention, layers
from segsr_jax.models.remat import BLOCK, boundary

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class SegDMConfig:
    """SegDM hyper-parameters.

    Attributes:
      num_classes: K, the segmentation classes (the ignore label gets one extra embedding row).
      embed_dim: channels of ``S_t``.
      feat_channels: channels of ``F_lq`` (SegFormer's fused decode-head features).
      cond_channels: channels of ``I_t`` (the bridge's image condition).
      hidden_channels: width of the residual trunk.
      num_blocks: residual blocks in the trunk.
      attention_blocks: indices of blocks followed by a self-attention layer.
      num_heads: heads of those attention layers.
      norm_groups: GroupNorm groups.
      bit_scale: the scale of the analog label embedding.
      time_scale: the continuous time ``t in [0, 1]`` is multiplied by this before the
        sinusoidal embedding (1000 puts it on the SR model's step scale).
    """

    num_classes: int = 150
    embed_dim: int = 16
    feat_channels: int = 768
    cond_channels: int = 64
    hidden_channels: int = 256
    num_blocks: int = 4
    attention_blocks: tuple[int, ...] = (1, 3)
    num_heads: int = 4
    norm_groups: int = 32
    bit_scale: float = 0.01
    time_scale: float = 1000.0


class SelfAttentionBlock(nnx.Module):
    """GroupNorm -> multi-head self-attention over all positions -> residual add."""

    def __init__(self, channels: int, heads: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm = layers.group_norm(channels, groups, 1e-6, dtype=dtype, rngs=rngs)
        self.attn = attention.Attention(
            channels, heads=heads, dim_head=channels // heads, qkv_bias=True, dtype=dtype, rngs=rngs
        )

    @boundary(BLOCK)
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.attn(self.norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        return x + y


class SegDM(nnx.Module):
    """Segmentation denoiser: ``(S_t, t, F_lq, I_t) -> logits [B, h, w, K]``."""

    def __init__(self, config: SegDMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        if c.hidden_channels % c.norm_groups or c.hidden_channels % c.num_heads:
            raise ValueError(
                f"hidden_channels {c.hidden_channels} must be divisible by "
                f"norm_groups {c.norm_groups} and num_heads {c.num_heads}"
            )
        self.config = c
        self.dtype = dtype
        temb = 4 * c.hidden_channels
        # One extra row for the ignore label, so ground-truth maps with 255 can be embedded.
        self.label_embedding = nnx.Embed(
            c.num_classes + 1, c.embed_dim, param_dtype=layers.PARAM_DTYPE, rngs=rngs
        )
        self.time_embedding = layers.TimestepEmbedding(
            c.hidden_channels, temb, dtype=dtype, rngs=rngs
        )
        in_ch = c.embed_dim + c.feat_channels + c.cond_channels
        self.conv_in = layers.conv(in_ch, c.hidden_channels, 3, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                layers.ResnetBlock2D(
                    c.hidden_channels,
                    c.hidden_channels,
                    temb_channels=temb,
                    groups=c.norm_groups,
                    eps=1e-6,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(c.num_blocks)
            ]
        )
        self.attentions = nnx.List(
            [
                SelfAttentionBlock(
                    c.hidden_channels, c.num_heads, c.norm_groups, dtype=dtype, rngs=rngs
                )
                for _ in c.attention_blocks
            ]
        )
        self.norm_out = layers.group_norm(
            c.hidden_channels, c.norm_groups, 1e-6, dtype=dtype, rngs=rngs
        )
        self.conv_out = layers.conv(c.hidden_channels, c.num_classes, 3, dtype=dtype, rngs=rngs)

    def embedding_table(self) -> jax.Array:
        """``[K + 1, embed_dim]``: the analog embedding of every class (last row: ignore)."""
        e = self.label_embedding.embedding[...]
        return (jax.nn.sigmoid(e) * 2.0 - 1.0) * self.config.bit_scale

    def embed_labels(self, labels: jax.Array) -> jax.Array:
        """``labels [B, h, w]`` int (255 = ignore) -> ``S_0 [B, h, w, embed_dim]`` float32."""
        k = self.config.num_classes
        idx = jnp.where(labels == IGNORE_INDEX, k, labels).astype(jnp.int32)
        return self.embedding_table()[idx]

    def embed_probs(self, probs: jax.Array) -> jax.Array:
        """Soft re-embedding of class probabilities ``[B, h, w, K]`` -> ``[B, h, w, embed_dim]``
        (the expectation of the embedding under ``probs``): the x0 estimate during sampling."""
        table = self.embedding_table()[: self.config.num_classes]
        return jnp.einsum("bhwk,kd->bhwd", probs.astype(jnp.float32), table)

    def __call__(self, s_t: jax.Array, t: jax.Array, f_lq: jax.Array, i_t: jax.Array) -> jax.Array:
        """Predict clean-map logits.

        Args:
          s_t: ``[B, h, w, embed_dim]`` noisy segmentation state.
          t: ``[B]`` or scalar continuous time in ``[0, 1]``.
          f_lq: ``[B, h, w, feat_channels]`` LQ segmentation features at latent resolution.
          i_t: ``[B, h, w, cond_channels]`` image condition from the bridge.

        Returns:
          ``[B, h, w, num_classes]`` logits in float32.
        """
        c = self.config
        b = s_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = layers.timestep_embedding(
            t * c.time_scale, c.hidden_channels, flip_sin_to_cos=True, downscale_freq_shift=0.0
        )
        temb = self.time_embedding(temb.astype(self.dtype))
        x = jnp.concatenate([s_t, f_lq, i_t], axis=-1).astype(self.dtype)
        h = self.conv_in(x)
        attn_at = {blk: n for n, blk in enumerate(c.attention_blocks)}
        for n, block in enumerate(self.blocks):
            h = block(h, temb)
            if n in attn_at:
                h = self.attentions[attn_at[n]](h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.astype(jnp.float32)
