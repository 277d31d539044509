"""Load a diffusers ``AutoencoderKL`` checkpoint folder into :class:`AutoencoderKL`.

Accepted: a ``vae/`` component folder or a whole pipeline folder; weights in
``diffusion_pytorch_model.safetensors`` or ``.bin``; the current attention names
(``to_q/to_k/to_v/to_out.0``) and the pre-0.14 ones (``query/key/value/proj_attn``), the latter
also stored as 1x1 conv kernels ``[C, C, 1, 1]`` as some converted checkpoints do.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.vae import AutoencoderKL, VAEConfig
from segsr_jax.weights.checkpoint_files import (
    CheckpointError,
    read_config,
    read_tensors,
    resolve_component,
)
from segsr_jax.weights.torch_mapping import config_from_dict, load_state_dict

# Every key of diffusers 0.42 ``AutoencoderKL.__init__`` that is not a VAEConfig field:
# ``force_upcast`` only tells diffusers pipelines to run the VAE in float32 when the pipeline
# is fp16; our compute dtype is chosen by the caller, so it has no effect here.
_IGNORED = ("force_upcast",)
# Per-channel latent statistics (SDXL-style pipelines normalise with them). Our scaling uses
# scaling_factor / shift_factor only, so a checkpoint that sets them is refused rather than
# silently mis-scaled.
_UNSUPPORTED = {"latents_mean": None, "latents_std": None}

# Pre-0.14 diffusers names of the mid-block attention tensors.
_OLD_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_config_from_diffusers(raw: dict, source: str = "config") -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Every diffusers key is either a VAEConfig field (used), ``force_upcast`` (ignored),
    ``latents_mean``/``latents_std`` (accepted only as ``None``), or ``_``-prefixed metadata;
    anything else raises :class:`CheckpointError` naming the key.
    """
    cls_name = raw.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise CheckpointError(f"{source}: _class_name is {cls_name!r}, expected 'AutoencoderKL'")
    return config_from_dict(
        VAEConfig, raw, ignored=_IGNORED, unsupported=_UNSUPPORTED, source=source
    )


def _rename(key: str) -> str:
    """Old attention names -> current ones; everything else unchanged."""
    m = _OLD_ATTENTION.fullmatch(key)
    if m is None:
        return key
    return f"{m.group(1)}.{_NEW_NAMES[m.group(2)]}.{m.group(3)}"


def load_vae(path: str | os.PathLike, dtype=jnp.float32) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` from a diffusers checkpoint folder, no network.

    Args:
      path: the ``vae/`` folder (``config.json`` + weights) or a pipeline folder holding it.
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); parameters stay float32.

    Raises:
      CheckpointError: missing folder/file, unknown or unsupported config field, a missing or
        unexpected tensor, or a tensor of the wrong shape (each named in the message).
    """
    folder = resolve_component(path, "vae")
    config = vae_config_from_diffusers(read_config(folder), source=str(folder / "config.json"))
    tensors = read_tensors(folder)
    return load_state_dict(
        lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)),
        tensors,
        rename=_rename,
        source=str(folder),
    )
