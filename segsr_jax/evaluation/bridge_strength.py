"""How loud the bridge's message to SRDM is: the RMS of ``C_t`` against the LQ latent's.

``C_t`` enters SRDM as extra channels of the ControlNet's condition, beside the LQ latent
``Z_lq``. The bridge's output heads start at zero, so a checkpoint whose ``C_t`` stays far below
``Z_lq``'s scale hands SRDM little of the segmentation, whatever SegDM knows. Measured as
training sees the pair: ``Z_t`` is the HR latent noised at SR step ``t``, ``S_t`` the true
labels' embedding noised with the seg schedule at ``t / T`` (or, for a checkpoint trained with
the fixed prior, the embedding of the LQ segmenter's map at every ``t``); a checkpoint whose
bridge reads SegDM's estimate (``BridgeConfig.seg_source``) gets ``C_t`` from that estimate,
as SRDM does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from segsr_jax.diffusion.schedules import SEG_T_MAX, alphas_cumprod, seg_alpha_sigma
from segsr_jax.images import to_unit_range
from segsr_jax.models.segsr import SegSR
from segsr_jax.training.losses import LossConfig, labels_at, upsample_lq

PRIORS = ("diffusion", "fixed")


def bridge_strength(
    model: SegSR,
    hr: np.ndarray,
    lq: np.ndarray,
    labels: np.ndarray,
    timesteps: tuple[int, ...] = (900, 500, 100),
    prior: str = "diffusion",
    seed: int = 0,
) -> dict:
    """RMS of ``C_t`` at each of ``timesteps`` and of ``Z_lq``, over a batch.

    Args:
      model: a SegSR (e.g. ``nnx.merge(restorer.graphdef, restorer.state)``).
      hr: uint8 ``[B, H, W, 3]``; lq: uint8 ``[B, H/s, W/s, 3]``; labels: ``[B, H, W]`` ids.
      prior: ``diffusion`` (S_t from the labels) or ``fixed`` (the LQ segmenter's map).

    Returns:
      ``{"lq_latent_rms": float, "c_t_rms": {t: float}}``.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior {prior!r}: choose one of {PRIORS}")
    loss_cfg = LossConfig()
    hr_f = to_unit_range(jnp.asarray(hr))
    lq_f = upsample_lq(to_unit_range(jnp.asarray(lq)), hr_f.shape[1:3])
    z0 = model.vae.encode_latent(hr_f)
    z_lq = model.vae.encode_latent(lq_f)
    f_lq, lq_logits = model.lq_features(lq_f, z0.shape[1:3])
    s0 = model.segdm.embed_labels(labels_at(jnp.asarray(labels), model.config.latent_factor))
    fixed = model.segdm.embed_labels(jnp.argmax(lq_logits, axis=-1))
    ac = jnp.asarray(alphas_cumprod(loss_cfg.noise_config(model.config.prediction_type)))
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))  # noqa: E731
    out = {"lq_latent_rms": rms(z_lq), "c_t_rms": {}}
    key = jax.random.key(seed)
    for t in timesteps:
        key, k_z, k_s = jax.random.split(key, 3)
        z_t = jnp.sqrt(ac[t]) * z0 + jnp.sqrt(1.0 - ac[t]) * jax.random.normal(k_z, z0.shape)
        t_seg = jnp.minimum(t / loss_cfg.num_train_timesteps, SEG_T_MAX)
        alpha, sigma = seg_alpha_sigma(t_seg)
        s_t = (
            alpha * s0 + sigma * jax.random.normal(k_s, s0.shape) if prior == "diffusion" else fixed
        )
        use = (True, prior == "diffusion")
        t_b = jnp.full((z0.shape[0],), t)
        _, c_t, _, _ = model.bridge_messages(z_t, s_t, t_b, t_seg, f_lq, use_bridge=use)
        out["c_t_rms"][int(t)] = rms(c_t)
    return out
