"""Latent tiling: static tile plans and Gaussian blending weights.

Large images are denoised tile by tile, so that memory stays bounded and the model sees
windows of the size it was trained on: the latent is cut into overlapping windows of
one fixed shape, each window runs through the model, and the outputs are blended back with
Gaussian weights (MultiDiffusion / SeeSR / OSEDiff), so every pixel is a weighted mean of the
tiles covering it and seams fade out::

    plan = plan_tiles(h, w, tile=96, overlap=32)             # host side, static
    tiles = extract_tiles(z, plan)                           # [n, B, th, tw, C]
    out = blend_tiles(model(tiles), plan, gaussian_weights(plan.tile))   # [B, h, w, C]

A :class:`TilePlan` is plain Python (hashable), so it can be a static jit argument or bound with
``functools.partial``; every shape derived from it is static and nothing recompiles per image of
the same size.

Latents smaller than the tile: that axis gets a single window of the latent's own size (the tile
shrinks, it is not padded: padding would feed the model content it never saw and change the
result of an image that fits in one tile).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from segsr_jax.tiles import tile_starts

# SeeSR's Gaussian: variance 0.01 of the (unit) tile width, i.e. sigma = 0.1 tile.
DEFAULT_SIGMA = 0.1


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Where the windows of a tiled pass lie.

    Attributes:
      shape: ``(h, w)`` of the full array being tiled.
      tile: ``(th, tw)`` of every window (``min(tile, size)`` per axis).
      origins: ``((y, x), ...)``: top-left corner of each window, row-major; every pixel of
        ``shape`` lies in at least one window.
    """

    shape: tuple[int, int]
    tile: tuple[int, int]
    origins: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.origins)


def plan_tiles(h: int, w: int, tile: int | tuple[int, int], overlap: int) -> TilePlan:
    """Plan windows of shape ``tile`` over an ``[h, w]`` array, neighbours overlapping by at
    least ``overlap`` pixels.

    Args:
      h, w: the array's spatial size.
      tile: window size (int or ``(th, tw)``); clamped to ``(h, w)``.
      overlap: minimum overlap, ``0 <= overlap < tile``.
    """
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if h < 1 or w < 1:
        raise ValueError(f"cannot tile an empty array of size {h}x{w}")
    if min(th, tw) < 1 or not 0 <= overlap < min(th, tw):
        raise ValueError(
            f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}"
        )
    th, tw = min(th, h), min(tw, w)
    ys = tile_starts(h, th, overlap)
    xs = tile_starts(w, tw, overlap)
    return TilePlan(shape=(h, w), tile=(th, tw), origins=tuple((y, x) for y in ys for x in xs))


def gaussian_weights(tile: int | tuple[int, int], sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Separable Gaussian blending weights, float32 ``[th, tw]``, peak 1 at the window centre.

    ``sigma`` is relative to the window size (SeeSR: 0.1). The weights stay positive at the
    edges (about 4e-6 there for sigma 0.1), so a pixel covered by one window keeps its value.
    """
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")

    def profile(n):
        pos = (np.arange(n) - (n - 1) / 2) / n
        return np.exp(-0.5 * (pos / sigma) ** 2)

    return np.outer(profile(th), profile(tw)).astype(np.float32)


def extract_tiles(x: jax.Array, plan: TilePlan) -> jax.Array:
    """Cut the planned windows out of ``x`` ``[B, h, w, C]`` -> ``[n_tiles, B, th, tw, C]``.

    One gather over the origin table (not one slice per window), so the compiled program does not
    grow with the number of windows.
    """
    if tuple(x.shape[1:3]) != plan.shape:
        raise ValueError(
            f"array spatial size {x.shape[1:3]} does not match the plan's {plan.shape}"
        )
    b, _, _, c = x.shape
    th, tw = plan.tile
    cut = lambda o: lax.dynamic_slice(x, (0, o[0], o[1], 0), (b, th, tw, c))
    return jax.vmap(cut)(jnp.asarray(plan.origins, jnp.int32))


def blend_tiles(tiles: jax.Array, plan: TilePlan, weights) -> jax.Array:
    """Blend per-window outputs back: ``sum_i w_i * tile_i / sum_i w_i`` at every pixel.

    Args:
      tiles: ``[n_tiles, B, th, tw, C]`` in ``plan.origins`` order.
      plan: the plan the tiles were extracted with.
      weights: ``[th, tw]`` positive weights (e.g. :func:`gaussian_weights`); the same for
        every window.

    Returns:
      ``[B, h, w, C]`` in ``tiles``' dtype (accumulated in float32). Identical tiles blend back
      to the original up to float32 rounding, whatever the weights.
    """
    n, b, th, tw, c = tiles.shape
    if n != len(plan) or (th, tw) != plan.tile:
        raise ValueError(
            f"tiles {tiles.shape} do not match the plan ({len(plan)} windows of {plan.tile})"
        )
    wt = jnp.asarray(weights, jnp.float32)
    if wt.shape != (th, tw):
        raise ValueError(f"weights shape {wt.shape} != tile shape {(th, tw)}")
    h, w = plan.shape

    # A scan over windows (one read-add-write of a window per iteration, in place): compile time
    # stays constant in the number of windows, where an unrolled loop grows with it.
    def add(carry, xs):
        acc, norm = carry
        tile, o = xs
        at = (0, o[0], o[1], 0)
        cur = lax.dynamic_slice(acc, at, (b, th, tw, c))
        acc = lax.dynamic_update_slice(acc, cur + tile.astype(jnp.float32) * wt[:, :, None], at)
        cur = lax.dynamic_slice(norm, (o[0], o[1]), (th, tw))
        return (acc, lax.dynamic_update_slice(norm, cur + wt, (o[0], o[1]))), None

    init = (jnp.zeros((b, h, w, c), jnp.float32), jnp.zeros((h, w), jnp.float32))
    (acc, norm), _ = lax.scan(add, init, (tiles, jnp.asarray(plan.origins, jnp.int32)))
    return (acc / norm[:, :, None]).astype(tiles.dtype)
