"""A loaded SegSR model ready to restore images: the library behind ``segsr_jax.sample``.

::

    restorer = Restorer.from_checkpoint("path/to/checkpoint")
    opts = restorer.options(steps=20)
    results, compile_s = restorer.restore_batch([lq_uint8], work_hw=(512, 512), options=opts)

Compiled samplers are cached per (plan, batch, steps, sampler): images of one size compile once.
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

from segsr_jax import checkpoint, images, parallel
from segsr_jax.diffusion import samplers, sampling
from segsr_jax.diffusion.schedules import NoiseConfig
from segsr_jax.models import layers
from segsr_jax.models.segsr import SegSR, SegSRConfig, ShapeOnlyRngs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POLL_SECONDS = 0.02


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


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How to sample (see ``python -m segsr_jax.sample --help``); the defaults are SeeSR's."""

    sampler: str = "ddpm"
    steps: int = 50
    guidance: float = 5.5
    prompt: str = "clean, high-resolution, 8k"  # SeeSR's positive suffix
    negative_prompt: str = "dotted, noise, blur, lowres, smooth"  # SeeSR's negative prompt
    tile: int = 96
    tile_overlap: int = 32
    tiles_per_call: int = 4  # Restorer.options: 1 on CPU (default_tiles_per_call)
    color_fix: str = "adain"
    min_side: int = 128
    seg_prior: str = "diffusion"  # SegSR; "fixed" / "none": ablations (sampling.SEG_PRIORS)


class Restorer:
    """A SegSR model, its tokenizer and a cache of compiled samplers.

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
        self._state_shardings = None if mesh is None else sampling.shardings_of(self.state)
        self.tokenizer = tokenizer
        self.defaults = dict(defaults or {})
        self._compiled: dict = {}
        self._contexts: dict = {}
        self._encode = jax.jit(
            lambda state, ids: nnx.merge(self.graphdef, state).encode_prompts(ids)
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
        from segsr_jax.training import workdir

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
            if workdir.is_remote(path)
            else (Path(path) / "tokenizer")
        )
        tokenizer = workdir.load_tokenizer(folder)
        return cls(model, tokenizer, defaults=cfg.get("sampling", {}), mesh=mesh)

    @property
    def num_classes(self) -> int:
        """K, the segmentation classes."""
        return self.config.segdm.num_classes

    def options(self, **overrides) -> SampleOptions:
        """Sampling options: the checkpoint's defaults, then ``overrides`` (None = default);
        ``tiles_per_call`` set by neither is :func:`default_tiles_per_call`."""
        known = {f.name for f in dataclasses.fields(SampleOptions)}
        merged = {"tiles_per_call": default_tiles_per_call()}
        merged.update({k: v for k, v in self.defaults.items() if k in known})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return SampleOptions(**merged)

    def _context(self, prompt: str, batch: int) -> jax.Array:
        if prompt not in self._contexts:
            ids = jnp.asarray(self.tokenizer([prompt]))
            self._contexts[prompt] = self._encode(self.state, ids)
        return jnp.tile(self._contexts[prompt], (batch, 1, 1))

    def _placement(self, n: int):
        """``(mesh, batch sharding)`` for a batch of ``n``: the Restorer's own mesh (batch
        over ``'data'`` when it divides, else replicated), else all devices' ``data`` mesh
        when ``n`` divides over them, else ``(None, None)`` (one device)."""
        if self.mesh is not None:
            split = n % self.mesh.shape["data"] == 0
            return self.mesh, (
                parallel.batch_sharding(self.mesh) if split else parallel.replicated(self.mesh)
            )
        ndev = jax.device_count()
        if ndev > 1 and n % ndev == 0:
            mesh = parallel.make_mesh()
            return mesh, parallel.batch_sharding(mesh)
        return None, None

    def restore_batch(
        self,
        lqs: list[np.ndarray],
        work_hw: tuple[int, int],
        options: SampleOptions,
        seed: int = 0,
        record_labels: bool = False,
    ):
        """Super-resolve a batch of same-size LQ images.

        Args:
          lqs: uint8 ``[h, w, 3]`` LQ images.
          work_hw: the output size the model works at (each LQ is bicubically resized to it).
          options: sampling options.
          seed: PRNG seed (each batch position gets its own noise).
          record_labels: also return the segmentation's argmax after every step.

        Returns:
          ``(results, compile_seconds)``: ``results`` holds one ``(sr uint8 [H, W, 3],
          labels uint8/int [ceil(H/f), ceil(W/f)])`` per input, and compile time is 0 when
          the program was cached. With ``record_labels`` each result has a third item, the
          ``[steps, ceil(H/f), ceil(W/f)]`` uint8 label trajectory.
        """
        f = self.config.latent_factor
        n = len(lqs)
        batch = np.stack([images.to_unit_range(images.resize(x, work_hw)) for x in lqs])
        h, w = work_hw
        ph, pw = -h % f, -w % f
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "edge"
            batch = np.pad(batch, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
        guided = options.guidance != 1.0
        plan = sampling.make_plan(
            batch.shape[1:3],
            f,
            tile=options.tile,
            overlap=options.tile_overlap,
            tiles_per_call=options.tiles_per_call,
            guidance=guided,
            color_fix=options.color_fix,
            seg_prior=options.seg_prior,
            record_labels=record_labels,
        )
        sched = samplers.make_schedule(
            options.sampler, options.steps, NoiseConfig(prediction_type=self.config.prediction_type)
        )
        mesh, batch_sharding = self._placement(n)
        ctx = self._context(options.prompt, n)
        uctx = self._context(options.negative_prompt, n) if guided else None
        key = jax.random.key(seed)
        lq = jnp.asarray(batch)
        if batch_sharding is not None:  # contexts from sharded text weights come out sharded
            lq, ctx, uctx = jax.device_put((lq, ctx, uctx), batch_sharding)
        args = (self.state, lq, ctx, uctx, jnp.float32(options.guidance), sched, key)
        cache_key = (plan, n, options.steps, options.sampler, mesh is not None)
        compile_s = 0.0
        if cache_key not in self._compiled:
            t0 = time.perf_counter()
            fn = sampling.make_sample_fn(
                self.graphdef, plan, mesh, self._state_shardings, batch_sharding
            )
            self._compiled[cache_key] = fn.lower(*args).compile()
            compile_s = time.perf_counter() - t0
        out = jax.device_get(wait_ready(self._compiled[cache_key](*args)))
        lh, lw = math.ceil(h / f), math.ceil(w / f)
        results = [
            (images.from_unit_range(out.image[i, :h, :w]), out.labels[i, :lh, :lw])
            + ((out.trajectory[i, :, :lh, :lw],) if record_labels else ())
            for i in range(n)
        ]
        return results, compile_s
