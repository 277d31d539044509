"""Periodic sample grids on a fixed validation batch (LQ | SR | segmentation | HR).

The sampler is the inference one (:func:`segsr_jax.diffusion.sampling.make_sample_fn`), run
on the EMA params put over the frozen ones, in the layout training holds them in (FSDP
shards stay sharded), so a grid shows what the checkpoint saved at the same step would
produce. It is compiled once, before training starts.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from segsr_jax import images, parallel
from segsr_jax.data.pipeline import to_global_arrays
from segsr_jax.diffusion import samplers, sampling
from segsr_jax.diffusion.schedules import NoiseConfig
from segsr_jax.models.segsr import SegSRConfig
from segsr_jax.training.metrics_log import sample_grid


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """How the validation grid is sampled.

    Attributes:
      sampler, steps: the inference sampler and its step count.
      guidance: text CFG scale (1.0: no guidance, half the cost).
      prompt, negative_prompt: the prompts of every image.
      color_fix: ``adain`` | ``wavelet`` | ``none``.
      seed: the sampler's noise.
      seg_prior: ``diffusion`` | ``fixed`` | ``none`` (see ``sampling.SEG_PRIORS``).
    """

    sampler: str = "ddim"
    steps: int = 20
    guidance: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    color_fix: str = "adain"
    seed: int = 0
    seg_prior: str = "diffusion"


class Validator:
    """Samples the fixed batch with given params and returns the grid (process 0: all rows).

    Args:
      graphdef: the *whole* model's graphdef (``nnx.split(model)`` with one state).
      model_config: the model's config (latent factor, prediction type, classes).
      batch: this process's share of the validation batch: ``hr``, ``lq``, ``label`` uint8.
      tokenizer: the run's prompt tokenizer.
      config: sampler settings.
      mesh: the training mesh (the batch is split over ``'data'``).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_config: SegSRConfig,
        batch: dict,
        tokenizer,
        config: ValidationConfig,
        mesh: Mesh,
    ):
        total = len(batch["hr"]) * jax.process_count()
        if total % mesh.shape["data"]:
            raise ValueError(
                f"sample.num_images {total} must be a multiple of the mesh's data "
                f"axis ({mesh.shape['data']})"
            )
        self.config = config
        self.num_classes = model_config.segdm.num_classes
        self.batch = batch
        n_local = len(batch["hr"])
        hw = batch["hr"].shape[1:3]
        lq_up = np.stack([images.to_unit_range(images.resize(x, hw)) for x in batch["lq"]])
        spec = PartitionSpec("data")
        self.lq = to_global_arrays(lq_up.astype(np.float32), mesh, spec)
        guided = config.guidance != 1.0
        ids = to_global_arrays(tokenizer([config.prompt] * n_local), mesh, spec)
        uids = (
            to_global_arrays(tokenizer([config.negative_prompt] * n_local), mesh, spec)
            if guided
            else None
        )
        self.plan = sampling.make_plan(
            hw,
            model_config.latent_factor,
            tile=max(hw) // model_config.latent_factor,
            overlap=0,
            tiles_per_call=1,
            guidance=guided,
            color_fix=config.color_fix,
            seg_prior=config.seg_prior,
        )
        self.schedule = samplers.make_schedule(
            config.sampler, config.steps, NoiseConfig(prediction_type=model_config.prediction_type)
        )
        rows = parallel.batch_sharding(mesh)
        self._encode = jax.jit(
            lambda p, i: nnx.merge(graphdef, p).encode_prompts(i), out_shardings=rows
        )
        self._ids = (ids, uids)
        self._graphdef, self._mesh = graphdef, mesh
        self._compiled = None

    def _args(self, params: dict):
        ids, uids = self._ids
        ctx = self._encode(params, ids)
        uctx = None if uids is None else self._encode(params, uids)
        return (
            params,
            self.lq,
            ctx,
            uctx,
            jnp.float32(self.config.guidance),
            self.schedule,
            jax.random.key(self.config.seed),
        )

    def compile(self, params: dict) -> float:
        """Compile the sampler for these params' shapes and shardings (the training layout,
        FSDP included: nothing is gathered or replicated first); returns the seconds it
        took. Later calls must hand over params in the same layout."""
        t0 = time.perf_counter()
        fn = sampling.make_sample_fn(
            self._graphdef, self.plan, self._mesh, state_shardings=sampling.shardings_of(params)
        )
        self._compiled = fn.lower(*self._args(params)).compile()
        return time.perf_counter() - t0

    def __call__(self, params: dict) -> np.ndarray:
        """uint8 grid ``[N * H, 4 * W, 3]`` of the whole validation batch."""
        if self._compiled is None:
            self.compile(params)
        out = self._compiled(*self._args(params))
        local = {k: self.batch[k] for k in ("lq", "hr")}
        if jax.process_count() > 1:  # every process gets the whole batch (process 0 draws it)
            out = multihost_utils.process_allgather(out, tiled=True)
            local = multihost_utils.process_allgather(local, tiled=True)
        out = jax.device_get(out)
        sr = images.from_unit_range(np.asarray(out.image))
        seg = np.stack(
            [images.colorize(y.astype(np.uint8), self.num_classes) for y in np.asarray(out.labels)]
        )
        return sample_grid(np.asarray(local["lq"]), sr, seg, np.asarray(local["hr"]))
