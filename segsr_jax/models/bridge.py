"""DMB, the Dual-Modality Bridge: ``(Z_t, S_t, t) -> (I_t, C_t)``.

Two small time-conditioned encoders run side by side at latent resolution, one over the
image latent ``Z_t`` and one over the segmentation state ``S_t``; before every block each
stream adds a 1x1 projection of the other's features, so each condition sees both
modalities. Two zero-initialised heads read them out:

* ``C_t`` (segmentation condition for SRDM) from the segmentation stream,
* ``I_t`` (image condition for SegDM) from the image stream.

Zero heads mean an untrained bridge outputs exact zeros, so adding it leaves SRDM and SegDM
unchanged (ControlNet's trick, applied to the coupling).

With ``BridgeConfig.level_channels`` the segmentation stream also reaches SRDM at every level:
one more zero-initialised 1x1 head per UNet residual (each encoder skip and the mid block)
reads the stream's features, resized to that residual's resolution, and its output is added to
the ControlNet's residual there (:meth:`Bridge.levels`). As designed (empty) the semantics
reach SRDM only through ``C_t`` in the ControlNet's input.

``BridgeConfig.seg_source = "estimate"`` changes what the segmentation stream reads when
SegDM is coupled: SegDM's clean estimate of the current step (its soft map, re-embedded and
divided by the embedding's scale, so it is as large as the noise the same input conv sees in
``S_t``) instead of the noisy state ``S_t`` (see :meth:`segsr_jax.models.segsr.SegSR.denoise`). Why:
the label embedding is small (SegDM's ``bit_scale``, 0.01), so ``S_t`` holds almost no class
signal until the last few percent of the process, while SRDM needs the class at high noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models import layers


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    """DMB hyper-parameters.

    Attributes:
      latent_channels: channels of ``Z_t`` (4 for SD).
      seg_channels: channels of ``S_t`` (SegDM's ``embed_dim``).
      hidden_channels: width of each stream.
      num_blocks: residual blocks per stream.
      c_channels: channels of ``C_t`` (SRDM's segmentation condition).
      i_channels: channels of ``I_t`` (SegDM's image condition).
      norm_groups: GroupNorm groups.
      level_channels: widths of the UNet residuals the segmentation stream is added to
        (:func:`segsr_jax.models.controlnet.residual_channels`), or empty: ``C_t`` only.
      seg_source: what the segmentation stream reads when SegDM runs: ``"state"`` (``S_t``,
        as designed) or ``"estimate"`` (SegDM's soft estimate of the clean map this step).
    """

    latent_channels: int = 4
    seg_channels: int = 16
    hidden_channels: int = 128
    num_blocks: int = 2
    c_channels: int = 4
    i_channels: int = 64
    norm_groups: int = 32
    level_channels: tuple[int, ...] = ()
    seg_source: str = "state"


def _zero_conv(cin: int, cout: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (1, 1),
        dtype=dtype,
        param_dtype=layers.PARAM_DTYPE,
        kernel_init=nnx.initializers.zeros,
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


class Bridge(nnx.Module):
    """The DMB. ``__call__(z_t, s_t, t) -> (i_t, c_t)``."""

    def __init__(self, config: BridgeConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        hid, temb = c.hidden_channels, 4 * c.hidden_channels
        self.config = c
        self.dtype = dtype
        self.time_embedding = layers.TimestepEmbedding(hid, temb, dtype=dtype, rngs=rngs)
        self.image_in = layers.conv(c.latent_channels, hid, 3, dtype=dtype, rngs=rngs)
        self.seg_in = layers.conv(c.seg_channels, hid, 3, dtype=dtype, rngs=rngs)

        def blocks():
            return nnx.List(
                [
                    layers.ResnetBlock2D(
                        hid,
                        hid,
                        temb_channels=temb,
                        groups=c.norm_groups,
                        eps=1e-6,
                        dtype=dtype,
                        rngs=rngs,
                    )
                    for _ in range(c.num_blocks)
                ]
            )

        def exchange():
            return nnx.List(
                [layers.conv(hid, hid, 1, dtype=dtype, rngs=rngs) for _ in range(c.num_blocks)]
            )

        self.image_blocks, self.seg_blocks = blocks(), blocks()
        self.seg_to_image, self.image_to_seg = exchange(), exchange()
        self.image_norm = layers.group_norm(hid, c.norm_groups, 1e-6, dtype=dtype, rngs=rngs)
        self.seg_norm = layers.group_norm(hid, c.norm_groups, 1e-6, dtype=dtype, rngs=rngs)
        self.i_out = _zero_conv(hid, c.i_channels, dtype=dtype, rngs=rngs)
        self.c_out = _zero_conv(hid, c.c_channels, dtype=dtype, rngs=rngs)
        if c.level_channels:
            self.level_out = nnx.List(
                [_zero_conv(hid, ch, dtype=dtype, rngs=rngs) for ch in c.level_channels]
            )

    def __call__(self, z_t: jax.Array, s_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(i_t, c_t)``: :meth:`encode` without the segmentation stream's features."""
        i_t, c_t, _ = self.encode(z_t, s_t, t)
        return i_t, c_t

    def encode(
        self, z_t: jax.Array, s_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode the current pair into the two conditions.

        Args:
          z_t: ``[B, h, w, latent_channels]`` image latent.
          s_t: ``[B, h, w, seg_channels]`` segmentation state.
          t: ``[B]`` or scalar SR timestep (0..999).

        Returns:
          ``(i_t [B, h, w, i_channels], c_t [B, h, w, c_channels])`` in float32, and the
          segmentation stream's features ``[B, h, w, hidden_channels]`` (what ``C_t``'s head
          reads; :meth:`levels` takes them) in the compute dtype.
        """
        b = z_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = layers.timestep_embedding(
            t, self.config.hidden_channels, flip_sin_to_cos=True, downscale_freq_shift=0.0
        )
        temb = self.time_embedding(temb.astype(self.dtype))
        hz = self.image_in(z_t.astype(self.dtype))
        hs = self.seg_in(s_t.astype(self.dtype))
        for zb, sb, s2z, z2s in zip(
            self.image_blocks, self.seg_blocks, self.seg_to_image, self.image_to_seg, strict=True
        ):
            hz, hs = zb(hz + s2z(hs), temb), sb(hs + z2s(hz), temb)
        i_t = self.i_out(jax.nn.silu(self.image_norm(hz)))
        feats = jax.nn.silu(self.seg_norm(hs))
        c_t = self.c_out(feats)
        return i_t.astype(jnp.float32), c_t.astype(jnp.float32), feats

    def levels(self, feats: jax.Array, shapes) -> tuple[jax.Array, ...]:
        """The segmentation stream's residual for each UNet level.

        Args:
          feats: :meth:`encode`'s features ``[B, h, w, hidden_channels]``.
          shapes: the shapes of the ControlNet's residuals (encoder skips, then mid), one per
            ``config.level_channels`` entry; only their spatial sizes are read.

        Returns:
          One ``[B, h_i, w_i, level_channels[i]]`` per residual, in the compute dtype: the
          features resized (area-averaged when smaller) and through that level's zero head.
        """
        if len(shapes) != len(self.config.level_channels):
            raise ValueError(
                f"{len(shapes)} residual shapes for {len(self.config.level_channels)} levels"
            )
        b, _, _, ch = feats.shape
        out = []
        for head, shape in zip(self.level_out, shapes, strict=True):
            f = feats
            if tuple(f.shape[1:3]) != tuple(shape[1:3]):
                f = jax.image.resize(f, (b, shape[1], shape[2], ch), "linear", antialias=True)
            out.append(head(f.astype(self.dtype)))
        return tuple(out)
