"""Load a transformers CLIP text encoder and its tokenizer from a local checkpoint folder.

Accepted weights: transformers 5 ``CLIPTextModel`` keys (``embeddings.token_embedding.weight``
...), the transformers 4.x layout with a ``text_model.`` prefix (the SD-2 diffusers folder),
``CLIPTextModelWithProjection`` (its ``text_projection`` is not used) and a full ``CLIPModel``
(``config.json`` with a nested ``text_config``; the vision tower is skipped). The non-persistent
``position_ids`` buffer that 4.x checkpoints carry is ignored.

The tokenizer is transformers' ``CLIPTokenizer`` read offline from the folder; prompts are
padded and truncated exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does
(``padding="max_length"``, ``max_length=model_max_length``, ``truncation=True``), with the
folder's own pad token: SD-2 pads with ``"!"`` (id 0), as OpenCLIP did in training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from segsr_jax.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from segsr_jax.weights.checkpoint_files import (
    CheckpointError,
    read_config,
    read_tensors,
    resolve_component,
)
from segsr_jax.weights.torch_mapping import config_from_dict, load_state_dict

# Keys of transformers 5's CLIPTextConfig (and of the generic 4.x PretrainedConfig dump that
# older folders carry) that CLIPTextModel's forward pass does not depend on: metadata, dropout
# and init settings (training only), output-format switches (ours are call arguments), heads
# and generation settings of other model classes, and ``chunk_size_feed_forward`` (CLIP never
# chunks). ``model_type`` is checked before parsing.
_IGNORED = (
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
    "gradient_checkpointing",
    "use_bfloat16",
    "torchscript",
    "tf_legacy_loss",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "task_specific_params",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
)
# diffusers passes the tokenizer's attention mask to the text encoder when a config sets
# ``use_attention_mask``; we (like SD) attend over the padding, so only the neutral value loads.
_UNSUPPORTED = {"use_attention_mask": frozenset({False, None})}
_TEXT_PREFIX = "text_model."
# Tensors of the heads around the text tower: never used by the text encoder.
_PROJECTION_KEYS = (r"text_projection\.weight", r"(text_model\.)?embeddings\.position_ids")
_CLIP_MODEL_KEYS = (r"vision_model\..*", r"visual_projection\.weight", r"logit_scale")


def _is_full_clip_config(raw: Mapping) -> bool:
    return raw.get("model_type") == "clip" or "text_config" in raw or "text_config_dict" in raw


def text_config_from_transformers(raw: Mapping, source: str = "config") -> CLIPTextConfig:
    """A :class:`CLIPTextConfig` from a transformers ``config.json`` dict.

    ``raw`` is a ``CLIPTextConfig`` (``model_type`` ``clip_text_model``) or a full
    ``CLIPConfig`` (``model_type`` ``clip``), whose ``text_config`` (overridden by the legacy
    ``text_config_dict``, as transformers does) is used. Keys are used (the dataclass fields),
    ignored (see ``_IGNORED``), or accepted only at a neutral value (``use_attention_mask``
    false, ``pruned_heads`` empty); any other key raises :class:`CheckpointError` naming it.
    """
    if _is_full_clip_config(raw):
        text = dict(raw.get("text_config") or {})
        text.update(raw.get("text_config_dict") or {})
        raw, source = text, f"{source} (text_config)"
    model_type = raw.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}, expected "
            "'clip_text_model' (or a 'clip' config with a text_config)"
        )
    # A dict value cannot go through config_from_dict's neutral-value set: check it here.
    if raw.get("pruned_heads"):
        raise CheckpointError(
            f"{source}: unsupported setting pruned_heads={raw['pruned_heads']!r} (supported: empty)"
        )
    raw = {k: v for k, v in raw.items() if k != "pruned_heads"}
    return config_from_dict(
        CLIPTextConfig, raw, ignored=_IGNORED, unsupported=_UNSUPPORTED, source=source
    )


def _strip_prefix(key: str) -> str:
    return key[len(_TEXT_PREFIX) :] if key.startswith(_TEXT_PREFIX) else key


def load_text_encoder(path: str | os.PathLike, dtype=jnp.float32) -> CLIPTextEncoder:
    """Build a :class:`CLIPTextEncoder` from a transformers checkpoint folder, no network.

    Args:
      path: the ``text_encoder/`` folder (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``) or a diffusers pipeline folder holding it.
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); parameters stay float32.

    Raises:
      CheckpointError: missing folder/file, unknown or unsupported config field, a missing or
        unexpected tensor, or a tensor of the wrong shape (each named in the message).
    """
    folder = resolve_component(path, "text_encoder")
    raw = read_config(folder)
    config = text_config_from_transformers(raw, source=str(folder / "config.json"))
    ignore = _PROJECTION_KEYS + (_CLIP_MODEL_KEYS if _is_full_clip_config(raw) else ())
    tensors = read_tensors(folder)
    return load_state_dict(
        lambda: CLIPTextEncoder(config, dtype=dtype, rngs=nnx.Rngs(0)),
        tensors,
        rename=_strip_prefix,
        ignore=ignore,
        source=str(folder),
    )


class PromptTokenizer:
    """Prompts -> CLIP token ids, padded and truncated like diffusers' SD pipelines.

    Attributes:
      max_length: every row's length (the folder's ``model_max_length``, 77 for SD).
      pad_token_id, bos_token_id, eos_token_id: from the folder's tokenizer files.
    """

    def __init__(self, tokenizer, source: str):
        self._tokenizer = tokenizer
        self.source = source
        self.max_length = int(tokenizer.model_max_length)
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``prompts`` (one string or a list of ``B``) -> int32 ids ``[B, max_length]``.

        Each row is ``BOS, tokens..., EOS, PAD...``; a prompt too long for ``max_length`` is
        cut so that its last entry is still EOS.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__}")
        if not prompts:
            return np.zeros((0, self.max_length), np.int32)
        ids = self._tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True
        )["input_ids"]
        return np.asarray(ids, dtype=np.int32)


# A folder holds a usable CLIP vocabulary if it has either of these file sets; without them
# transformers silently builds a 2-token tokenizer, so their absence is an error here.
_VOCAB_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _has_vocab(folder: Path) -> bool:
    return any(all((folder / f).is_file() for f in files) for files in _VOCAB_FILE_SETS)


def load_tokenizer(path: str | os.PathLike) -> PromptTokenizer:
    """The CLIP tokenizer of a checkpoint, read offline with transformers' ``CLIPTokenizer``.

    Args:
      path: a pipeline folder (its ``tokenizer/`` is used) or the tokenizer folder itself
        (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``; plus ``tokenizer_config.json``
        and ``special_tokens_map.json``, which set ``model_max_length`` and the pad token).

    Raises:
      CheckpointError: no tokenizer files, or no ``model_max_length`` to pad to.
    """
    path = Path(path)
    folder = path / "tokenizer" if _has_vocab(path / "tokenizer") else path
    if not _has_vocab(folder):
        if not path.exists():
            raise CheckpointError(f"tokenizer path not found: {path}")
        raise CheckpointError(
            f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt in "
            f"{path} or {path / 'tokenizer'}"
        )
    from transformers import CLIPTokenizer  # heavy import: only when a tokenizer is loaded

    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    # transformers' stand-in for "unset" is ~1e30; padding every prompt to that is a bug.
    if not 0 < tokenizer.model_max_length <= 1_000_000:
        raise CheckpointError(
            f"{folder}: tokenizer_config.json sets no model_max_length (SD tokenizers use 77)"
        )
    return PromptTokenizer(tokenizer, source=str(folder))
