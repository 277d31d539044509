"""Where tiles go: one placement rule for everything that works on an image window by window.

The sampler's latent tiles (:mod:`segsr_jax.diffusion.tiling`), the VAE's encoder and decoder
tiles (:mod:`segsr_jax.models.vae_tiling`) and the labeller's SegFormer windows
(:mod:`segsr_jax.label`) all place their windows with :func:`tile_starts`: along each axis the
first window starts at 0, the last ends flush with the end, and the rest are spread evenly
between them, as few as keep every overlap at least the requested one. Even spreading gives
equal overlaps rather than one sliver at the end, and no window ever sees invented pixels.
"""

from __future__ import annotations

import math


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of windows of length ``tile`` covering ``[0, size)`` along one axis.

    The first window starts at 0 and the last ends at ``size``; starts are multiples of
    ``align`` (``size - tile`` must be one) and consecutive windows overlap by at least
    ``overlap``. ``size <= tile`` gives ``[0]`` (the caller then uses ``size`` as the window
    length, or pads up to one window).
    """
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if (size - tile) % align:
        raise ValueError(f"size - tile = {size - tile} is not a multiple of align={align}")
    n = math.ceil((size - overlap) / (tile - overlap))
    span = (size - tile) // align
    # floor(v + 0.5), not round(): banker's rounding could make one step exceed the stride.
    return [align * math.floor(i * span / (n - 1) + 0.5) for i in range(n)]


def owned_ranges(starts: list[int], size: int, tile: int) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` each window keeps when every position is taken from exactly one
    window: boundaries at the middle of consecutive windows' overlap, so each position comes
    from the window in which it lies farthest from an edge."""
    cuts = [0] + [(a + tile + b) // 2 for a, b in zip(starts, starts[1:], strict=False)]
    return list(zip(cuts, cuts[1:] + [size], strict=True))
