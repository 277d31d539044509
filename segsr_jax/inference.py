"""A loaded SegSR model ready to restore images: the library behind ``segsr_jax.sample``.

::

    restorer = Restorer.from_checkpoint("path/to/checkpoint")
    opts = restorer.options(steps=20)
    out_hw, work_hw = restorer.sizes(lq_uint8.shape[:2], upscale=4, options=opts)
    results, compile_s = restorer.restore_batch([lq_uint8], work_hw, options=opts)

Sampling goes through one :class:`~segsr_jax.diffusion.session.SamplingSession`, which caches
the compiled samplers per (plan, batch, steps, sampler): images of one size compile once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segsr_jax import checkpoint, images, parallel, upscalers
from segsr_jax.diffusion import geometry, tiling
from segsr_jax.diffusion.options import SampleOptions
from segsr_jax.diffusion.session import SamplingSession
from segsr_jax.models import layers
from segsr_jax.models.segsr import SegSR, SegSRConfig, ShapeOnlyRngs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POLL_SECONDS = 0.02
# After a device out-of-memory the latent tile is halved down to this (in latent pixels).
MIN_TILE = 16
# What XLA's out-of-memory errors say (status RESOURCE_EXHAUSTED, "Out of memory ...").
OOM_MARKERS = ("resource_exhausted", "out of memory")


def default_tiles_per_call() -> int:
    """Tiles per model call when neither the user nor the checkpoint says: 4 on GPU/TPU, 1 on
    CPU, where a bigger call does not run faster and the repeated padding tiles of the last
    call (sampling._denoise_tiles) are pure extra work (about 2x slower, measured)."""
    return 1 if jax.default_backend() == "cpu" else 4


def wait_ready(tree):
    """Block until every array in ``tree`` is computed, polling instead of blocking inside
    JAX, so that Ctrl-C (KeyboardInterrupt) is raised at once rather than after the call."""
    for leaf in jax.tree.leaves(tree):
        while not leaf.is_ready():
            time.sleep(POLL_SECONDS)
    return tree


class Restorer:
    """A SegSR model, its tokenizer and its sampling session (with the compiled samplers).

    With ``mesh``, the model's weights are already laid out on it (e.g. FSDP-sharded by
    :meth:`from_checkpoint` with ``fsdp > 1``) and stay there: the sampler takes them in that
    sharding, and splits each batch over the mesh's ``data`` axis when it divides evenly
    (otherwise every data group samples the whole batch).
    """

    def __init__(
        self,
        model: SegSR,
        tokenizer,
        defaults: dict | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config: SegSRConfig = model.config
        # Weights in their compute dtype once (bfloat16: half the memory, no casts per step).
        self.graphdef, self.state = nnx.split(layers.inference_weights(model))
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.defaults = dict(defaults or {})
        self._cleaners: dict = {}
        self.session = SamplingSession(
            self.graphdef, self.config, tokenizer, mesh, fixed_weights=True
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        dtype: str = "float32",
        fsdp: int = 1,
        rules: parallel.ShardingRules = parallel.FSDP_RULES,
    ) -> Restorer:
        """Load a checkpoint folder (its config decides the architecture; its ``tokenizer/``
        sub-folder the prompts' tokens). ``path`` may be a ``gs://`` URI.

        ``fsdp > 1`` restores the weights straight into shards over ``fsdp`` devices (a
        ``('data', 'fsdp')`` mesh of all devices; :data:`parallel.FSDP_RULES` split the big
        UNet / ControlNet / text-encoder kernels; ``rules`` to choose others), for a model
        that does not fit one device; no device ever holds the whole model.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        if fsdp < 1:
            raise ValueError(f"fsdp must be >= 1, not {fsdp}")
        mesh = None
        if fsdp > 1:
            if jax.device_count() % fsdp:
                raise ValueError(
                    f"--fsdp {fsdp} does not divide the {jax.device_count()} "
                    f"devices ({jax.default_backend()})"
                )
            mesh = parallel.make_mesh(-1, fsdp)

        def build(cfg: dict) -> SegSR:
            if "model" not in cfg:
                raise checkpoint.CheckpointMismatchError(
                    f"{path}: the checkpoint config has no 'model' section"
                )
            # Built under eval_shape only: ShapeOnlyRngs keeps that linear in model size.
            return SegSR(
                SegSRConfig.from_dict(cfg["model"]), dtype=DTYPES[dtype], rngs=ShapeOnlyRngs()
            )

        shardings = (
            None if mesh is None else (lambda target: parallel.tree_shardings(target, mesh, rules))
        )
        model, cfg = checkpoint.restore_model(path, build, shardings=shardings)
        # A gs:// checkpoint (Orbax reads it natively) keeps its tokenizer there too.
        folder = (
            f"{str(path).rstrip('/')}/tokenizer"
            if checkpoint.is_remote(path)
            else (Path(path) / "tokenizer")
        )
        tokenizer = checkpoint.load_tokenizer(folder)
        return cls(model, tokenizer, defaults=cfg.get("sampling", {}), mesh=mesh)

    def cleaner(self, name: str) -> upscalers.Upscaler:
        """The first-stage upscaler ``name`` (loaded once).

        Raises:
          upscalers.WeightsNotFoundError: its weights are not fetched (the message says how).
        """
        if name not in self._cleaners:
            self._cleaners[name] = upscalers.make_upscaler(name)
        return self._cleaners[name]

    @property
    def num_classes(self) -> int:
        """K, the segmentation classes."""
        return self.config.segdm.num_classes

    def options(self, **overrides) -> SampleOptions:
        """Sampling options: the checkpoint's defaults, then ``overrides`` (None = default);
        ``tiles_per_call`` set by neither is :func:`default_tiles_per_call`.

        Raises:
          ValueError: options that cannot be sampled with (e.g. a tile overlap not below the
            tile, one of them from the checkpoint).
        """
        return SampleOptions.from_dict(
            {"tiles_per_call": default_tiles_per_call(), **self.defaults}, **overrides
        )

    def sizes(
        self, lq_hw: tuple[int, int], upscale: float, options: SampleOptions
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(output size, working size)`` of an LQ image of ``lq_hw``
        (:func:`segsr_jax.diffusion.geometry.working_size` with the options' ``min_side``)."""
        return geometry.working_size(lq_hw, upscale, options.min_side)

    def restore_batch(
        self,
        lqs: list[np.ndarray],
        work_hw: tuple[int, int],
        options: SampleOptions,
        seed: int | None = None,
        record_labels: bool = False,
    ):
        """Super-resolve a batch of same-size LQ images.

        Args:
          lqs: uint8 ``[h, w, 3]`` LQ images.
          work_hw: the output size the model works at (each LQ is resized to it: bicubic, or
            the options' cleaner).
          options: sampling options.
          seed: PRNG seed (each batch position gets its own noise); None: ``options.seed``.
          record_labels: also return the segmentation's argmax after every step.

        Returns:
          ``(results, compile_seconds)``: ``results`` holds one ``(sr uint8 [H, W, 3],
          labels uint8/int [ceil(H/f), ceil(W/f)])`` per input, and compile time is 0 when
          the program was cached. With ``record_labels`` each result has a third item, the
          ``[steps, ceil(H/f), ceil(W/f)]`` uint8 label trajectory.
        """
        if seed is not None:
            options = dataclasses.replace(options, seed=seed)
        f = self.config.latent_factor
        if options.cleaner != "none":  # the first stage upscales to the working size itself
            clean = self.cleaner(options.cleaner)
            lqs = [clean(lq, work_hw) for lq in lqs]
        batch = geometry.model_input(lqs, work_hw, f)
        out, compile_s = self.session.run(self.state, batch, options, record_labels=record_labels)
        out = jax.device_get(wait_ready(out))
        latent_hw = (math.ceil(work_hw[0] / f), math.ceil(work_hw[1] / f))
        sr = images.from_unit_range(geometry.crop(out.image, work_hw))
        labels = geometry.crop(out.labels, latent_hw)
        lh, lw = latent_hw
        results = [
            (sr[i], labels[i]) + ((out.trajectory[i, :, :lh, :lw],) if record_labels else ())
            for i in range(len(lqs))
        ]
        return results, compile_s


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's device out-of-memory (a ``jax.errors.JaxRuntimeError`` with
    status RESOURCE_EXHAUSTED), raised when compiling or running a program too big for the
    device."""
    text = str(error).lower()
    return isinstance(error, jax.errors.JaxRuntimeError) and any(m in text for m in OOM_MARKERS)


def _tile_setting(options: SampleOptions, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """``(tile, tiles per call)`` as the sampler uses them on a latent of ``latent_hw``: the
    tile clamped to the latent, the tiles per call to the number of tiles."""
    plan = tiling.plan_tiles(*latent_hw, options.tile, options.tile_overlap)
    return max(plan.tile), max(1, min(options.tiles_per_call, len(plan.origins)))


def describe_setting(options: SampleOptions, n_images: int, latent_hw: tuple[int, int]) -> str:
    """E.g. ``"tile 96, 4 tiles per call"`` (``", 2 images per call"`` for a batch)."""
    tile, per_call = _tile_setting(options, latent_hw)
    text = f"tile {tile}, {per_call} tile{'s' if per_call > 1 else ''} per call"
    return text + (f", {n_images} images per call" if n_images > 1 else "")


def shrink_after_oom(options: SampleOptions, n_images: int, latent_hw: tuple[int, int]):
    """The next, smaller setting to try after sampling ``n_images`` of latent size
    ``latent_hw`` with ``options`` ran out of device memory: ``(options, images per call,
    what changed)``, or None when nothing is left to shrink.

    In order: halve the tiles per call (down to 1); then halve the latent tile (down to
    :data:`MIN_TILE`; the overlap shrinks in proportion, so it stays below the tile); then one
    image at a time. A step that would not change the compiled program (e.g. fewer tiles per
    call when the latent is one tile) is skipped.
    """
    tile, per_call = _tile_setting(options, latent_hw)
    if per_call > 1:
        fewer = per_call // 2
        return (
            dataclasses.replace(options, tiles_per_call=fewer),
            n_images,
            f"{fewer} tile{'s' if fewer > 1 else ''} per call",
        )
    smaller = max(MIN_TILE, tile // 2)
    if smaller < tile:
        overlap = options.tile_overlap * smaller // options.tile
        return (
            dataclasses.replace(options, tile=smaller, tile_overlap=overlap, tiles_per_call=1),
            n_images,
            f"tile {smaller} (overlap {overlap})",
        )
    if n_images > 1:
        return options, 1, "one image at a time"
    return None
