"""How to sample: the one options dataclass, the segmentation prior, and SeeSR's defaults.

Plain Python (no JAX import), so that ``python -m segsr_jax.sample --help`` can show the
defaults at once. Everything that samples (:class:`segsr_jax.inference.Restorer`, the
training run's validation grid, the benchmarks) describes a run with one
:class:`SampleOptions` and hands it to :class:`segsr_jax.diffusion.session.SamplingSession`.
"""

from __future__ import annotations

import dataclasses
import math

# SeeSR's inference prompts: the positive suffix and the negative prompt (text-only CFG).
SEESR_PROMPT = "clean, high-resolution, 8k"
SEESR_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"

SEG_PRIORS = ("diffusion", "fixed", "none")


CLEANERS = ("none", "realesrgan")
PROMPT_MODES = ("fixed", "tags")
SEG_REEMBEDS = ("soft", "hard")
SEG_MAPS = ("mean", "last")
SEG_GRIDS = ("ddp", "shared")


def parse_class_scale(text: str) -> tuple[tuple[str, float], ...]:
    """``"sky=0.3,blue grass=1.5"`` -> ``(("sky", 0.3), ("blue grass", 1.5))`` (names may hold
    spaces; the last ``=`` of each item splits name and scale).

    Raises:
      ValueError: an item without ``=``, an empty name, a scale that is not a finite number
        >= 0, or a name given twice.
    """
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"class scale {item!r}: write CLASS=SCALE, e.g. sky=0.5")
        try:
            scale = float(value)
        except ValueError:
            raise ValueError(f"class scale {item!r}: {value!r} is not a number") from None
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"class scale {item!r}: the scale must be a number >= 0")
        if name in out:
            raise ValueError(f"class scale: {name!r} is given twice")
        out[name] = scale
    return tuple(out.items())


def strength_steps(num_steps: int, strength: float) -> int:
    """How many of ``num_steps`` timesteps a run of ``strength`` in ``(0, 1]`` takes: the last
    ``round(strength * num_steps)``, at least one (diffusers' img2img truncates instead)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    return max(1, min(num_steps, round(strength * num_steps)))


@dataclasses.dataclass(frozen=True)
class SegPrior:
    """What conditions SRDM on segmentation; static, part of a compiled sampler's plan.

    * ``diffusion``: full SegSR (the paper's method): SegDM refines ``S_t`` jointly with
      ``Z_t`` and the bridge couples the two both ways.
    * ``fixed``: ``S_t`` is the fixed segmenter's labels on the LQ image at every step
      (embedded like SegDM's clean maps) and reaches SRDM through the bridge; SegDM's output
      is unused (XLA drops it from the program). The "fixed segmentation prior" ablation.
    * ``none``: SRDM alone (``C_t = 0``, as in training stage ``sr``); the bridge does not run.

    With ``fixed`` and ``none`` the segmentation a run returns is the fixed segmenter's map.
    """

    name: str = "diffusion"

    def __post_init__(self):
        if self.name not in SEG_PRIORS:
            raise ValueError(f"seg_prior {self.name!r} is not one of {SEG_PRIORS}")

    @classmethod
    def of(cls, prior: str | SegPrior) -> SegPrior:
        """``prior`` as a :class:`SegPrior` (a name is checked)."""
        return prior if isinstance(prior, SegPrior) else cls(prior)

    @property
    def refined(self) -> bool:
        """Whether SegDM denoises ``S_t`` step by step (else ``S_t`` is the fixed map)."""
        return self.name == "diffusion"

    @property
    def use_bridge(self) -> tuple[bool, bool]:
        """``(use C_t, use I_t)`` for :meth:`segsr_jax.models.segsr.SegSR.denoise`."""
        return (self.name != "none", self.name == "diffusion")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How to sample (see ``python -m segsr_jax.sample --help``); the defaults are SeeSR's.

    Attributes:
      sampler: ``ddpm`` | ``ddim`` | ``dpmpp_2m``.
      steps: denoising steps.
      guidance: text CFG scale (1.0: no guidance, half the cost).
      prompt, negative_prompt: the prompts of every image.
      tile, tile_overlap: the latent tile and the tiles' minimum overlap (latent pixels).
      tiles_per_call: tiles denoised together in one model call (memory vs. speed).
      color_fix: ``adain`` | ``wavelet`` | ``none``.
      min_side: an LQ image with a shorter side is enlarged to it before sampling
        (:func:`segsr_jax.diffusion.geometry.working_size`).
      seg_prior: ``diffusion`` | ``fixed`` | ``none`` (:class:`SegPrior`).
      seed: the sampler's noise.
      strength: in ``(0, 1]``: start from the LQ noised part of the way and run only the last
        ``round(strength * steps)`` steps (img2img; 1: SeeSR's whole reverse process). Small
        values keep the input's structure and cost fewer steps.
      cleaner: ``none`` | ``realesrgan``: what upscales the LQ before the diffusion model
        sees it (``none``: bicubic; ``realesrgan``: Real-ESRGAN x4plus removes the
        degradation first, DiffBIR's first stage; :mod:`segsr_jax.upscalers`).
      prompt_mode: ``fixed`` (``prompt`` for every image) or ``tags``: each image's prompt is
        the names of the classes the LQ segmenter finds in it, largest area first (at most
        ``max_tags``), then ``prompt`` -- the prompts a model trained with seg-tag prompts
        saw (SeeSR's tag prompts, with our segmenter as the tagger).
      max_tags: at most this many class names in a ``tags`` prompt.
      seg_reembed: how SegDM's clean-map prediction re-enters its next state: ``soft`` (the
        expected class embedding under the predicted probabilities) or ``hard`` (the
        embedding of the predicted class: the one-hot maps SegDM saw in training).
      seg_map: which of SegDM's maps a run returns: ``mean`` (the default: the argmax of its
        class probabilities averaged over every step, within 0.002 mIoU of the best step for
        a SegDM trained on the sampler's state, ``LossConfig.seg_rollout_steps``) or ``last``
        (its last step: level with the best for such a SegDM on the ``ddp`` seg grid, below
        it as designed). README, "SegDM's trajectory".
      seg_grid: the times SegDM is evaluated at: ``ddp`` (DDP's sampler grid, evenly spaced
        from the first step's time, the last evaluation at 1/N of it) or ``shared`` (the SR
        timesteps' own, ``t / T``; the last evaluation at t = 0.001, the log-SNR cap that
        training seldom draws, where SegDM's map can drop; every result recorded before
        2026-12-04 was made with it). :func:`segsr_jax.diffusion.samplers.seg_coeffs`.
      class_scale: per-class generative strength, ``((class name, scale), ...)``: at every
        step the model's clean-latent estimate is moved from the LQ latent by ``scale`` times
        its own offset, pixel by pixel weighted by the segmentation's current soft map
        (0: keep the LQ there, 1: unchanged, above 1: more generated detail); classes not
        named keep 1. Also given as ``"sky=0.3,grass=1.5"`` (:func:`parse_class_scale`).

    Raises:
      ValueError: a setting no sampler can run with (named in the message).
    """

    sampler: str = "ddpm"
    steps: int = 50
    guidance: float = 5.5
    prompt: str = SEESR_PROMPT
    negative_prompt: str = SEESR_NEGATIVE_PROMPT
    tile: int = 96
    tile_overlap: int = 32
    tiles_per_call: int = 4  # Restorer.options: 1 on CPU (inference.default_tiles_per_call)
    color_fix: str = "adain"
    min_side: int = 128
    seg_prior: str = "diffusion"
    seed: int = 0
    strength: float = 1.0
    cleaner: str = "none"
    prompt_mode: str = "fixed"
    max_tags: int = 3
    seg_reembed: str = "soft"
    seg_map: str = "mean"
    seg_grid: str = "ddp"
    class_scale: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        scales = self.class_scale
        if isinstance(scales, str):
            scales = parse_class_scale(scales)
        elif isinstance(scales, dict):
            scales = scales.items()
        # Hashable and canonical, also when read back from a checkpoint's JSON lists.
        object.__setattr__(self, "class_scale", tuple((str(n), float(v)) for n, v in scales))
        parse_class_scale(",".join(f"{n}={v}" for n, v in self.class_scale))  # same checks
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(
                f"prompt mode {self.prompt_mode!r}: choose one of {', '.join(PROMPT_MODES)}"
            )
        if self.seg_reembed not in SEG_REEMBEDS:
            raise ValueError(
                f"seg_reembed {self.seg_reembed!r}: choose one of {', '.join(SEG_REEMBEDS)}"
            )
        if self.seg_map not in SEG_MAPS:
            raise ValueError(f"seg_map {self.seg_map!r}: choose one of {', '.join(SEG_MAPS)}")
        if self.seg_grid not in SEG_GRIDS:
            raise ValueError(f"seg_grid {self.seg_grid!r}: choose one of {', '.join(SEG_GRIDS)}")
        if self.max_tags < 1:
            raise ValueError(f"max_tags must be >= 1, not {self.max_tags}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, not {self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a number >= 0, not {self.guidance}")
        if self.tile < 1 or self.tiles_per_call < 1:
            raise ValueError(
                f"tile ({self.tile}) and tiles per call ({self.tiles_per_call}) must be >= 1"
            )
        if not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile overlap {self.tile_overlap} must be in [0, tile {self.tile})")
        if self.min_side < 0:
            raise ValueError(f"min_side must be >= 0, not {self.min_side}")
        SegPrior.of(self.seg_prior)
        strength_steps(self.steps, self.strength)  # refuses a strength outside (0, 1]
        if self.cleaner not in CLEANERS:
            raise ValueError(f"cleaner {self.cleaner!r}: choose one of {', '.join(CLEANERS)}")

    @property
    def denoising_steps(self) -> int:
        """The steps a run takes: the last ``round(strength * steps)`` of the schedule."""
        return strength_steps(self.steps, self.strength)

    @property
    def prior(self) -> SegPrior:
        """:attr:`seg_prior` as a :class:`SegPrior`."""
        return SegPrior(self.seg_prior)

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> SampleOptions:
        """Options from ``values`` (e.g. a checkpoint's or a config's sampling section; keys
        that are no option are ignored), then ``overrides`` (None: keep)."""
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {k: v for k, v in values.items() if k in known}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)
