"""The SegSR reverse process as one jitted program: one ``lax.scan`` carrying ``(Z_t, S_t)``.

::

    fn = make_sample_fn(graphdef, plan)            # jit with explicit shardings, compile once
    out = fn(state, lq, context, uncond_context, guidance_scale, schedule, key)
    out = fn(..., key, class_scale)                # plan.class_scale: a [K] scale per class

Inside one call: the LQ conditions (VAE encode of the LQ, SegFormer features; both window by
window on images larger than the VAE encoder tile), the start states (SeeSR's noised LR
latent for ``Z``, Gaussian noise for ``S``; with a strength below 1, the LQ latent and the
LQ segmenter's map noised to the first kept step), the scan over the schedule's per-step
coefficient arrays, the VAE decode and the colour fix. Each step runs
:meth:`SegSR.denoise` over the latent tiles of a static :class:`SamplingPlan` (one tile when
the image fits), blends the tiles' outputs with Gaussian weights, and applies both samplers'
updates to the whole latent — so a tiled run still takes one global step at a time and
``S_t`` is tiled with exactly the same windows as ``Z_t``.

:func:`sample_loop` drives the very same step body from a Python loop, for debugging; a test
checks that both drivers agree.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax import parallel
from segsr_jax.diffusion import samplers, tiling
from segsr_jax.diffusion.color_fix import color_fix
from segsr_jax.diffusion.plans import SamplingPlan
from segsr_jax.diffusion.schedules import NoiseConfig, alphas_cumprod, seg_alpha_sigma, seg_time
from segsr_jax.models import layers, vae_tiling
from segsr_jax.models.segsr import SegSR


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditions:
    """Per-image inputs that stay fixed during the scan (all float32, batch-leading)."""

    z_lq: jax.Array
    f_lq: jax.Array
    context: jax.Array
    uncond_context: jax.Array | None
    guidance_scale: jax.Array
    class_scale: jax.Array | None = None  # [K], with plan.class_scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Carry:
    """The scan carry: the SR sampler state (``Z_t`` and its x0 history), ``S_t``, the key,
    the latest segmentation logits (with ``seg_prior`` fixed or none: the fixed prior and the
    fixed segmenter's logits, carried unchanged) and the sum of SegDM's class probabilities
    over the steps so far (the map a run returns: see :func:`_finish`)."""

    sr: samplers.SamplerState
    s_t: jax.Array
    key: jax.Array
    seg_logits: jax.Array
    seg_probs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """What a sampling run returns (device arrays, batch-leading).

    Attributes:
      image: ``[B, H, W, 3]`` SR image in ``[-1, 1]``.
      labels: ``[B, h, w]`` int32 SegDM segmentation at latent resolution (with
        ``seg_prior`` fixed or none: the fixed segmenter's, i.e. ``lq_labels``).
      lq_labels: ``[B, h, w]`` int32 the fixed segmenter's labels on the LQ input.
      latent: ``[B, h, w, 4]`` the final latent ``Z_0``.
      trajectory: ``[B, steps, h, w]`` uint8, the segmentation's argmax after every step
        (SegDM's x0 prediction), when the plan asks for it; else None.
    """

    image: jax.Array
    labels: jax.Array
    lq_labels: jax.Array
    latent: jax.Array
    trajectory: jax.Array | None = None


def _denoise_tiles(model: SegSR, plan: SamplingPlan, z_t, s_t, t, t_seg, cond: Conditions):
    """:meth:`SegSR.denoise` over the plan's tiles, blended back to the full latent."""
    tp = plan.tiles
    uncond = cond.uncond_context if plan.guidance else None
    ub = plan.seg_prior.use_bridge
    if len(tp) == 1:
        return model.denoise(
            z_t,
            s_t,
            t,
            t_seg,
            cond.z_lq,
            cond.f_lq,
            cond.context,
            uncond,
            cond.guidance_scale,
            use_bridge=ub,
        )
    b = z_t.shape[0]
    k = plan.tiles_per_call
    n = len(tp)
    calls = math.ceil(n / k)

    def chunk(x):  # [B, h, w, C] -> [calls, k*B, th, tw, C] (repeating the last tile as padding)
        tiles = tiling.extract_tiles(x, tp)
        tiles = jnp.concatenate([tiles, jnp.repeat(tiles[-1:], calls * k - n, axis=0)])
        return tiles.reshape(calls, k * b, *tiles.shape[2:])

    def rep(c):  # per-image context repeated for the k tiles of one call
        return None if c is None else jnp.tile(c, (k, 1, 1))

    ctx, uctx = rep(cond.context), rep(uncond)

    def one_call(args):
        zt, st, zl, fl = args
        return model.denoise(
            zt, st, t, t_seg, zl, fl, ctx, uctx, cond.guidance_scale, use_bridge=ub
        )

    out, logits = jax.lax.map(one_call, tuple(chunk(a) for a in (z_t, s_t, cond.z_lq, cond.f_lq)))
    weights = tiling.gaussian_weights(tp.tile)

    def unchunk(y):
        y = y.reshape(calls * k, b, *y.shape[2:])[:n]
        return tiling.blend_tiles(y, tp, weights)

    return unchunk(out), unchunk(logits)


def scale_by_class(
    model_out: jax.Array, x_t: jax.Array, seg_logits: jax.Array, cond: Conditions, c
) -> jax.Array:
    """The model output whose clean-latent estimate is ``z_lq + m (x0_hat - z_lq)``, with
    ``m = softmax(seg_logits) . class_scale`` per latent pixel (``c``: this step's
    :class:`samplers.SRCoeffs`). A soft map, so class borders blend as the segmentation does;
    ``m = 1`` everywhere gives ``model_out`` back (up to rounding)."""
    probs = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)
    m = jnp.einsum("bhwk,k->bhw", probs, cond.class_scale)[..., None]
    x_t = x_t.astype(jnp.float32)
    x0 = c.x0_from_x * x_t + c.x0_from_out * model_out.astype(jnp.float32)
    x0 = cond.z_lq + m * (x0 - cond.z_lq)
    return ((x0 - c.x0_from_x * x_t) / c.x0_from_out).astype(model_out.dtype)


def reverse_step(
    model: SegSR, plan: SamplingPlan, cond: Conditions, carry: Carry, s: samplers.Schedule
) -> Carry:
    """One reverse step ``t -> t-1`` of both diffusions (the scan body; ``s`` holds this step's
    scalar coefficients)."""
    model_out, seg_logits = _denoise_tiles(
        model, plan, carry.sr.x, carry.s_t, s.timestep, s.seg.time, cond
    )
    if plan.class_scale:  # by the segmentation the step started from (SegDM's latest map)
        model_out = scale_by_class(model_out, carry.sr.x, carry.seg_logits, cond, s.sr)
    key, k_noise = jax.random.split(carry.key)
    noise = jax.random.normal(k_noise, carry.sr.x.shape, carry.sr.x.dtype)
    sr = samplers.sr_step(s.sr, carry.sr, model_out, noise)
    if not plan.seg_prior.refined:  # S_t stays the fixed prior; SegDM's output is unused
        return dataclasses.replace(carry, sr=sr, key=key)
    probs = jax.nn.softmax(seg_logits.astype(jnp.float32), axis=-1)
    if plan.seg_reembed == "hard":  # the one-hot maps SegDM was trained on
        s0_hat = model.segdm.embed_labels(jnp.argmax(seg_logits, axis=-1))
    else:
        s0_hat = model.segdm.embed_probs(probs)
    s_next = samplers.seg_step(s.seg, carry.s_t, s0_hat)
    return Carry(
        sr=sr, s_t=s_next, key=key, seg_logits=seg_logits, seg_probs=carry.seg_probs + probs
    )


def lq_conditions(model: SegSR, plan: SamplingPlan, lq) -> tuple[jax.Array, ...]:
    """``(z_lq, f_lq, lq_logits)``: the LQ latent, the segmentation encoder's features and the
    LQ segmenter's logits at latent resolution (window by window on a tiled plan)."""
    if tuple(lq.shape[1:3]) != plan.image_shape:
        raise ValueError(f"LQ batch {lq.shape} does not match the plan's {plan.image_shape}")
    if plan.vae_tile is None:
        z_lq = model.vae.encode_latent(lq)
        f_lq, lq_logits = model.lq_features(lq, z_lq.shape[1:3])
    else:
        mean, _ = vae_tiling.tiled_encode(model.vae, lq, plan.vae_tile[0], plan.vae_overlap[0])
        z_lq = model.vae.scale_latent(mean)
        f_lq, lq_logits = _tiled_lq_features(model, plan, lq)
    return z_lq, f_lq, lq_logits


def make_lq_labels_fn(graphdef: nnx.GraphDef, plan: SamplingPlan):
    """``fn(state, lq) -> [B, h, w]`` int32, the LQ segmenter's labels the sampler would see
    (jitted; the seg-tag prompts are made from them before sampling)."""

    def fn(state, lq):
        _, _, logits = lq_conditions(nnx.merge(graphdef, state), plan, lq)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.jit(fn)


def _prepare(
    model: SegSR,
    plan: SamplingPlan,
    lq,
    context,
    uncond_context,
    guidance_scale,
    key,
    class_scale=None,
    lq_conds=None,
) -> tuple[Conditions, Carry, jax.Array]:
    """LQ conditions (``lq_conds``: :func:`lq_conditions`' result when the caller has it) and
    the start carry."""
    z_lq, f_lq, lq_logits = lq_conds if lq_conds is not None else lq_conditions(model, plan, lq)
    if plan.class_scale != (class_scale is not None):
        raise ValueError("a plan with class_scale takes a class_scale array, and only it")
    cond = Conditions(
        z_lq=z_lq,
        f_lq=f_lq,
        context=context,
        uncond_context=uncond_context if plan.guidance else None,
        guidance_scale=jnp.asarray(guidance_scale, jnp.float32),
        class_scale=None if class_scale is None else jnp.asarray(class_scale, jnp.float32),
    )
    k_z, k_s, k_loop = jax.random.split(key, 3)
    noise = NoiseConfig(prediction_type=model.config.prediction_type)
    ac = alphas_cumprod(noise)
    z_start = samplers.initial_latent(z_lq, jax.random.normal(k_z, z_lq.shape), ac, plan.t_start)
    b, h, w, _ = z_lq.shape
    lq_labels = jnp.argmax(lq_logits, axis=-1).astype(jnp.int32)
    if plan.seg_prior.refined:
        s_start = jax.random.normal(k_s, (b, h, w, model.config.segdm.embed_dim))
        if plan.t_start < noise.num_train_timesteps - 1:  # strength < 1: from the LQ's map too
            alpha, sigma = seg_alpha_sigma(seg_time(plan.t_start, noise.num_train_timesteps))
            s_start = float(alpha) * model.segdm.embed_labels(lq_labels) + float(sigma) * s_start
        # The map before SegDM's first step (what a per-class scale reads at that step).
        logits0 = lq_logits.astype(jnp.float32)
    else:  # the fixed segmenter's map, embedded like a clean SegDM map, for every step
        s_start = model.segdm.embed_labels(lq_labels)
        logits0 = lq_logits
    carry = Carry(
        sr=samplers.init_state(z_start),
        s_t=s_start,
        key=k_loop,
        seg_logits=logits0,
        seg_probs=jnp.zeros(logits0.shape, jnp.float32),
    )
    return cond, carry, lq_labels


def _tiled_lq_features(model: SegSR, plan: SamplingPlan, lq) -> tuple[jax.Array, jax.Array]:
    """:meth:`SegSR.lq_features` window by window over the VAE encoder's tiles, blended.

    SegFormer's attention spans its whole input, so on a large image its time grows with the
    square of the area and its activations with the area; windows the size of the encoder
    tile bound both (the sliding-window inference SegFormer is evaluated with), and logits
    and features of overlapping windows are averaged with the same ramps as the VAE tiles.
    """
    f = model.config.latent_factor
    width = model.config.segdm.feat_channels

    def window(x):  # [B, th, tw, 3] -> [B, th/f, tw/f, F + K] at the window's latent size
        return jnp.concatenate(model.lq_features(x, (x.shape[1] // f, x.shape[2] // f)), -1)

    both = vae_tiling.tiled_apply(
        window, lq, plan.vae_tile[0], plan.vae_overlap[0], num=1, den=f, align=f
    )
    return both[..., :width], both[..., width:]


def _finish(
    model: SegSR, plan: SamplingPlan, lq, carry: Carry, lq_labels, trajectory=None
) -> SampleOutput:
    """Decode ``Z_0``, colour-fix against the LQ, and take the segmentation's argmax: with
    SegDM refining and ``plan.seg_map`` ``mean``, of its class probabilities averaged over
    every step; with ``last``, of its last step's. For a SegDM trained on the HR forward
    process the last step alone is worse: at low noise it reads the class from ``Z_t``
    through the bridge, learnt on noised HR latents, and SRDM's own latent misleads it where
    it drew the wrong texture (the tiny model: 0.670 mIoU at its best step, 0.640 at the
    last, 0.669 for the mean; ``docs/experiment/segdm_trajectory.json``). Trained on the
    sampler's state (``LossConfig.seg_rollout_steps``) the decline is gone, and on DDP's seg
    grid (``SampleOptions.seg_grid``, the default) the last step is level with the best; the
    mean is within 0.002 of the best step either way."""
    z0 = carry.sr.x
    if plan.vae_tile is None:
        image = model.vae.decode_latent(z0)
    else:
        image = vae_tiling.tiled_decode(
            model.vae, model.vae.unscale_latent(z0), plan.vae_tile[1], plan.vae_overlap[1]
        )
    image = jnp.clip(color_fix(plan.color_fix, image, lq), -1.0, 1.0)
    mean = plan.seg_prior.refined and plan.seg_map == "mean"
    final = carry.seg_probs if mean else carry.seg_logits
    labels = jnp.argmax(final, axis=-1).astype(jnp.int32)
    return SampleOutput(
        image=image, labels=labels, lq_labels=lq_labels, latent=z0, trajectory=trajectory
    )


def _step_labels(carry: Carry) -> jax.Array:
    """The segmentation's argmax ``[B, h, w]`` uint8 (a trajectory entry)."""
    return jnp.argmax(carry.seg_logits, axis=-1).astype(jnp.uint8)


def sample(
    model: SegSR,
    plan: SamplingPlan,
    lq: jax.Array,
    context: jax.Array,
    uncond_context: jax.Array | None,
    guidance_scale,
    schedule: samplers.Schedule,
    key: jax.Array,
    class_scale: jax.Array | None = None,
) -> SampleOutput:
    """The whole reverse process for a batch (traceable; :func:`make_sample_fn` jits it).

    Args:
      model: the SegSR model.
      plan: static shapes (:func:`segsr_jax.diffusion.plans.make_plan`).
      lq: ``[B, H, W, 3]`` LQ images already upscaled to the output size, in ``[-1, 1]``.
      context, uncond_context: ``[B, L, D]`` prompt and negative-prompt contexts.
      guidance_scale: text CFG scale (scalar).
      schedule: per-step coefficients from :func:`samplers.make_schedule`; its length is the
        number of steps.
      key: PRNG key for the start noise and stochastic samplers.
      class_scale: ``[K]`` float32 per-class scale of the generated offset (only with
        ``plan.class_scale``; :func:`scale_by_class`).
    """
    # Weights in each layer's compute dtype once, so the scan carries bf16 weights and the
    # casts are not repeated at every step (XLA does not hoist them out of the loop).
    model = layers.with_compute_dtype_weights(model)
    carry, lq_labels, traj = reverse_process(
        model, plan, lq, context, uncond_context, guidance_scale, schedule, key, class_scale
    )
    return _finish(model, plan, lq, carry, lq_labels, traj)


def reverse_process(
    model: SegSR,
    plan: SamplingPlan,
    lq: jax.Array,
    context: jax.Array,
    uncond_context: jax.Array | None,
    guidance_scale,
    schedule: samplers.Schedule,
    key: jax.Array,
    class_scale: jax.Array | None = None,
    lq_conds: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[Carry, jax.Array, jax.Array | None]:
    """The scan of :func:`sample` without the VAE decode: ``(carry after the last step, the
    LQ segmenter's labels, the trajectory or None)``; ``carry.sr.x`` is the final latent.
    Training reuses it to show SegDM what the sampler hands it
    (:attr:`segsr_jax.training.losses.LossConfig.seg_rollout_steps`), passing the
    ``(z_lq, f_lq, lq_logits)`` it computed already as ``lq_conds``."""
    cond, carry, lq_labels = _prepare(
        model, plan, lq, context, uncond_context, guidance_scale, key, class_scale, lq_conds
    )

    def body(c, s):
        c = reverse_step(model, plan, cond, c, s)
        return c, (_step_labels(c) if plan.record_labels else None)

    carry, traj = jax.lax.scan(body, carry, schedule)
    if traj is not None:
        traj = jnp.swapaxes(traj, 0, 1)  # [steps, B, ...] -> [B, steps, ...]
    return carry, lq_labels, traj


def make_sample_fn(
    graphdef: nnx.GraphDef,
    plan: SamplingPlan,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings=None,
    batch_sharding=None,
):
    """``fn(state, lq, context, uncond_context, guidance_scale, schedule, key)`` jitted
    (``plan.class_scale``: and a last argument, the ``[K]`` class scale, replicated).

    With a mesh, the batch axis of the images, contexts and outputs is split by
    ``batch_sharding`` (default: over ``'data'``; the batch must then be a multiple of the
    mesh's ``data`` size), and the parameters keep ``state_shardings``: a pytree of shardings
    matching ``state`` (e.g. the FSDP layout a training run holds them in, from
    :func:`shardings_of`, or ``parallel.tree_shardings`` of a sharding-rule table), so a
    model too big for one device samples where it lies. Without ``state_shardings`` the
    parameters are replicated. The schedule and key are replicated. Compiles once per
    (plan, batch, step count, shardings).
    """

    def fn(state, lq, context, uncond_context, guidance_scale, schedule, key, class_scale=None):
        model = nnx.merge(graphdef, state)
        return sample(
            model, plan, lq, context, uncond_context, guidance_scale, schedule, key, class_scale
        )

    if mesh is None:
        return jax.jit(fn)
    rep = parallel.replicated(mesh)
    batch = batch_sharding or parallel.batch_sharding(mesh)
    params = rep if state_shardings is None else state_shardings
    out = SampleOutput(
        image=batch,
        labels=batch,
        lq_labels=batch,
        latent=batch,
        trajectory=batch if plan.record_labels else None,
    )
    extra = (rep,) if plan.class_scale else ()
    return jax.jit(
        fn, in_shardings=(params, batch, batch, batch, rep, rep, rep, *extra), out_shardings=out
    )


def shardings_of(tree):
    """The sharding of every array in ``tree`` (for :func:`make_sample_fn`'s
    ``state_shardings``: parameters stay where they are)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def sample_loop(
    model: SegSR,
    plan: SamplingPlan,
    lq,
    context,
    uncond_context,
    guidance_scale,
    schedule: samplers.Schedule,
    key,
    class_scale=None,
) -> SampleOutput:
    """Debug driver: the same step body as :func:`sample`, one jitted step per Python
    iteration (inspect or print the carry between steps)."""
    graphdef, state = nnx.split(layers.with_compute_dtype_weights(model))

    @partial(jax.jit, static_argnums=0)
    def prepare(plan, state, lq, context, uncond_context, guidance_scale, key, class_scale):
        model = nnx.merge(graphdef, state)
        return _prepare(model, plan, lq, context, uncond_context, guidance_scale, key, class_scale)

    @partial(jax.jit, static_argnums=0)
    def step(plan, state, cond, carry, s):
        return reverse_step(nnx.merge(graphdef, state), plan, cond, carry, s)

    @partial(jax.jit, static_argnums=0)
    def finish(plan, state, lq, carry, lq_labels, traj):
        return _finish(nnx.merge(graphdef, state), plan, lq, carry, lq_labels, traj)

    cond, carry, lq_labels = prepare(
        plan, state, lq, context, uncond_context, guidance_scale, key, class_scale
    )
    traj = []
    for i in range(len(schedule)):
        carry = step(plan, state, cond, carry, jax.tree.map(lambda a, i=i: a[i], schedule))
        if plan.record_labels:
            traj.append(_step_labels(carry))
    return finish(plan, state, lq, carry, lq_labels, jnp.stack(traj, 1) if traj else None)
