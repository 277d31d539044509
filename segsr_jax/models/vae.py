"""Stable Diffusion's KL autoencoder (diffusers' ``AutoencoderKL``) in Flax NNX.

Images are NHWC in ``[-1, 1]``; latents are NHWC with ``latent_channels`` channels at
``1 / downscale_factor`` of the image size (8 for SD: 512 px -> 64 latents).

Scaling convention (the same as diffusers): :meth:`AutoencoderKL.encode` and
:meth:`AutoencoderKL.decode` work on *unscaled* latents. The diffusion model sees
``(z - shift_factor) * scaling_factor``; :meth:`AutoencoderKL.encode_latent` and
:meth:`AutoencoderKL.decode_latent` apply / undo that, so callers use either pair, never mix.

Sub-modules are named exactly as in diffusers (``encoder.down_blocks.0.resnets.1.conv1``,
``decoder.mid_block.attentions.0.to_q`` ...) so :mod:`segsr_jax.weights.vae` can load a
diffusers checkpoint by attribute path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models import attention, layers

# diffusers builds every VAE norm with eps=1e-6 (resnets, attention and the output norms).
_EPS = 1e-6
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Our ResnetBlock2D hard-wires SiLU; diffusers' "swish" is the same function.
_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers ``AutoencoderKL`` config fields we honour (same names, same defaults).

    ``sample_size`` is informational (the resolution the VAE was trained at); it does not limit
    the input size. ``shift_factor=None`` means 0.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels must not be empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have one entry "
                "per resolution"
            )
        bad = sorted(
            {t for t in self.down_block_types if t != _DOWN_BLOCK}
            | {t for t in self.up_block_types if t != _UP_BLOCK}
        )
        if bad:
            raise ValueError(
                f"unsupported block type(s) {bad}: only {_DOWN_BLOCK} and "
                f"{_UP_BLOCK} are implemented"
            )
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported (only {_ACTIVATIONS})")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(
                f"block_out_channels {odd} not divisible by norm_num_groups={self.norm_num_groups}"
            )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd2(cls) -> VAEConfig:
        """The VAE of ``stabilityai/stable-diffusion-2-base`` (and of every SD 1.x/2.x)."""
        return cls(
            down_block_types=(_DOWN_BLOCK,) * 4,
            up_block_types=(_UP_BLOCK,) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )


class VAEAttention(nnx.Module):
    """The VAE's single-head spatial self-attention with a residual (diffusers' ``Attention``
    as built by ``UNetMidBlock2D``: ``group_norm``, biased ``to_q/to_k/to_v``, ``to_out[0]``)."""

    def __init__(self, channels: int, groups: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.group_norm = layers.group_norm(channels, groups, _EPS, dtype=dtype, rngs=rngs)
        self.to_q = layers.linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = layers.linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = layers.linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([layers.linear(channels, channels, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C]`` -> ``[B, H, W, C]``; every pixel attends to every pixel."""
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        y = attention.attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1)
        return x + self.to_out[0](y).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """``resnets[0] -> attentions[0] -> resnets[1]`` (diffusers' ``UNetMidBlock2D``, no time)."""

    def __init__(
        self, channels: int, groups: int, add_attention: bool, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.resnets = nnx.List(
            [
                layers.ResnetBlock2D(
                    channels,
                    channels,
                    temb_channels=None,
                    groups=groups,
                    eps=_EPS,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(2)
            ]
        )
        # Without attention diffusers keeps a None placeholder that holds no weights.
        self.attentions = nnx.List(
            [VAEAttention(channels, groups, dtype=dtype, rngs=rngs)] if add_attention else []
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    """``layers_per_block`` resnets, then (except at the lowest resolution) a stride-2 conv."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                layers.ResnetBlock2D(
                    in_ch if i == 0 else out_ch,
                    out_ch,
                    temb_channels=None,
                    groups=groups,
                    eps=_EPS,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        # diffusers' encoder (downsample_padding=0) pads (0, 1) by hand, then an unpadded
        # stride-2 conv.
        self.downsamplers = (
            nnx.List([layers.Downsample2D(out_ch, pad=(0, 1), dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nnx.Module):
    """``layers_per_block + 1`` resnets, then (except at full resolution) a x2 upsample."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                layers.ResnetBlock2D(
                    in_ch if i == 0 else out_ch,
                    out_ch,
                    temb_channels=None,
                    groups=groups,
                    eps=_EPS,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.upsamplers = (
            nnx.List([layers.Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Image ``[B, H, W, in_channels]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]``."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = layers.conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    cfg.layers_per_block,
                    g,
                    add_downsample=i < len(ch) - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = layers.group_norm(ch[-1], g, _EPS, dtype=dtype, rngs=rngs)
        self.conv_out = layers.conv(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent ``[B, h, w, latent_channels]`` -> image ``[B, h*f, w*f, out_channels]``."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = layers.conv(cfg.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        # diffusers' order: up_blocks[0] works at the lowest resolution with the widest channels.
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    cfg.layers_per_block + 1,
                    g,
                    add_upsample=i < len(ch) - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = layers.group_norm(ch[-1], g, _EPS, dtype=dtype, rngs=rngs)
        self.conv_out = layers.conv(ch[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' ``AutoencoderKL``: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``.

    Parameters are float32; ``dtype`` is the compute dtype (bfloat16 works). Outputs of
    :meth:`encode` and :meth:`decode` are float32 whatever ``dtype`` is, so the sampler's
    arithmetic on latents never runs in low precision.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        lc = config.latent_channels
        self.quant_conv = (
            layers.conv(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs)
            if config.use_quant_conv
            else None
        )
        self.post_quant_conv = (
            layers.conv(lc, lc, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior moments of images ``x [B, H, W, in_channels]`` in ``[-1, 1]``.

        Returns ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]`` float32 and
        unscaled; ``logvar`` is clipped to ``[-30, 20]`` as diffusers'
        ``DiagonalGaussianDistribution`` does. ``H`` and ``W`` should be multiples of
        ``config.downscale_factor`` (other sizes run, with diffusers' rounding).
        """
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images ``[B, h*f, w*f, out_channels]`` (float32, nominally ``[-1, 1]``, not clipped)
        from *unscaled* latents ``z [B, h, w, latent_channels]`` (divide a diffusion latent by
        ``scaling_factor`` first, or use :meth:`decode_latent`)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def encode_latent(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The diffusion model's latent of images ``x [B, H, W, C]`` in ``[-1, 1]``:
        ``(z - shift_factor) * scaling_factor`` with ``z`` the posterior mean (``key=None``) or a
        posterior sample drawn with ``key``. Returns ``[B, H/f, W/f, latent_channels]`` float32."""
        mean, logvar = self.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.scale_latent(z)

    def decode_latent(self, z_scaled: jax.Array) -> jax.Array:
        """Images ``[B, h*f, w*f, C]`` from a diffusion-model latent (undoes the scaling of
        :meth:`encode_latent`)."""
        return self.decode(self.unscale_latent(z_scaled))

    def scale_latent(self, z: jax.Array) -> jax.Array:
        """Unscaled VAE latent -> diffusion-model latent: ``(z - shift) * scaling_factor``."""
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def unscale_latent(self, z_scaled: jax.Array) -> jax.Array:
        """Diffusion-model latent -> unscaled VAE latent: ``z / scaling_factor + shift``."""
        shift = self.config.shift_factor or 0.0
        return z_scaled / self.config.scaling_factor + shift
