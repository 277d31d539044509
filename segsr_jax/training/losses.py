"""Training losses of every stage, as pure functions of a merged model and a batch.

A batch (host-local numpy, made global by :func:`segsr_jax.data.pipeline.to_global_arrays`)::

    hr         uint8 [B, S, S, 3]      HR crop
    lq         uint8 [B, S/s, S/s, 3]  its degraded LQ (not needed by stage ``vae``)
    label      uint8 [B, S, S]         class ids, 255 = ignore (not needed by stage ``vae``)
    input_ids  int32 [B, L]            prompt tokens, text dropout already applied

Pixels travel as uint8 (a quarter of the float32 bytes) and become ``[-1, 1]`` here.

Stage ``vae`` trains the autoencoder from scratch: L1 reconstruction + ``kl_weight`` x KL.
Stage ``decoder`` fine-tunes only the VAE's decoder (the encoder, hence the latent space every
diffusion stage learned, stays as it is): L1 + ``perceptual_weight`` x LPIPS(VGG16) of the
reconstruction of a posterior sample, as SD's autoencoder adds a perceptual term to L1 (an
L1-only decoder is blurry). LPIPS's weights enter the step as ``loss_params``.
The diffusion stages draw one SR step ``t`` per example, noise ``Z_0 = VAE.enc(hr)`` with the SD
schedule and ``S_0 = embed(y)`` with the seg schedule at ``t / T``, run
:meth:`SegSR.denoise` once and score::

    sr:    ||target - model_out||^2                       (C_t = 0; SegDM not run)
    seg:   lambda_seg * CE(seg_logits, y)                 (I_t = 0; SRDM not run)
    joint: ||target - model_out||^2 + lambda_seg * CE(seg_logits, y)
    prior: ||target - model_out||^2 with S_t = embed(argmax SegFormer(LQ)) at every t: the
           "fixed segmentation prior" ablation (bridge + ControlNet learn to use a fixed
           segmenter's map; SegDM's output unused; sample with ``seg_prior="fixed"``)

With ``seg_rollout_steps = k > 0`` (stage ``joint``), SegDM's CE is scored on the inputs the
sampler hands it rather than on the forward process of the HR scene: the model's own sampler
(:func:`segsr_jax.diffusion.sampling.reverse_process`, DDIM, k steps, no guidance, no
gradient) restores the batch's LQ, and SegDM sees ``I_t`` from that restoration's latent and
``S_t`` from its own segmentation of it, each noised to the drawn time with the same noise as
the HR path. SRDM's loss is unchanged. Why: trained on the HR path, SegDM learns that at low
noise ``I_t`` shows the true scene and follows it; at sampling ``I_t`` shows SRDM's own
texture, wrong wherever SRDM guessed, and SegDM's map fell over the last steps (README,
"SegDM's trajectory").

Stage ``segmenter`` trains the SegFormer alone as a segmenter of clean HR images (CE of its
logits, bilinearly upsampled to the label size): the evaluation segmenter of the semantic
fidelity metric (``segsr_jax.evaluate --segmenter``), not a part of SegSR's sampling.

Only the terms a stage scores are computed, so XLA drops the model a stage does not use (the
UNet and ControlNet in stage ``seg``) instead of running it for nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from segsr_jax.diffusion import plans, samplers, sampling
from segsr_jax.diffusion.options import SegPrior
from segsr_jax.diffusion.schedules import SEG_T_MAX, NoiseConfig, alphas_cumprod, seg_alpha_sigma
from segsr_jax.images import to_unit_range
from segsr_jax.models.seg_encoder import normalize_images
from segsr_jax.models.segdm import IGNORE_INDEX
from segsr_jax.models.segsr import SegSR

STAGES = ("vae", "decoder", "sr", "seg", "joint", "prior", "segmenter")
# Stages that see only HR crops (no LQ, labels or prompts).
AUTOENCODER_STAGES = ("vae", "decoder")
# (score the SR loss, score the seg loss) per diffusion stage.
_TERMS = {"sr": (True, False), "seg": (False, True), "joint": (True, True), "prior": (True, False)}
# How each stage couples SRDM and SegDM, as the sampler's SegPrior does: sr and seg train one
# model with the other's condition zeroed (C_t = 0, I_t = 0); only joint training couples them
# through the bridge; prior feeds the bridge the fixed segmenter's map instead of S_t.
_PRIORS = {"sr": "none", "seg": "none", "joint": "diffusion", "prior": "fixed"}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What a training step optimises.

    Attributes:
      stage: ``vae`` | ``decoder`` | ``sr`` | ``seg`` | ``joint`` | ``prior`` | ``segmenter``.
      lambda_seg: weight of SegDM's cross-entropy.
      lambda_lq_seg: weight of a cross-entropy on SegFormer's own logits (the fixed-segmenter
        baseline); only useful when the segmentation encoder is trained (from scratch).
      kl_weight: KL weight of stage ``vae``.
      perceptual_weight: LPIPS weight of stage ``decoder`` (its L1 weight is 1).
      seg_rollout_steps: stage ``joint``: 0 = SegDM's inputs from the HR forward process (as
        designed); k > 0 = from a k-step run of the model's own sampler on the LQ (see the
        module docstring). Costs k forward passes of the whole model per training step.
      num_train_timesteps, beta_*: the SR forward process (SD's by default).
    """

    stage: str = "joint"
    lambda_seg: float = 1.0
    lambda_lq_seg: float = 0.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    seg_rollout_steps: int = 0
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")
        if self.seg_rollout_steps < 0:
            raise ValueError(f"seg_rollout_steps must be >= 0, got {self.seg_rollout_steps}")
        if self.seg_rollout_steps and self.stage != "joint":
            raise ValueError(
                "seg_rollout_steps needs stage 'joint' (SegDM's inputs from the coupled "
                f"sampler), not {self.stage!r}"
            )

    def noise_config(self, prediction_type: str) -> NoiseConfig:
        """The SR forward process for a model with ``prediction_type``."""
        return NoiseConfig(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=prediction_type,
        )


def upsample_lq(lq: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """LQ in ``[-1, 1]`` ``[B, h, w, 3]`` -> bicubic ``[B, H, W, 3]`` (SeeSR feeds the upscaled
    LQ to the VAE encoder and the segmenter)."""
    b, _, _, c = lq.shape
    return jax.image.resize(lq, (b, *hw, c), "cubic")


def labels_at(labels: jax.Array, factor: int) -> jax.Array:
    """``[B, H, W]`` class ids -> ``[B, H/f, W/f]`` int32: the centre pixel of every f x f block
    (a class id, never a blend; 255 stays 255)."""
    return labels[:, factor // 2 :: factor, factor // 2 :: factor].astype(jnp.int32)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits [..., K]`` over pixels whose label is not 255."""
    valid = labels != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(valid, labels, 0)
    )
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def vae_loss(model: SegSR, batch: dict, key: jax.Array, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """Stage ``vae``: L1 reconstruction of a posterior sample + ``kl_weight`` x KL(q || N(0, I))
    (summed over latent elements, averaged over the batch, as SD's autoencoder trains)."""
    x = to_unit_range(batch["hr"])
    mean, logvar = model.vae.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    recon = jnp.mean(jnp.abs(model.vae.decode(z) - x))
    kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar) / x.shape[0]
    loss = recon + cfg.kl_weight * kl
    return loss, {"loss": loss, "loss_recon": recon, "kl": kl}


def decoder_loss(
    model: SegSR, batch: dict, key: jax.Array, cfg: LossConfig, lpips_params: dict
) -> tuple[jax.Array, dict]:
    """Stage ``decoder``: L1 + ``perceptual_weight`` x LPIPS of the decoded posterior sample of
    the (frozen) encoder; ``lpips_params`` are :class:`segsr_jax.lpips.LPIPS`'s weights."""
    from segsr_jax.lpips import lpips_from_params

    x = to_unit_range(batch["hr"])
    recon = model.vae.decode_latent(jax.lax.stop_gradient(model.vae.encode_latent(x, key)))
    l1 = jnp.mean(jnp.abs(recon - x))
    perceptual = jnp.mean(lpips_from_params(lpips_params)(recon, x))
    loss = l1 + cfg.perceptual_weight * perceptual
    return loss, {"loss": loss, "loss_recon": l1, "lpips": perceptual}


def diffusion_loss(
    model: SegSR, batch: dict, key: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, dict]:
    """Stages ``sr``, ``seg``, ``joint`` and ``prior`` (see the module docstring)."""
    score_sr, score_seg = _TERMS[cfg.stage]
    hr = to_unit_range(batch["hr"])
    lq = upsample_lq(to_unit_range(batch["lq"]), hr.shape[1:3])
    k_post, k_t, k_z, k_s = jax.random.split(key, 4)
    b = hr.shape[0]

    z0 = model.vae.encode_latent(hr, k_post)  # SD trains on posterior samples
    z_lq = model.vae.encode_latent(lq)  # the sampler uses the mean: so here
    f_lq, lq_logits = model.lq_features(lq, z0.shape[1:3])
    y = labels_at(batch["label"], model.config.latent_factor)
    s0 = model.segdm.embed_labels(y)
    context = model.encode_prompts(batch["input_ids"])

    noise_cfg = cfg.noise_config(model.config.prediction_type)
    t = jax.random.randint(k_t, (b,), 0, cfg.num_train_timesteps)
    ac = jnp.asarray(alphas_cumprod(noise_cfg), jnp.float32)[t][:, None, None, None]
    eps = jax.random.normal(k_z, z0.shape)
    z_t = jnp.sqrt(ac) * z0 + jnp.sqrt(1.0 - ac) * eps
    t_seg = jnp.minimum(t.astype(jnp.float32) / cfg.num_train_timesteps, SEG_T_MAX)
    alpha, sigma = seg_alpha_sigma(t_seg)
    s_t = alpha[:, None, None, None] * s0 + sigma[:, None, None, None] * jax.random.normal(
        k_s, s0.shape
    )

    prior = SegPrior(_PRIORS[cfg.stage])
    if prior.name == "fixed":
        fixed = jnp.argmax(jax.lax.stop_gradient(lq_logits), axis=-1)
        s_t = model.segdm.embed_labels(fixed)
    model_out, seg_logits = model.denoise(
        z_t, s_t, t, t_seg, z_lq, f_lq, context, use_bridge=prior.use_bridge
    )
    metrics = {}
    loss = jnp.zeros((), jnp.float32)
    if score_sr:
        target = (
            eps
            if noise_cfg.prediction_type == "epsilon"
            else (jnp.sqrt(ac) * eps - jnp.sqrt(1.0 - ac) * z0)
        )
        metrics["loss_sr"] = jnp.mean((model_out - target) ** 2)
        loss += metrics["loss_sr"]
    if score_seg and cfg.seg_rollout_steps:
        # SegDM on the sampler's own state at t (module docstring); the bridge's I_t path is
        # trained on it too. z_t and s_t's noises are reused.
        z_hat, p_hat = sampled_state(
            model,
            lq,
            context,
            cfg.seg_rollout_steps,
            noise_cfg,
            jax.random.fold_in(key, 1),
            (z_lq, f_lq, lq_logits),
        )
        a = alpha[:, None, None, None]
        z_t_seg = jnp.sqrt(ac) * z_hat + jnp.sqrt(1.0 - ac) * eps
        s_t_seg = a * model.segdm.embed_probs(p_hat) + (s_t - a * s0)
        i_t, _, _ = model.bridge.encode(z_t_seg, s_t_seg, t)
        seg_logits = model.segdm(s_t_seg, t_seg, f_lq, i_t)
    if score_seg:
        metrics["loss_seg"] = masked_cross_entropy(seg_logits, y)
        loss += cfg.lambda_seg * metrics["loss_seg"]
    if cfg.lambda_lq_seg:
        metrics["loss_lq_seg"] = masked_cross_entropy(lq_logits, y)
        loss += cfg.lambda_lq_seg * metrics["loss_lq_seg"]
    metrics["loss"] = loss
    return loss, metrics


def sampled_state(
    model: SegSR,
    lq: jax.Array,
    context: jax.Array,
    steps: int,
    noise_cfg: NoiseConfig,
    key: jax.Array,
    lq_conds: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SegSR's own coupled sampler on a batch (DDIM ``steps``, no guidance, the default seg
    grid, as sampling runs), without gradient.

    Args:
      lq: ``[B, H, W, 3]`` the upsampled LQ in ``[-1, 1]``; context: ``[B, L, D]`` prompts.
      lq_conds: ``(z_lq, f_lq, lq_logits)`` of ``lq`` when the caller has them (the loss
        does: not encoded twice); None: computed here.

    Returns:
      ``(latent [B, h, w, 4], probs [B, h, w, K])``: the restoration's final latent and
      SegDM's class probabilities at its last step.
    """
    # Nothing enters the scan with a tangent: under jax.grad a scan whose inputs carry
    # tangents is differentiated as a whole after it is traced, so a custom-gradient kernel
    # inside it (cuDNN's fused attention on a GPU, whose backward rejects the 77-token
    # cross-attention) fails outside the trace-time fallback in ``attention``; and its
    # residuals would be computed for nothing. The outputs are stop-gradient anyway.
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, _no_tangent(state))
    lq, context, lq_conds = _no_tangent((lq, context, lq_conds))
    plan = plans.make_plan(
        tuple(lq.shape[1:3]),
        model.config.latent_factor,
        tile=max(lq.shape[1:3]) // model.config.latent_factor,  # one window
        overlap=0,
        guidance=False,
        color_fix="none",
    )
    schedule = samplers.make_schedule("ddim", steps, noise_cfg)
    carry, _, _ = sampling.reverse_process(
        model, plan, lq, context, None, 1.0, schedule, key, lq_conds=lq_conds
    )
    probs = jax.nn.softmax(carry.seg_logits.astype(jnp.float32), axis=-1)
    return jax.lax.stop_gradient(carry.sr.x), jax.lax.stop_gradient(probs)


def _no_tangent(tree):
    """``stop_gradient`` on every floating-point leaf of ``tree`` (keys, integers: as they are)."""
    return jax.tree.map(
        lambda x: (
            jax.lax.stop_gradient(x)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
            else x
        ),
        tree,
    )


def segmenter_loss(
    model: SegSR, batch: dict, key: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, dict]:
    """Stage ``segmenter``: SegFormer on the clean HR crop, CE at full label resolution."""
    del key, cfg
    hr = to_unit_range(batch["hr"])
    logits, _ = model.segformer(normalize_images(hr))
    b, h, w, _ = hr.shape
    logits = jax.image.resize(logits.astype(jnp.float32), (b, h, w, logits.shape[-1]), "linear")
    labels = batch["label"].astype(jnp.int32)
    ce = masked_cross_entropy(logits, labels)
    valid = labels != IGNORE_INDEX
    acc = jnp.sum((jnp.argmax(logits, -1) == labels) * valid) / jnp.maximum(jnp.sum(valid), 1)
    return ce, {"loss": ce, "pixel_accuracy": acc}


def compute_loss(
    model: SegSR, batch: dict, key: jax.Array, cfg: LossConfig, loss_params: dict | None = None
) -> tuple[jax.Array, dict]:
    """The stage's scalar loss and its named terms (float32 scalars). ``loss_params``: the
    weights of a loss network (stage ``decoder``: LPIPS's), not part of the model."""
    if cfg.stage == "decoder":
        if not loss_params:
            raise ValueError("stage 'decoder' needs LPIPS's weights as loss_params")
        return decoder_loss(model, batch, key, cfg, loss_params)
    if cfg.stage == "vae":
        return vae_loss(model, batch, key, cfg)
    if cfg.stage == "segmenter":
        return segmenter_loss(model, batch, key, cfg)
    return diffusion_loss(model, batch, key, cfg)
