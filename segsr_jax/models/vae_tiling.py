"""Tiled VAE encode / decode for images too large to run in one piece.

The input is cut into overlapping tiles of one fixed shape, the VAE runs on the tiles one
after another (``lax.map``, so peak memory is that of ``tiles_per_step`` tiles), and the outputs
are blended with ramps across the overlaps (weights normalised to sum to one everywhere).

Tile placement (:func:`segsr_jax.tiles.tile_starts`): along each axis the first tile starts at 0,
the last ends flush with the image end, and the rest are spread evenly between them, with every
overlap at least the requested one. Unlike padding the image up to a whole number of strides, no
tile ever sees invented pixels; every tile still has the same static shape, and the layout is fixed
by the input shape, so a jitted caller compiles once per input shape. An axis no longer than a tile
is one tile spanning the axis, so an image that fits in a tile gives exactly the untiled result.

Accuracy: tiled results differ from untiled ones near the seams *and* inside the tiles. Each
tile runs the whole VAE on its own, so GroupNorm statistics and the mid-block self-attention
see only that tile (this shifts every pixel of the tile a little), and at the seams the
receptive field is cut as well. How much depends on how far a tile's statistics are from the
whole image's. Measured on a perturbed small random VAE (``tests/models/test_vae.py``, f=2,
noise inputs, 2x2 tiles of 2/3 of the image side, overlap half a tile, three seeds), the max abs
difference over output scale was 0.11-0.16 for encode and 0.13-0.28 for decode. Random
weights amplify the statistics shift far more than trained ones, and large SD tiles (SeeSR:
1024 px encoder tiles, 224-latent decoder tiles) cover enough content for statistics near the
image's, but we have no measurement on real weights here. When the image fits in one tile the
result is exactly the untiled one.

Latent scaling is that of :meth:`AutoencoderKL.encode` / :meth:`AutoencoderKL.decode`:
unscaled latents in and out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from segsr_jax.models.vae import AutoencoderKL
from segsr_jax.tiles import tile_starts

_RAMPS = ("linear", "cosine")


def _ramp_weights(length: int, width: int, index: int, count: int, ramp: str) -> np.ndarray:
    """Blending weights ``[length]`` of tile ``index`` of ``count`` along one axis: ramps of
    ``width`` on the sides that overlap a neighbour, 1 elsewhere, never 0."""
    w = np.ones(length, np.float64)
    if width == 0:
        return w
    t = (np.arange(width) + 0.5) / width
    up = t if ramp == "linear" else np.sin(0.5 * np.pi * t) ** 2
    if index > 0:
        w[:width] = np.minimum(w[:width], up)
    if index < count - 1:
        w[length - width :] = np.minimum(w[length - width :], up[::-1])
    return w


def tiled_apply(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    tile: int,
    overlap: int,
    *,
    num: int = 1,
    den: int = 1,
    align: int = 1,
    ramp: str = "linear",
    tiles_per_step: int = 1,
) -> jax.Array:
    """Run ``fn`` over overlapping tiles of ``x [B, H, W, C]`` and blend the results.

    ``fn`` maps ``[B, th, tw, C] -> [B, th*num/den, tw*num/den, C']`` (``num/den`` is the
    output / input resolution ratio: ``1/f`` to encode, ``f`` to decode); tile starts are
    multiples of ``align`` so that they map to whole output pixels. Returns
    ``[B, H*num/den, W*num/den, C']``. A pointwise ``fn`` gives exactly ``fn(x)`` (up to
    rounding): the blend weights sum to one everywhere.
    """
    if ramp not in _RAMPS:
        raise ValueError(f"ramp must be one of {_RAMPS}, got {ramp!r}")
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if tiles_per_step < 1:
        raise ValueError(f"tiles_per_step must be >= 1, got {tiles_per_step}")
    _, h, w, _ = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:  # one tile: exactly the untiled computation
        return fn(x)

    tiles = jnp.stack(
        [x[:, y : y + th, x0 : x0 + tw] for y in ys for x0 in xs]
    )  # [N, B, th, tw, C]
    outs = jax.lax.map(fn, tiles, batch_size=tiles_per_step)  # [N, B, oth, otw, C']
    oth, otw, ov = th * num // den, tw * num // den, overlap * num // den
    wy = [_ramp_weights(oth, ov, i, len(ys), ramp) for i in range(len(ys))]
    wx = [_ramp_weights(otw, ov, j, len(xs), ramp) for j in range(len(xs))]

    # The layout is static, so the normaliser is a numpy constant.
    oh, ow = h * num // den, w * num // den
    total = np.zeros((oh, ow), np.float64)
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            oy, ox = y * num // den, x0 * num // den
            total[oy : oy + oth, ox : ox + otw] += np.outer(wy[i], wx[j])
    acc = jnp.zeros((outs.shape[1], oh, ow, outs.shape[-1]), outs.dtype)
    for n, (i, j) in enumerate((i, j) for i in range(len(ys)) for j in range(len(xs))):
        oy, ox = ys[i] * num // den, xs[j] * num // den
        weight = jnp.asarray(np.outer(wy[i], wx[j]), outs.dtype)[None, :, :, None]
        acc = acc.at[:, oy : oy + oth, ox : ox + otw].add(outs[n] * weight)
    return acc * jnp.asarray(1.0 / total, outs.dtype)[None, :, :, None]


def tiled_encode(
    vae: AutoencoderKL,
    x: jax.Array,
    tile_px: int,
    overlap_px: int,
    *,
    ramp: str = "linear",
    tiles_per_step: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """:meth:`AutoencoderKL.encode` of ``x [B, H, W, C]`` in ``[-1, 1]``, tile by tile.

    Args:
      vae: the autoencoder.
      x: images; ``H`` and ``W`` must be multiples of ``vae.config.downscale_factor`` ``f``
        (pad first) so tiles land on whole latent pixels.
      tile_px: tile side in pixels (a multiple of ``f``); an axis no longer than this is one tile.
      overlap_px: minimum overlap of neighbouring tiles in pixels (a multiple of ``f``, less
        than ``tile_px``); the blend ramps are ``overlap_px / f`` latent pixels wide.
      ramp: ``"linear"`` or ``"cosine"`` blending profile.
      tiles_per_step: tiles encoded at once (memory vs. speed).

    Returns:
      ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]`` float32, unscaled; moments
      are blended (``logvar`` of each tile already clipped).
    """
    f = vae.config.downscale_factor
    _, h, w, _ = x.shape
    bad = {k: v for k, v in dict(H=h, W=w, tile_px=tile_px, overlap_px=overlap_px).items() if v % f}
    if bad:
        raise ValueError(
            f"tiled_encode needs multiples of the downscale factor {f}: got {bad} "
            "(pad the image to a multiple of it first)"
        )

    def encode_tile(t):
        return jnp.concatenate(vae.encode(t), axis=-1)

    moments = tiled_apply(
        encode_tile,
        x,
        tile_px,
        overlap_px,
        num=1,
        den=f,
        align=f,
        ramp=ramp,
        tiles_per_step=tiles_per_step,
    )
    return tuple(jnp.split(moments, 2, axis=-1))


def tiled_decode(
    vae: AutoencoderKL,
    z: jax.Array,
    tile_latent: int,
    overlap_latent: int,
    *,
    ramp: str = "linear",
    tiles_per_step: int = 1,
) -> jax.Array:
    """:meth:`AutoencoderKL.decode` of unscaled latents ``z [B, h, w, latent_channels]``,
    tile by tile.

    Args:
      vae: the autoencoder.
      z: unscaled latents (any ``h``, ``w``).
      tile_latent: tile side in latent pixels; an axis no longer than this is one tile.
      overlap_latent: minimum overlap of neighbouring tiles in latent pixels (less than
        ``tile_latent``); the blend ramps are ``overlap_latent * f`` image pixels wide.
      ramp: ``"linear"`` or ``"cosine"`` blending profile.
      tiles_per_step: tiles decoded at once (memory vs. speed).

    Returns:
      Images ``[B, h*f, w*f, out_channels]`` float32.
    """
    f = vae.config.downscale_factor
    return tiled_apply(
        vae.decode,
        z,
        tile_latent,
        overlap_latent,
        num=f,
        den=1,
        align=1,
        ramp=ramp,
        tiles_per_step=tiles_per_step,
    )
