"""The CLIP text tower in Hugging Face's ``CLIPTextModel`` layout (Flax NNX).

Stable Diffusion 2 conditions its UNet on OpenCLIP ViT-H/14's text tower. The diffusers folder
(``stable-diffusion-2-base/text_encoder``) stores it as a transformers ``CLIPTextModel`` with
**23** layers: OpenCLIP-H has 24, and SD-2 was trained on the penultimate layer's output passed
through the final LayerNorm, so the conversion dropped the last layer. Therefore SD-2's
conditioning is simply this module's ``last_hidden_state`` (after ``final_layer_norm``); taking
``hidden_states[-2]`` of the converted model would skip one layer too many.

Attribute names mirror transformers' (``embeddings.token_embedding``,
``encoder.layers.N.self_attn.q_proj``, ``final_layer_norm`` ...) so that
:mod:`segsr_jax.weights.torch_mapping` maps a state dict by name. Parameters are float32; the
compute dtype is ``dtype`` (LayerNorm statistics and the attention softmax stay float32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.layers import PARAM_DTYPE, layer_norm, linear

# transformers' ACT2FN names we implement: "gelu" is the exact erf GELU (OpenCLIP, SD-2);
# "quick_gelu" is OpenAI CLIP's x * sigmoid(1.702 x) (SD-1.x).
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' ``CLIPTextConfig`` that shape the model.

    Defaults equal transformers' defaults (OpenAI CLIP ViT-B/32), because transformers may
    leave default values out of a saved ``config.json``.

    Attributes:
      projection_dim: read but ignored (only ``CLIPTextModelWithProjection`` uses it).
      pad_token_id, bos_token_id: informational; the tokenizer decides padding.
      eos_token_id: selects the pooled position (see :meth:`CLIPTextEncoder.pool`).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {sorted(_ACTIVATIONS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be one int, got {self.eos_token_id!r}")

    @classmethod
    def sd2(cls) -> CLIPTextConfig:
        """SD-2's text encoder (``stabilityai/stable-diffusion-2-base/text_encoder``): the
        OpenCLIP ViT-H/14 text tower cut to 23 layers, 340,387,840 parameters."""
        return cls(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=512,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )


def _embed(num: int, features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(num, features, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.token_embedding = _embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = _embed(
            config.max_position_embeddings, config.hidden_size, dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids_bl: jax.Array) -> jax.Array:
        """``input_ids [B, L]`` -> ``[B, L, D]``; positions are ``0 .. L-1``."""
        length = input_ids_bl.shape[1]
        positions = self.position_embedding(jnp.arange(length))
        return self.token_embedding(input_ids_bl) + positions[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased ``q/k/v/out`` projections and a causal mask."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, L, D]`` -> ``[B, L, D]``; token ``i`` attends to tokens ``0 .. i``."""
        b, length, d = x.shape
        split = lambda t: t.reshape(b, length, self.heads, d // self.heads)
        # The scale defaults to 1/sqrt(head_dim), as in CLIP.
        out = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(out.reshape(b, length, d))


class CLIPMLP(nnx.Module):
    """``fc1 -> activation -> fc2``."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(config.hidden_size, eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(config.hidden_size, eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of ``num_hidden_layers`` blocks (``encoder.layers.N`` in the state dict)."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class CLIPTextEncoder(nnx.Module):
    """transformers' ``CLIPTextModel`` (the text tower, no projection).

    Usage::

        te = CLIPTextEncoder(CLIPTextConfig.sd2(), rngs=nnx.Rngs(0))
        context = te(input_ids)                       # [B, 77, 1024]: SD-2's conditioning
        last, hidden = te(input_ids, output_hidden_states=True)
        pooled = te.pool(last, input_ids)             # [B, 1024]
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layer_norm(
            config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids_bl: jax.Array, *, output_hidden_states: bool = False):
        """Encode token ids.

        Args:
          input_ids_bl: ``[B, L]`` integer token ids, ``L <= max_position_embeddings``
            (77 for SD: the tokenizer pads every prompt to that length).
          output_hidden_states: also return every layer's output.

        Returns:
          ``last_hidden_state [B, L, D]`` (the last block's output after
          ``final_layer_norm``). With ``output_hidden_states=True``, the pair
          ``(last_hidden_state, hidden_states)`` where ``hidden_states`` is a tuple of
          ``num_hidden_layers + 1`` arrays ``[B, L, D]``: the embeddings, then each block's
          output *before* the final LayerNorm (transformers' ``hidden_states``). diffusers'
          ``clip_skip=k`` is ``final_layer_norm(hidden_states[-(k + 1)])``.
        """
        if input_ids_bl.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids_bl.shape}")
        if input_ids_bl.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids_bl.shape[1]} exceeds "
                f"max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = self.embeddings(input_ids_bl)
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = self.final_layer_norm(x)
        if output_hidden_states:
            return last, tuple(hidden)
        return last

    def pool(self, last_hidden_bld: jax.Array, input_ids_bl: jax.Array) -> jax.Array:
        """transformers' ``pooler_output``: the hidden state at each sequence's EOS token.

        Checkpoints whose config says ``eos_token_id == 2`` (SD-2's, converted before
        transformers fixed the id) take the position of the largest token id, which is EOS in
        CLIP's vocabulary; others take the first occurrence of ``eos_token_id`` (padding may
        repeat it). ``last_hidden_bld [B, L, D]``, ``input_ids_bl [B, L]`` -> ``[B, D]``.
        """
        if self.config.eos_token_id is None:
            raise ValueError("pool() needs the config's eos_token_id")
        if self.config.eos_token_id == 2:
            pos = jnp.argmax(input_ids_bl, axis=-1)
        else:
            pos = jnp.argmax(input_ids_bl == self.config.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden_bld, pos[:, None, None], axis=1)[:, 0]
