"""One sampling session: from "this LQ batch, these options" to the compiled sampler's output.

::

    session = SamplingSession(graphdef, model_config, tokenizer, mesh=None)
    out, compile_s = session.run(state, lq, options)   # lq: geometry.model_input(...)

Everything that samples goes through here (:class:`segsr_jax.inference.Restorer`, the
training run's validation grid, the benchmarks), so the set-up is written once: the static
:class:`~segsr_jax.diffusion.plans.SamplingPlan` from the options (classifier-free
guidance only when the scale asks for it), the schedule, where the batch goes (the session's
mesh, all devices, or one), the prompts encoded by one jitted text encoder, and the sampler
compiled ahead of time (``lower().compile()``) once per plan, batch, schedule and placement.

The weights (``state``) are an argument of every call, not part of the session: a training
run hands over new EMA params each time. A session made with ``fixed_weights=True`` (a
loaded model) may therefore keep the prompts' contexts between calls.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segsr_jax import parallel
from segsr_jax.diffusion import plans, samplers, sampling
from segsr_jax.diffusion.options import SampleOptions
from segsr_jax.diffusion.schedules import NoiseConfig
from segsr_jax.models import guidance
from segsr_jax.models.segsr import SegSRConfig


@dataclasses.dataclass(frozen=True)
class Call:
    """One sampler call, not compiled yet: ``fn(*args)`` samples.

    Attributes:
      fn: the jitted sampler (:func:`sampling.make_sample_fn`) for this plan and placement.
      args: ``(state, lq, context, uncond_context, guidance_scale, schedule, key)`` (and the
        ``[K]`` class scale with ``plan.class_scale``).
      plan: its static plan.
      key: what the compiled program depends on (plan, batch, sampler, steps, placement).
    """

    fn: object
    args: tuple
    plan: plans.SamplingPlan
    key: tuple


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A compiled sampler and the arguments of one call: ``program(*args)`` samples.

    Attributes:
      program: the compiled sampler (``jax.stages.Compiled``).
      args: ``(state, lq, context, uncond_context, guidance_scale, schedule, key)``.
      plan: its static plan.
      compile_s: seconds spent compiling it now (0 when it was cached).
    """

    program: object
    args: tuple
    plan: plans.SamplingPlan
    compile_s: float


def _encode(graphdef, state, ids, n: int, sharding):
    """The prompt's context ``[1, L, D]`` repeated for a batch of ``n`` (jitted; the same
    prompt for every image, so it is encoded once), constrained to ``sharding``."""
    ctx = jnp.tile(nnx.merge(graphdef, state).encode_prompts(ids), (n, 1, 1))
    return ctx if sharding is None else jax.lax.with_sharding_constraint(ctx, sharding)


def _encode_each(graphdef, state, ids, sharding):
    """One prompt per image: contexts ``[n, L, D]`` of ids ``[n, L]`` (jitted)."""
    ctx = nnx.merge(graphdef, state).encode_prompts(ids)
    return ctx if sharding is None else jax.lax.with_sharding_constraint(ctx, sharding)


def tag_prompt(labels: np.ndarray, class_names, max_tags: int, prompt: str) -> str:
    """The seg-tag prompt of one image: the classes in ``labels`` largest first (as training's
    :func:`segsr_jax.training.prompts.seg_tags`), then ``prompt`` when it is not empty."""
    from segsr_jax.training.prompts import seg_tags

    return ", ".join(x for x in (seg_tags(labels, class_names, max_tags), prompt) if x)


class SamplingSession:
    """Plans, compiles and runs the sampler of one model for any batch and options.

    Args:
      graphdef: the SegSR model's graphdef (``nnx.split``).
      config: the model's config (latent factor, prediction type).
      tokenizer: the prompts' tokenizer, or None when every call brings its own contexts.
      mesh: the mesh the weights lie on (e.g. FSDP shards), which the sampler takes them in;
        a batch is split over its ``'data'`` axis when it divides evenly, else every data
        group samples the whole batch. None: the weights are on one device, and a batch that
        divides over all devices is split over them (weights replicated).
      fixed_weights: the ``state`` of every call is the same, so prompt contexts are kept.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        config: SegSRConfig,
        tokenizer=None,
        mesh: jax.sharding.Mesh | None = None,
        *,
        fixed_weights: bool = False,
    ):
        self.graphdef = graphdef
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.fixed_weights = fixed_weights
        self._programs: dict = {}
        self._contexts: dict = {}
        self._schedules: dict = {}
        self._replicas: dict = {}
        self._encode = jax.jit(partial(_encode, graphdef), static_argnums=(2, 3))
        self._encode_each = jax.jit(partial(_encode_each, graphdef), static_argnums=2)
        self._lq_label_fns: dict = {}
        self._noise = NoiseConfig(prediction_type=config.prediction_type)

    def plan(
        self,
        image_hw: tuple[int, int],
        options: SampleOptions,
        record_labels: bool = False,
        **vae_tiles,
    ) -> plans.SamplingPlan:
        """The static plan for a padded input of ``image_hw`` (``vae_tiles``: the VAE tile
        sizes of :func:`plans.make_plan`, for experiments)."""
        return plans.make_plan(
            image_hw,
            self.config.latent_factor,
            tile=options.tile,
            overlap=options.tile_overlap,
            tiles_per_call=options.tiles_per_call,
            guidance=guidance.uses_guidance(options.guidance),
            color_fix=options.color_fix,
            seg_prior=options.seg_prior,
            record_labels=record_labels,
            class_scale=bool(options.class_scale),
            seg_reembed=options.seg_reembed,
            seg_map=options.seg_map,
            t_start=samplers.start_timestep(
                self.schedule(options), self._noise.num_train_timesteps, options.strength
            ),
            **vae_tiles,
        )

    def schedule(self, options: SampleOptions) -> samplers.Schedule:
        """The options' sampler, step count, strength and seg grid for this model's forward
        process."""
        key = (options.sampler, options.steps, options.strength, options.seg_grid)
        if key not in self._schedules:
            self._schedules[key] = samplers.make_schedule(
                options.sampler,
                options.steps,
                self._noise,
                strength=options.strength,
                seg_grid=options.seg_grid,
            )
        return self._schedules[key]

    def placement(self, n: int):
        """``(mesh, batch sharding)`` for a (global) batch of ``n``, or ``(None, None)`` for
        one device (see the class docstring)."""
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

    def _replicated(self, state, mesh):
        """``state`` (on one device) copied to every device of ``mesh``, for a batch split
        over all devices (a compiled program takes its arguments only where it was compiled
        for them); kept for the next call when the weights are fixed."""
        if mesh in self._replicas:
            return self._replicas[mesh]
        replica = jax.device_put(state, parallel.replicated(mesh))
        if self.fixed_weights:
            self._replicas = {mesh: replica}
        return replica

    def context(self, state, prompt: str, n: int, sharding=None) -> jax.Array:
        """The text context ``[n, L, D]`` of ``prompt`` for a batch of ``n``, placed on
        ``sharding`` (None: one device)."""
        key = (prompt, n, sharding)
        if key in self._contexts:
            return self._contexts[key]
        if self.tokenizer is None:
            raise ValueError("this sampling session has no tokenizer: pass contexts")
        ids = np.asarray(self.tokenizer([prompt]))
        if self.mesh is not None:  # weights on the mesh: the ids go there too, and out sharded
            ctx = self._encode(
                state, parallel.global_array(ids, parallel.replicated(self.mesh)), n, sharding
            )
        else:
            ctx = self._encode(state, jnp.asarray(ids), n, None)
            if sharding is not None:
                ctx = jax.device_put(ctx, sharding)
        if self.fixed_weights:
            self._contexts[key] = ctx
        return ctx

    def class_scale(self, options: SampleOptions) -> np.ndarray:
        """The options' per-class scales as a ``[K]`` float32 vector (1 where not named).

        Raises:
          ValueError: a name that is not one of the model's classes (the message lists them).
        """
        names = list(self.config.class_names)
        out = np.ones(self.config.segdm.num_classes, np.float32)
        for name, scale in options.class_scale:
            if name not in names:
                known = ", ".join(names) if names else "none: the model names no classes"
                raise ValueError(f"class scale: no class {name!r} in this model (classes: {known})")
            out[names.index(name)] = scale
        return out

    def tag_prompts(self, state, lq, plan: plans.SamplingPlan, options: SampleOptions, sharding):
        """Every image's seg-tag prompt (:func:`tag_prompt`) from the LQ segmenter's labels on
        ``lq`` (placed as the sampler's batch), the labels the sampler itself starts from."""
        if not self.config.class_names:
            raise ValueError("prompt mode 'tags' needs a model whose config names its classes")
        if plan not in self._lq_label_fns:
            self._lq_label_fns[plan] = sampling.make_lq_labels_fn(self.graphdef, plan)
        labels = self._lq_label_fns[plan](state, lq)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            labels = multihost_utils.process_allgather(labels, tiled=True)
        names = self.config.class_names
        return [tag_prompt(y, names, options.max_tags, options.prompt) for y in np.asarray(labels)]

    def prompt_contexts(self, state, prompts: list[str], sharding=None) -> jax.Array:
        """Contexts ``[n, L, D]``, one prompt per image of the (global) batch."""
        if self.tokenizer is None:
            raise ValueError("this sampling session has no tokenizer: pass contexts")
        ids = np.asarray(self.tokenizer(prompts))
        if self.mesh is not None:
            return self._encode_each(
                state, parallel.global_array(ids, parallel.replicated(self.mesh)), sharding
            )
        ctx = self._encode_each(state, jnp.asarray(ids), None)
        return ctx if sharding is None else jax.device_put(ctx, sharding)

    def call(
        self,
        state,
        lq: np.ndarray | jax.Array,
        options: SampleOptions,
        *,
        record_labels: bool = False,
        contexts: tuple[jax.Array, jax.Array | None] | None = None,
        **vae_tiles,
    ) -> Call:
        """The sampler call for this batch and options (jitted, not compiled).

        Args:
          state: the model's weights (``nnx.State`` matching the graphdef), where they lie.
          lq: this process's rows of the LQ batch, float32 ``[b, H, W, 3]`` in ``[-1, 1]``,
            ``H`` and ``W`` multiples of the latent factor
            (:func:`segsr_jax.diffusion.geometry.model_input`).
          options: how to sample (its ``seed`` seeds the noise).
          record_labels: also return the segmentation's argmax after every step.
          contexts: ``(context, uncond_context)`` ``[B, L, D]`` instead of encoding the
            options' prompts (``uncond_context`` is used only with guidance).
          vae_tiles: VAE tile sizes (:meth:`plan`).
        """
        n = lq.shape[0] * jax.process_count()
        plan = self.plan(tuple(lq.shape[1:3]), options, record_labels, **vae_tiles)
        mesh, sharding = self.placement(n)
        if mesh is not None and self.mesh is None:
            state = self._replicated(state, mesh)
        lq = (
            jnp.asarray(lq) if sharding is None else parallel.global_array(np.asarray(lq), sharding)
        )
        if contexts is not None:
            ctx, uctx = contexts[0], contexts[1] if plan.guidance else None
        else:
            if options.prompt_mode == "tags":
                prompts = self.tag_prompts(state, lq, plan, options, sharding)
                ctx = self.prompt_contexts(state, prompts, sharding)
            else:
                ctx = self.context(state, options.prompt, n, sharding)
            uctx = (
                self.context(state, options.negative_prompt, n, sharding) if plan.guidance else None
            )
        extra = (jnp.asarray(self.class_scale(options)),) if plan.class_scale else ()
        args = (
            state,
            lq,
            ctx,
            uctx,
            jnp.float32(options.guidance),
            self.schedule(options),
            jax.random.key(options.seed),
            *extra,
        )
        # Weights on the session's mesh stay where they are; else they are replicated.
        state_shardings = None if self.mesh is None else sampling.shardings_of(state)
        fn = sampling.make_sample_fn(self.graphdef, plan, mesh, state_shardings, sharding)
        key = (plan, n, options.sampler, options.denoising_steps, sharding)
        return Call(fn=fn, args=args, plan=plan, key=key)

    def prepare(self, state, lq, options: SampleOptions, **kwargs) -> Prepared:
        """The compiled sampler (compiled now, ``lower().compile()``, unless cached) and its
        arguments. Arguments as :meth:`call`."""
        c = self.call(state, lq, options, **kwargs)
        compile_s = 0.0
        if c.key not in self._programs:
            t0 = time.perf_counter()
            self._programs[c.key] = c.fn.lower(*c.args).compile()
            compile_s = time.perf_counter() - t0
        return Prepared(
            program=self._programs[c.key], args=c.args, plan=c.plan, compile_s=compile_s
        )

    def run(
        self, state, lq, options: SampleOptions, **kwargs
    ) -> tuple[sampling.SampleOutput, float]:
        """Sample: ``(output, compile seconds)``; the output's device arrays are not waited
        for. Arguments as :meth:`call`."""
        p = self.prepare(state, lq, options, **kwargs)
        return p.program(*p.args), p.compile_s
