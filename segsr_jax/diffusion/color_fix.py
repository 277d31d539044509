"""Colour fix after VAE decode: pull the SR image's colours back to the LQ input's.

Diffusion SR tends to shift global colour; SeeSR and StableSR correct it after decoding against
the LQ image resized to the output size (``ref``):

- ``adain``: per image and channel, ``sr`` is standardised and given ``ref``'s mean and
  standard deviation (SeeSR's default).
- ``wavelet``: ``sr``'s high frequencies plus ``ref``'s low frequencies, split by a stack of
  dilated 3x3 binomial blurs (StableSR's ``wavelet_reconstruction``); fixes local colour too, but
  needs ``ref`` at ``sr``'s size.
- ``none``: identity.

All NHWC ``[B, H, W, C]``, any pixel range (both fixes are affine-equivariant up to AdaIN's
variance epsilon); computed in float32 and returned in ``sr``'s dtype; no clipping (the caller
clips to its pixel range). Pure jnp; the fixes are jitted themselves (a dozen small ops per blur
level would otherwise dispatch one by one when called eagerly) and inline into an outer jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

COLOR_FIXES = ("adain", "wavelet", "none")
# AdaIN adds this to the per-channel variance (StableSR's calc_mean_std).
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
# The binomial blur kernel [1 2 1]^T [1 2 1] / 16, as a separable 1-D tap list.
_BLUR_TAPS = (0.25, 0.5, 0.25)


def _mean_std(x: jax.Array):
    """Per image and channel over H, W: mean and ``sqrt(unbiased var + eps)``, ``[B,1,1,C]``."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    n = x.shape[1] * x.shape[2]
    var = jnp.sum((x - mean) ** 2, axis=(1, 2), keepdims=True) / max(n - 1, 1)
    return mean, jnp.sqrt(var + ADAIN_EPS)


@jax.jit
def adain(sr: jax.Array, ref: jax.Array) -> jax.Array:
    """``(sr - mean(sr)) / std(sr) * std(ref) + mean(ref)`` per image and channel.

    Args:
      sr: ``[B, H, W, C]`` the image to correct.
      ref: ``[B, H', W', C]`` the colour reference (any spatial size; only its statistics matter).
    """
    x = sr.astype(jnp.float32)
    mean, std = _mean_std(x)
    ref_mean, ref_std = _mean_std(ref.astype(jnp.float32))
    return ((x - mean) / std * ref_std + ref_mean).astype(sr.dtype)


def wavelet_blur(x: jax.Array, radius: int) -> jax.Array:
    """The 3x3 binomial blur dilated by ``radius``, with edge-replicate padding; ``[B,H,W,C]``.

    Written as two separable passes of three shifted slices: exact, and no conv needed.
    """
    h, w = x.shape[1], x.shape[2]
    x = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    x = sum(wt * x[:, k * radius : k * radius + h] for k, wt in enumerate(_BLUR_TAPS))
    return sum(wt * x[:, :, k * radius : k * radius + w] for k, wt in enumerate(_BLUR_TAPS))


@functools.partial(jax.jit, static_argnames="levels")
def wavelet_decompose(x: jax.Array, levels: int = WAVELET_LEVELS):
    """Split ``x`` into ``(high, low)`` with ``high + low == x``: ``low`` is ``x`` blurred at
    radii 1, 2, 4, ..., 2^(levels-1) in turn; ``high`` is the sum of what each blur removed."""
    low = x
    for i in range(levels):
        low = wavelet_blur(low, 2**i)
    return x - low, low


@functools.partial(jax.jit, static_argnames="levels")
def wavelet(sr: jax.Array, ref: jax.Array, levels: int = WAVELET_LEVELS) -> jax.Array:
    """``high(sr) + low(ref)``: ``sr``'s detail on ``ref``'s colours.

    Args:
      sr, ref: ``[B, H, W, C]`` of the same shape.
      levels: number of dilated blur levels (5: low frequencies below ~1/64 cycles per pixel).
    """
    if sr.shape != ref.shape:
        raise ValueError(
            f"wavelet colour fix needs ref at sr's shape, got {ref.shape} vs "
            f"{sr.shape}; resize the LQ reference to the output size first"
        )
    high, _ = wavelet_decompose(sr.astype(jnp.float32), levels)
    _, low = wavelet_decompose(ref.astype(jnp.float32), levels)
    return (high + low).astype(sr.dtype)


def color_fix(name: str, sr: jax.Array, ref: jax.Array) -> jax.Array:
    """Apply colour fix ``name`` (``adain`` | ``wavelet`` | ``none``) to ``sr`` ``[B,H,W,C]``
    against ``ref`` (the LQ image resized to ``sr``'s size)."""
    if name == "adain":
        return adain(sr, ref)
    if name == "wavelet":
        return wavelet(sr, ref)
    if name == "none":
        return sr
    raise ValueError(f"unknown colour fix {name!r}; choose one of {COLOR_FIXES}")
