"""Static shape decisions of a compiled sampler: the latent tiles, the VAE tiles, guidance,
the segmentation prior (hashable, so a plan is part of the jit cache key and nothing
recompiles for another image of the same size).

::

    plan = make_plan((512, 512), latent_factor=8, tile=96, overlap=32)
"""

from __future__ import annotations

import dataclasses

from segsr_jax.diffusion import tiling
from segsr_jax.diffusion.options import SegPrior


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Static shape decisions of one compiled sampler (hashable; part of the jit cache key).

    Attributes:
      image_shape: ``(H, W)`` of the (upscaled, padded) LQ input, multiples of the latent factor.
      tiles: the latent tile plan (one window when the latent fits in a tile).
      tiles_per_call: tiles denoised together in one model call (memory vs. speed).
      guidance: whether classifier-free guidance (a doubled batch) is used.
      color_fix: ``adain`` | ``wavelet`` | ``none``.
      vae_tile: VAE encoder tile in pixels and decoder tile in latent pixels, or None to run
        the VAE on the whole image.
      vae_overlap: their overlaps (pixels, latent pixels).
      t_start: the SR timestep the LQ latent is noised to (SeeSR: 999; with a strength
        below 1 the first kept timestep, :func:`segsr_jax.diffusion.samplers.start_timestep`,
        and the segmentation starts from the LQ segmenter's map noised to the same time).
      seg_prior: what conditions SRDM on segmentation (:class:`SegPrior`).
      record_labels: also return the segmentation's argmax after every step
        (:attr:`SampleOutput.trajectory`).
      class_scale: whether the sampler takes a per-class scale of the generated offset
        (:attr:`segsr_jax.diffusion.options.SampleOptions.class_scale`); without it the
        program is the same as before the option existed.
      seg_reembed: ``soft`` | ``hard``, how SegDM's prediction is re-embedded
        (:attr:`segsr_jax.diffusion.options.SampleOptions.seg_reembed`).
      seg_map: ``mean`` | ``last``, which SegDM map a run returns
        (:attr:`segsr_jax.diffusion.options.SampleOptions.seg_map`).
    """

    image_shape: tuple[int, int]
    tiles: tiling.TilePlan
    tiles_per_call: int = 1
    guidance: bool = True
    color_fix: str = "adain"
    vae_tile: tuple[int, int] | None = None
    vae_overlap: tuple[int, int] = (64, 8)
    t_start: int = 999
    seg_prior: SegPrior = SegPrior()
    record_labels: bool = False
    class_scale: bool = False
    seg_reembed: str = "soft"
    seg_map: str = "mean"


def make_plan(
    image_hw: tuple[int, int],
    latent_factor: int,
    *,
    tile: int = 96,
    overlap: int = 32,
    tiles_per_call: int = 4,
    guidance: bool = True,
    color_fix: str = "adain",
    vae_encode_tile: int = 1024,
    vae_decode_tile: int = 224,
    seg_prior: str | SegPrior = "diffusion",
    record_labels: bool = False,
    t_start: int = 999,
    class_scale: bool = False,
    seg_reembed: str = "soft",
    seg_map: str = "mean",
) -> SamplingPlan:
    """A :class:`SamplingPlan` for an LQ input of ``image_hw`` (already upscaled and padded).

    ``tile``/``overlap`` are in latent pixels (SeeSR: 96 / 4; OSEDiff overlap 32). The VAE
    is tiled only when the image exceeds ``vae_encode_tile`` pixels or the latent exceeds
    ``vae_decode_tile``.
    """
    h, w = image_hw
    if h % latent_factor or w % latent_factor:
        raise ValueError(f"image size {image_hw} must be a multiple of {latent_factor}")
    lh, lw = h // latent_factor, w // latent_factor
    plan = tiling.plan_tiles(lh, lw, tile, overlap)
    big = max(h, w) > vae_encode_tile or max(lh, lw) > vae_decode_tile
    vae_tile = (vae_encode_tile, vae_decode_tile) if big else None
    enc_overlap = max(latent_factor, (vae_encode_tile // 16) // latent_factor * latent_factor)
    return SamplingPlan(
        image_shape=(h, w),
        tiles=plan,
        tiles_per_call=max(1, min(tiles_per_call, len(plan))),
        guidance=guidance,
        color_fix=color_fix,
        vae_tile=vae_tile,
        vae_overlap=(enc_overlap, max(1, vae_decode_tile // 16)),
        seg_prior=SegPrior.of(seg_prior),
        record_labels=record_labels,
        t_start=t_start,
        class_scale=class_scale,
        seg_reembed=seg_reembed,
        seg_map=seg_map,
    )
