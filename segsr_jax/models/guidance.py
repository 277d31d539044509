"""Classifier-free guidance on the text condition, batch-doubled inside the step.

With guidance scale ``w`` the UNet runs once on a doubled batch ``[uncond; cond]`` (the
negative-prompt half first, as diffusers orders it) and the two halves are mixed::

    eps = eps_uncond + w * (eps_cond - eps_uncond)

Only the text embeddings differ between the halves: the latent, the timestep and the ControlNet
condition are the same arrays repeated (:func:`double_batch`); the caller concatenates the text
embeddings itself as ``concatenate([negative, positive])``.

``w = 1`` gives ``eps_cond`` exactly, so no doubling is needed: a sampler built with
``uses_guidance(w) == False`` runs the conditional half only, at half the cost. The decision is
made in Python at trace time, so ``w`` must be a Python float there; inside the doubled path,
:func:`cfg_combine` also accepts a traced scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def uses_guidance(scale: float) -> bool:
    """Whether guidance scale ``scale`` needs the doubled batch (any scale except 1.0)."""
    return float(scale) != 1.0


def double_batch(tree):
    """Every leaf ``[B, ...]`` -> ``[2B, ...]`` (the batch repeated: uncond half, cond half)."""
    return jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), tree)


def split_batch(tree):
    """Every leaf ``[2B, ...]`` -> ``(uncond [B, ...], cond [B, ...])`` trees (first half,
    second half)."""

    def half(a, which):
        if a.shape[0] % 2:
            raise ValueError(f"split_batch needs an even leading axis, got shape {a.shape}")
        b = a.shape[0] // 2
        return a[:b] if which == 0 else a[b:]

    return jax.tree.map(lambda a: half(a, 0), tree), jax.tree.map(lambda a: half(a, 1), tree)


def cfg_combine(eps_uncond: jax.Array, eps_cond: jax.Array, scale) -> jax.Array:
    """``eps_uncond + scale * (eps_cond - eps_uncond)``, ``[B, ...]``, in ``eps_cond``'s dtype
    (any prediction type: epsilon or v combine the same way)."""
    out = eps_uncond + scale * (eps_cond - eps_uncond)
    return out.astype(eps_cond.dtype)
