"""SegFormer (MiT encoder + all-MLP decode head): SegSR's segmentation encoder, whose fused
decode-head features condition SegDM (``F_lq``) and whose logits are the fixed-segmenter baseline.

The module mirrors transformers' ``SegformerForSemanticSegmentation`` as it is stored on disk
(the names ``save_pretrained`` writes and hub checkpoints hold): ``segformer.encoder.
patch_embeddings.N``, ``segformer.encoder.block.N.M.{layer_norm_1, attention.self.{query, key,
value, sr, layer_norm}, attention.output.dense, layer_norm_2, mlp.{dense1, dwconv.dwconv,
dense2}}``, ``segformer.encoder.layer_norm.N`` and ``decode_head.{linear_c.N.proj, linear_fuse,
batch_norm, classifier}``, so :mod:`segsr_jax.weights.segformer` maps weights by name.

Input pixels are ImageNet-normalised RGB exactly as transformers' ``SegformerImageProcessor``
produces them (``(x / 255 - mean) / std`` with the ImageNet mean/std, no resizing here);
:func:`normalize_images` makes them from our uint8 or ``[-1, 1]`` images. The model is
inference-only: dropout and stochastic depth are not implemented and the decode head's
BatchNorm always uses its running statistics (the segmentation encoder is frozen in SegSR's
training stages).

(Just past 400 lines on purpose: one file mirrors one transformers model, its config to its
head, so the weight names can be checked against it in one read.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.attention import attention
from segsr_jax.models.layers import PARAM_DTYPE, conv, layer_norm, linear

# transformers builds every SegFormer LayerNorm as ``nn.LayerNorm(C)``: PyTorch's default eps,
# whatever ``layer_norm_eps`` in config.json says (hub configs say 1e-6; it is never read).
LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5  # nn.BatchNorm2d default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is exact (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_MIT_DEPTHS = {
    "b0": (2, 2, 2, 2),
    "b1": (2, 2, 2, 2),
    "b2": (3, 4, 6, 3),
    "b3": (3, 4, 18, 3),
    "b4": (3, 8, 27, 3),
    "b5": (3, 6, 40, 3),
}


@dataclasses.dataclass(frozen=True)
class SegFormerConfig:
    """The fields of transformers' ``SegformerConfig`` that change the inference computation.

    Defaults are MiT-B0 (transformers' defaults) with 150 ADE20K classes. ``id2label`` holds
    the class names in index order; left empty it becomes ``LABEL_0 .. LABEL_{K-1}``.
    """

    num_channels: int = 3
    num_encoder_blocks: int = 4
    depths: tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    hidden_act: str = "gelu"
    decoder_hidden_size: int = 256
    num_labels: int = 150
    id2label: tuple[str, ...] = ()
    semantic_loss_ignore_index: int = 255

    def __post_init__(self):
        n = self.num_encoder_blocks
        for name in (
            "depths",
            "sr_ratios",
            "hidden_sizes",
            "patch_sizes",
            "strides",
            "num_attention_heads",
            "mlp_ratios",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries, num_encoder_blocks is {n}"
                )
        for c, h in zip(self.hidden_sizes, self.num_attention_heads, strict=True):
            if c % h:
                raise ValueError(f"hidden size {c} is not divisible by {h} attention heads")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(ACTIVATIONS)}")
        if not self.id2label:
            object.__setattr__(
                self, "id2label", tuple(f"LABEL_{i}" for i in range(self.num_labels))
            )
        elif len(self.id2label) != self.num_labels:
            raise ValueError(
                f"id2label names {len(self.id2label)} classes, num_labels is {self.num_labels}"
            )

    @classmethod
    def _mit(cls, variant: str, num_labels: int) -> SegFormerConfig:
        wide = variant != "b0"
        return cls(
            depths=_MIT_DEPTHS[variant],
            hidden_sizes=(64, 128, 320, 512) if wide else (32, 64, 160, 256),
            decoder_hidden_size=768 if variant not in ("b0", "b1") else 256,
            num_labels=num_labels,
        )

    @classmethod
    def b0(cls, num_labels: int = 150) -> SegFormerConfig:
        """MiT-B0 (3.75M parameters with 150 classes)."""
        return cls._mit("b0", num_labels)

    @classmethod
    def b1(cls, num_labels: int = 150) -> SegFormerConfig:
        """MiT-B1."""
        return cls._mit("b1", num_labels)

    @classmethod
    def b2(cls, num_labels: int = 150) -> SegFormerConfig:
        """MiT-B2."""
        return cls._mit("b2", num_labels)

    @classmethod
    def b3(cls, num_labels: int = 150) -> SegFormerConfig:
        """MiT-B3."""
        return cls._mit("b3", num_labels)

    @classmethod
    def b4(cls, num_labels: int = 150) -> SegFormerConfig:
        """MiT-B4."""
        return cls._mit("b4", num_labels)

    @classmethod
    def b5(cls, num_labels: int = 150) -> SegFormerConfig:
        """MiT-B5 (84.7M parameters with 150 classes)."""
        return cls._mit("b5", num_labels)


def normalize_images(images: jax.Array) -> jax.Array:
    """Our images ``[B, H, W, 3]`` -> the pixels SegFormer was trained on (float32).

    uint8 images (0..255) and float images in ``[-1, 1]`` (the VAE's range) are both accepted;
    the result equals ``SegformerImageProcessor(do_resize=False)``'s ``pixel_values`` (NHWC).
    """
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        x01 = images.astype(jnp.float32) / 255.0
    else:
        x01 = (images.astype(jnp.float32) + 1.0) * 0.5
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x01 - mean) / std


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, h, w, C]``, equal to PyTorch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialiasing) for both up- and down-sampling.

    ``jax.image.resize``'s ``linear`` uses the same half-pixel sampling; its default antialias
    would differ from PyTorch when downsampling, hence ``antialias=False``.
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, *size, c), "linear", antialias=False)


class OverlapPatchEmbeddings(nnx.Module):
    """Strided conv ``proj`` (kernel ``patch``, stride ``stride``, padding ``patch // 2``) then
    ``layer_norm``."""

    def __init__(self, patch: int, stride: int, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.proj = conv(cin, cout, patch, stride=stride, dtype=dtype, rngs=rngs)
        self.layer_norm = layer_norm(cout, LAYER_NORM_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, Cin]`` -> ``[B, H/stride, W/stride, Cout]`` (PyTorch's rounding)."""
        return self.layer_norm(self.proj(x))


class EfficientSelfAttention(nnx.Module):
    """Queries over all tokens; keys/values from a map reduced ``sr`` times by a strided conv."""

    def __init__(self, dim: int, heads: int, sr: int, *, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.query = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.key = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.value = linear(dim, dim, dtype=dtype, rngs=rngs)
        if sr > 1:
            self.sr = conv(dim, dim, sr, stride=sr, padding="VALID", dtype=dtype, rngs=rngs)
            self.layer_norm = layer_norm(dim, LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        else:
            self.sr = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H*W, C]`` (before the output projection)."""
        b, h, w, c = x.shape
        kv = x if self.sr is None else self.layer_norm(self.sr(x))
        kv = kv.reshape(b, -1, c)
        q = self.query(x.reshape(b, h * w, c))
        return attention(q, self.key(kv), self.value(kv), self.heads)


class SelfOutput(nnx.Module):
    """``attention.output.dense``."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.dense = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class SegformerAttention(nnx.Module):
    """``attention.self`` (efficient self-attention) then ``attention.output``."""

    def __init__(self, dim: int, heads: int, sr: int, *, dtype, rngs: nnx.Rngs):
        # `self.self` is transformers' name (SegformerAttention.self); the mapper needs it.
        self.self = EfficientSelfAttention(dim, heads, sr, dtype=dtype, rngs=rngs)
        self.output = SelfOutput(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        return self.output(self.self(x)).reshape(x.shape)


class DepthwiseConv(nnx.Module):
    """``dwconv.dwconv``: 3x3 depthwise conv, the Mix-FFN's implicit position encoding."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.dwconv = conv(dim, dim, 3, groups=dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dwconv(x)


class MixFFN(nnx.Module):
    """``dense1 -> dwconv -> act -> dense2`` on a ``[B, H, W, C]`` map."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.dense1 = linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.dwconv = DepthwiseConv(hidden, dtype=dtype, rngs=rngs)
        self.dense2 = linear(hidden, dim, dtype=dtype, rngs=rngs)
        self.act = act  # a name, so the module's static structure stays plain data

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense2(ACTIVATIONS[self.act](self.dwconv(self.dense1(x))))


class MixBlock(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: SegFormerConfig, stage: int, *, dtype, rngs: nnx.Rngs):
        dim = cfg.hidden_sizes[stage]
        self.layer_norm_1 = layer_norm(dim, LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.attention = SegformerAttention(
            dim, cfg.num_attention_heads[stage], cfg.sr_ratios[stage], dtype=dtype, rngs=rngs
        )
        self.layer_norm_2 = layer_norm(dim, LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.mlp = MixFFN(
            dim, int(dim * cfg.mlp_ratios[stage]), cfg.hidden_act, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.layer_norm_1(x))
        return x + self.mlp(self.layer_norm_2(x))


class MixEncoder(nnx.Module):
    """The MiT encoder: per stage, patch embedding -> blocks -> LayerNorm."""

    def __init__(self, cfg: SegFormerConfig, *, dtype, rngs: nnx.Rngs):
        cins = (cfg.num_channels, *cfg.hidden_sizes[:-1])
        stages = range(cfg.num_encoder_blocks)
        self.patch_embeddings = nnx.List(
            [
                OverlapPatchEmbeddings(
                    cfg.patch_sizes[i],
                    cfg.strides[i],
                    cins[i],
                    cfg.hidden_sizes[i],
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in stages
            ]
        )
        self.block = nnx.List(
            [
                nnx.List([MixBlock(cfg, i, dtype=dtype, rngs=rngs) for _ in range(cfg.depths[i])])
                for i in stages
            ]
        )
        self.layer_norm = nnx.List(
            [
                layer_norm(cfg.hidden_sizes[i], LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
                for i in stages
            ]
        )

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``[B, H, W, Cin]`` -> one ``[B, H_i, W_i, hidden_sizes[i]]`` map per stage."""
        outs = []
        for embed, blocks, norm in zip(
            self.patch_embeddings, self.block, self.layer_norm, strict=True
        ):
            x = embed(x)
            for block in blocks:
                x = block(x)
            x = norm(x)
            outs.append(x)
        return outs


class MixTransformer(nnx.Module):
    """``segformer``: holds ``encoder`` (transformers' ``SegformerModel`` layout on disk)."""

    def __init__(self, cfg: SegFormerConfig, *, dtype, rngs: nnx.Rngs):
        self.encoder = MixEncoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        return self.encoder(x)


class StageProjection(nnx.Module):
    """``linear_c.N.proj``: a stage's channels -> ``decoder_hidden_size``."""

    def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.proj = linear(cin, cout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class DecodeHead(nnx.Module):
    """All-MLP head: project every stage, upsample to stage 0, fuse (1x1 conv + BN + ReLU),
    classify."""

    def __init__(self, cfg: SegFormerConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.decoder_hidden_size
        self.linear_c = nnx.List(
            [StageProjection(c, d, dtype=dtype, rngs=rngs) for c in cfg.hidden_sizes]
        )
        self.linear_fuse = conv(
            d * cfg.num_encoder_blocks, d, 1, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.batch_norm = nnx.BatchNorm(
            d,
            use_running_average=True,
            epsilon=BATCH_NORM_EPS,
            dtype=dtype,
            param_dtype=PARAM_DTYPE,
            rngs=rngs,
        )
        self.classifier = conv(d, cfg.num_labels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, stages: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Stage maps -> ``(logits [B, H0, W0, K], fused [B, H0, W0, decoder_hidden_size])``."""
        size = stages[0].shape[1:3]
        projected = [
            resize_bilinear(proj(x), size) for proj, x in zip(self.linear_c, stages, strict=True)
        ]
        # transformers concatenates the deepest stage first.
        fused = self.linear_fuse(jnp.concatenate(projected[::-1], axis=-1))
        fused = jax.nn.relu(self.batch_norm(fused))
        return self.classifier(fused), fused


class SegFormer(nnx.Module):
    """SegFormer for semantic segmentation (transformers' ``SegformerForSemanticSegmentation``).

    ``dtype`` is the compute dtype; parameters and BatchNorm statistics are float32.
    """

    def __init__(self, config: SegFormerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.segformer = MixTransformer(config, dtype=dtype, rngs=rngs)
        self.decode_head = DecodeHead(config, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Segment normalised pixels.

        Args:
          pixels: ``[B, H, W, num_channels]``, ImageNet-normalised (see :func:`normalize_images`).

        Returns:
          ``(logits [B, H/4, W/4, num_labels], feats [B, H/4, W/4, decoder_hidden_size])`` in
          the compute dtype; ``feats`` are the fused decode-head features after
          ``linear_fuse`` + BatchNorm + ReLU, the input of the classifier (``F_lq``). With the
          default strides the spatial size is PyTorch's conv rounding of ``H/4``.
        """
        if pixels.ndim != 4 or pixels.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"expected pixels [B, H, W, {self.config.num_channels}], got shape {pixels.shape}"
            )
        stages = self.segformer(pixels.astype(self.dtype))
        return self.decode_head(stages)
