"""Load a transformers SegFormer folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) into :class:`segsr_jax.models.seg_encoder.SegFormer`.

Tensor names are the ones transformers writes to disk (``save_pretrained`` reverses its
in-memory renaming, and hub checkpoints such as ``nvidia/segformer-b5-finetuned-ade-640-640``
hold them): ``segformer.encoder.block.N.M...``, ``decode_head.linear_c.N.proj`` ... A state dict
taken straight from a transformers 5 model in memory (``segformer.stages.N.blocks.M...``,
``q_proj``, ``decode_head.linear_projections``) is accepted too and renamed back.

Only whole segmentation checkpoints (``SegformerForSemanticSegmentation``) load: an
encoder-only ``SegformerModel`` (e.g. ``nvidia/mit-b5``) or an ImageNet classifier has no
decode head, so neither the logits nor ``F_lq`` (the fused decode-head features) would exist;
such a folder is refused with an error saying so, rather than filled with a random head.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.seg_encoder import SegFormer, SegFormerConfig
from segsr_jax.weights.checkpoint_files import (
    CheckpointError,
    read_config,
    read_tensors,
    resolve_component,
)
from segsr_jax.weights.torch_mapping import config_from_dict, load_state_dict

# Every key of transformers 5's SegformerConfig (and of the PreTrainedConfig base, and legacy
# keys found in hub configs) that does not change our inference computation, with the reason.
IGNORED_CONFIG_KEYS = (
    # bookkeeping
    "transformers_version",
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "label2id",  # the inverse of id2label
    "problem_type",  # selects a loss; segmentation always uses cross-entropy
    "initializer_range",  # random init only; we load weights
    # training-only regularisers; this model is inference-only (frozen segmenter)
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout_prob",
    "drop_path_rate",
    # never read by transformers' SegFormer: all its LayerNorms use PyTorch's default eps
    "layer_norm_eps",
    "chunk_size_feed_forward",
    # only the PyTorch encoder's output layout of the last stage ([B, C, H, W] or [B, HW, C]);
    # the decode head sees the same maps either way (transformers' False path assumes square
    # inputs, ours is correct for any shape)
    "reshape_last_stage",
    # legacy keys of transformers-4 hub configs, unused since
    "image_size",
    "downsampling_rates",
)
# Features we do not implement, accepted only at their neutral value.
UNSUPPORTED_CONFIG_KEYS = {"is_encoder_decoder": False}

# transformers 5 in-memory names -> on-disk names (the reverse of its conversion mapping).
_IN_MEMORY_RENAMES = (
    (r"segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"segformer\.stages\.(\d+)\.blocks\.", r"segformer.encoder.block.\1."),
    (r"segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"attention\.q_proj\.", "attention.self.query."),
    (r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.v_proj\.", "attention.self.value."),
    (r"attention\.sequence_reduction\.sequence_reduction\.", "attention.self.sr."),
    (r"attention\.sequence_reduction\.layer_norm\.", "attention.self.layer_norm."),
    (r"attention\.o_proj\.", "attention.output.dense."),
    (r"mlp\.fc1\.", "mlp.dense1."),
    (r"mlp\.fc2\.", "mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
)
_IN_MEMORY_RES = tuple((re.compile(p), r) for p, r in _IN_MEMORY_RENAMES)
# Encoder tensors with or without the ``segformer.`` prefix, in either naming.
_ENCODER_KEY = re.compile(r"(segformer\.)?(encoder|stages)\.")


def _on_disk_name(key: str) -> str:
    for pattern, repl in _IN_MEMORY_RES:
        key = pattern.sub(repl, key)
    return key


def _class_names(raw: Mapping, source: str) -> tuple[str, ...] | None:
    """``id2label`` ({"0": "wall", ...}) -> names in index order; None if absent."""
    id2label = raw.get("id2label")
    if id2label is None:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, ValueError) as e:
        raise CheckpointError(f"{source}: id2label must map class indices to names: {e}") from e
    if sorted(by_index) != list(range(len(by_index))):
        raise CheckpointError(
            f"{source}: id2label indices are not 0..{len(by_index) - 1}: {sorted(by_index)[:10]}"
        )
    return tuple(by_index[i] for i in range(len(by_index)))


def segformer_config_from_transformers(raw: Mapping, source: str = "config") -> SegFormerConfig:
    """Build a :class:`SegFormerConfig` from a transformers ``config.json`` dict.

    Every key is classified: a field of :class:`SegFormerConfig` (used), ``id2label`` (the class
    names; ``num_labels`` is their count, as in transformers), :data:`IGNORED_CONFIG_KEYS`,
    :data:`UNSUPPORTED_CONFIG_KEYS` (accepted only at the neutral value); anything else is an
    error naming the key. Without ``id2label`` or ``num_labels`` transformers' default of 2
    classes applies.

    Raises:
      CheckpointError: a non-SegFormer config, an unknown or unsupported key, or invalid values.
    """
    model_type = raw.get("model_type", "segformer")
    if model_type != "segformer":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, not 'segformer'")
    raw = dict(raw)
    names = _class_names(raw, source)
    raw.pop("id2label", None)
    num_labels = raw.pop("num_labels", None)
    if names is not None:
        if num_labels is not None and num_labels != len(names):
            raise CheckpointError(
                f"{source}: num_labels={num_labels} but id2label names {len(names)} classes"
            )
        raw["id2label"] = names
        raw["num_labels"] = len(names)
    else:
        raw["num_labels"] = 2 if num_labels is None else num_labels
    return config_from_dict(
        SegFormerConfig,
        raw,
        ignored=IGNORED_CONFIG_KEYS,
        unsupported=UNSUPPORTED_CONFIG_KEYS,
        source=source,
    )


def load_segformer(path: str | os.PathLike, dtype=jnp.float32) -> SegFormer:
    """Load a transformers ``SegformerForSemanticSegmentation`` folder.

    Args:
      path: the folder with ``config.json`` and the weights, or a folder holding it as
        ``segformer/``.
      dtype: compute dtype (parameters and BatchNorm statistics stay float32).

    Returns:
      :class:`SegFormer`; ``logits, feats = seg(normalize_images(images))``.

    Raises:
      CheckpointError: missing folder / files, unknown config fields, an encoder-only or
        classification checkpoint, missing or unexpected tensors, or a shape mismatch (named).
    """
    folder = resolve_component(path, "segformer")
    source = str(folder)
    cfg = segformer_config_from_transformers(read_config(folder), source=source)
    tensors = {_on_disk_name(k): v for k, v in read_tensors(folder).items()}
    if not any(k.startswith("decode_head.") for k in tensors):
        encoder_only = any(_ENCODER_KEY.match(k) for k in tensors)
        kind = (
            "an encoder-only SegformerModel checkpoint"
            if encoder_only
            else "not a SegFormer segmentation checkpoint"
        )
        raise CheckpointError(
            f"{source} is {kind}: it has no decode_head.* tensors, so neither logits nor the "
            "fused features F_lq can be computed. load_segformer needs a "
            "SegformerForSemanticSegmentation checkpoint (e.g. "
            "nvidia/segformer-b5-finetuned-ade-640-640), not a bare MiT encoder."
        )
    return load_state_dict(
        lambda: SegFormer(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
        tensors,
        ignore=(r".*\.num_batches_tracked",),
        source=source,
    )
