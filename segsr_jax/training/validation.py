"""Periodic sample grids on a fixed validation batch (LQ | SR | segmentation | HR).

The sampler is the inference one, through the same
:class:`~segsr_jax.diffusion.session.SamplingSession` as
:class:`segsr_jax.inference.Restorer`, run on the EMA params put over the frozen ones, in
the layout training holds them in (FSDP shards stay sharded), so a grid shows what the
checkpoint saved at the same step would produce. It is compiled once, before training starts.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from segsr_jax import images
from segsr_jax.diffusion import geometry
from segsr_jax.diffusion.options import SampleOptions
from segsr_jax.diffusion.session import SamplingSession
from segsr_jax.models.segsr import SegSRConfig
from segsr_jax.training.metrics_log import sample_grid


class Validator:
    """Samples the fixed batch with given params and returns the grid (process 0: all rows).

    Every image is sampled whole (one latent tile): validation crops are small.

    Args:
      graphdef: the *whole* model's graphdef (``nnx.split(model)`` with one state).
      model_config: the model's config (latent factor, prediction type, classes).
      batch: this process's share of the validation batch: ``hr``, ``lq``, ``label`` uint8.
      tokenizer: the run's prompt tokenizer.
      options: how to sample (tile settings are replaced by one whole-image tile).
      mesh: the training mesh (the batch is split over ``'data'``).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_config: SegSRConfig,
        batch: dict,
        tokenizer,
        options: SampleOptions,
        mesh: Mesh,
    ):
        total = len(batch["hr"]) * jax.process_count()
        if total % mesh.shape["data"]:
            raise ValueError(
                f"sample.num_images {total} must be a multiple of the mesh's data "
                f"axis ({mesh.shape['data']})"
            )
        self.num_classes = model_config.segdm.num_classes
        self.batch = batch
        hw = batch["hr"].shape[1:3]
        f = model_config.latent_factor
        self.hw, self.latent_hw = hw, (-(-hw[0] // f), -(-hw[1] // f))
        self.options = dataclasses.replace(
            options, tile=max(self.latent_hw), tile_overlap=0, tiles_per_call=1
        )
        self.lq = geometry.model_input(list(batch["lq"]), hw, f)
        self.session = SamplingSession(graphdef, model_config, tokenizer, mesh)

    def compile(self, params: dict) -> float:
        """Compile the sampler for these params' shapes and shardings (the training layout,
        FSDP included: nothing is gathered or replicated first); returns the seconds it
        took. Later calls must hand over params in the same layout."""
        t0 = time.perf_counter()
        self.session.prepare(params, self.lq, self.options)
        return time.perf_counter() - t0

    def __call__(self, params: dict) -> np.ndarray:
        """uint8 grid ``[N * H, 4 * W, 3]`` of the whole validation batch."""
        out, _ = self.session.run(params, self.lq, self.options)
        local = {k: self.batch[k] for k in ("lq", "hr")}
        if jax.process_count() > 1:  # every process gets the whole batch (process 0 draws it)
            out = multihost_utils.process_allgather(out, tiled=True)
            local = multihost_utils.process_allgather(local, tiled=True)
        out = jax.device_get(out)
        sr = images.from_unit_range(geometry.crop(np.asarray(out.image), self.hw))
        labels = geometry.crop(np.asarray(out.labels), self.latent_hw)
        seg = np.stack([images.colorize(y.astype(np.uint8), self.num_classes) for y in labels])
        return sample_grid(np.asarray(local["lq"]), sr, seg, np.asarray(local["hr"]))
