"""Loading diffusers ``UNet2DConditionModel`` and ``ControlNetModel`` checkpoints.

``path`` is the component folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
or ``.bin``) or a whole pipeline folder (its ``unet/`` or ``controlnet/`` is used). Every key
of diffusers 0.42's config for these classes is classified below as used (a field of our
config), unsupported (accepted only at its neutral value) or ignored, so a checkpoint that
relies on a feature we do not implement is refused with the key named, never silently run
wrong.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.controlnet import ControlNet, ControlNetConfig, controlnet_from_unet
from segsr_jax.models.unet import UNet2DCondition, UNetConfig
from segsr_jax.weights.checkpoint_files import (
    CheckpointError,
    read_config,
    read_tensors,
    resolve_component,
)
from segsr_jax.weights.torch_mapping import config_from_dict, load_state_dict

__all__ = [
    "load_unet",
    "load_controlnet",
    "controlnet_from_unet",
    "unet_config_from_diffusers",
    "controlnet_config_from_diffusers",
    "UNET_UNSUPPORTED",
    "CONTROLNET_UNSUPPORTED",
    "UNET_IGNORED",
    "CONTROLNET_IGNORED",
]

# ``only_cross_attention`` may be one bool or one per block; only all-False is supported.
_ALL_FALSE = frozenset({False} | {(False,) * n for n in range(1, 9)})

# Features shared by both classes that we do not implement: key -> accepted neutral value(s).
_COMMON_UNSUPPORTED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": _ALL_FALSE,
    "act_fn": frozenset({"silu", "swish"}),  # the same function under two names
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default",
}

UNET_UNSUPPORTED = {
    **_COMMON_UNSUPPORTED,
    "mid_block_only_cross_attention": frozenset({None, False}),
    "dual_cross_attention": False,
    # Dropout only acts in training; we train without it, so only 0 is honest.
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
    "class_embeddings_concat": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
}

CONTROLNET_UNSUPPORTED = {**_COMMON_UNSUPPORTED, "global_pool_conditions": False}

# Read by diffusers only when ``addition_embed_type == "text"``, which is refused above.
UNET_IGNORED = frozenset({"addition_embed_type_num_heads"})
CONTROLNET_IGNORED = frozenset({"addition_embed_type_num_heads"})


def _check_class(raw: dict, expected: str, source: str) -> None:
    name = raw.get("_class_name")
    if name is not None and name != expected:
        raise CheckpointError(f"{source}: config.json describes a {name}, not a {expected}")


def unet_config_from_diffusers(raw: dict, source: str = "config") -> UNetConfig:
    """A :class:`UNetConfig` from diffusers' ``UNet2DConditionModel`` ``config.json`` dict.

    Raises:
      CheckpointError: another class, an unknown key, or an unsupported non-neutral value.
    """
    _check_class(raw, "UNet2DConditionModel", source)
    return config_from_dict(
        UNetConfig, raw, ignored=UNET_IGNORED, unsupported=UNET_UNSUPPORTED, source=source
    )


def controlnet_config_from_diffusers(raw: dict, source: str = "config") -> ControlNetConfig:
    """A :class:`ControlNetConfig` from diffusers' ``ControlNetModel`` ``config.json`` dict.

    A ``"conditioning"`` key (our extension) selects latent conditioning; without it the
    config is diffusers' pixel-space ControlNet.
    """
    _check_class(raw, "ControlNetModel", source)
    return config_from_dict(
        ControlNetConfig,
        raw,
        ignored=CONTROLNET_IGNORED,
        unsupported=CONTROLNET_UNSUPPORTED,
        source=source,
    )


def load_unet(path: str | os.PathLike, dtype=jnp.float32) -> UNet2DCondition:
    """Load a diffusers UNet folder (or pipeline folder) as :class:`UNet2DCondition`.

    Args:
      path: ``unet/`` itself or the pipeline folder holding it.
      dtype: compute dtype (parameters stay float32).

    Raises:
      CheckpointError: missing folder / config / weights, bad config, or tensors that do not
        fit the config (named).
    """
    folder = resolve_component(path, "unet")
    config = unet_config_from_diffusers(read_config(folder), source=str(folder))
    tensors = read_tensors(folder)
    return load_state_dict(
        lambda: UNet2DCondition(config, dtype=dtype, rngs=nnx.Rngs(0)), tensors, source=str(folder)
    )


def load_controlnet(
    path: str | os.PathLike, dtype=jnp.float32, conditioning: str | None = None
) -> ControlNet:
    """Load a diffusers ControlNet folder (or pipeline folder with ``controlnet/``).

    Args:
      path: ``controlnet/`` itself or the pipeline folder holding it.
      dtype: compute dtype (parameters stay float32).
      conditioning: ``"pixel"`` / ``"latent"`` overrides the config's choice (diffusers
        checkpoints are pixel).

    Raises:
      CheckpointError: as :func:`load_unet`.
    """
    folder = resolve_component(path, "controlnet")
    config = controlnet_config_from_diffusers(read_config(folder), source=str(folder))
    if conditioning is not None:
        try:
            config = dataclasses.replace(config, conditioning=conditioning)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from e
    tensors = read_tensors(folder)
    return load_state_dict(
        lambda: ControlNet(config, dtype=dtype, rngs=nnx.Rngs(0)), tensors, source=str(folder)
    )
