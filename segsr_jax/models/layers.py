"""Building blocks shared by the VAE, UNet and ControlNet.

Attribute names follow diffusers' module names exactly (``norm1``, ``conv1``, ``to_q``,
``to_out[0]`` ...) so that :mod:`segsr_jax.weights.torch_mapping` can map a PyTorch state dict
onto these modules by name alone. Tensors are NHWC; parameters are float32 and the compute
dtype is ``dtype``. Normalisation statistics are always computed in float32 (Flax promotes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.remat import BLOCK, boundary

PARAM_DTYPE = jnp.float32


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding="torch",
    groups: int = 1,
    use_bias: bool = True,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A 2-D convolution with PyTorch's symmetric padding convention.

    ``padding="torch"`` pads ``kernel // 2`` on every side, as ``nn.Conv2d(padding=k//2)`` does;
    Flax's ``"SAME"`` differs from that for stride 2 (it pads only the high side).
    """
    if padding == "torch":
        p = kernel // 2
        padding = ((p, p), (p, p))
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=PARAM_DTYPE,
        rngs=rngs,
    )


def linear(
    in_f: int, out_f: int, *, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.Linear:
    """A dense layer with float32 parameters and compute dtype ``dtype``."""
    return nnx.Linear(
        in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs
    )


def _casts(module: nnx.Module):
    """``(variable, dtype)`` for each conv / dense / embedding weight of ``module`` whose
    dtype is not its layer's compute dtype."""
    for _, node in nnx.iter_graph(module):
        if not isinstance(node, (nnx.Conv, nnx.Linear, nnx.Embed)):
            continue
        dtype = getattr(node, "dtype", None)
        if dtype is None:
            continue
        for name in ("kernel", "bias", "embedding"):
            var = getattr(node, name, None)
            if isinstance(var, nnx.Variable) and var[...].dtype != jnp.dtype(dtype):
                yield var, dtype


def with_compute_dtype_weights(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` whose conv, dense and embedding weights are in their layer's
    compute dtype (``module`` itself is left as it is).

    The layers keep float32 parameters and cast them on every call. Inside the sampler's
    ``lax.scan`` those casts are loop-invariant, but XLA (CPU and GPU) keeps them in the loop
    body: a bfloat16 SD-2-size step re-reads 4.8 GB of float32 weights and writes their
    bfloat16 copies at every step. Casting once before the scan gives the same values (the
    same cast), and the loop carries the bfloat16 weights instead. For traced use (inference);
    training differentiates the float32 parameters. See :func:`inference_weights` for the
    eager, jitted form.
    """
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state, copy=True)  # new Variables: the caller's stay float32
    for var, dtype in list(_casts(copy)):
        var.set_value(var[...].astype(dtype))
    return copy


def inference_weights(module: nnx.Module) -> nnx.Module:
    """:func:`with_compute_dtype_weights` outside a trace, as one jitted program; ``module``
    itself when nothing needs a cast (float32 models). A bfloat16 model built for sampling
    then holds half the weight memory (once the float32 original is dropped)."""
    if next(_casts(module), None) is None:
        return module
    graphdef, state = nnx.split(module)
    cast = jax.jit(lambda st: nnx.state(with_compute_dtype_weights(nnx.merge(graphdef, st))))
    return nnx.merge(graphdef, cast(state))


def group_norm(
    channels: int, groups: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs
) -> GroupNorm:
    """GroupNorm over the last (channel) axis; statistics in float32 whatever ``dtype`` is."""
    return GroupNorm(channels, groups, eps, dtype=dtype, rngs=rngs)


class GroupNorm(nnx.Module):
    """Group normalisation of ``[B, ..., C]`` over all positions and the channels of a group,
    then a per-channel affine (``scale``, ``bias``: the names of ``nnx.GroupNorm`` and of the
    checkpoints).

    Written out rather than ``nnx.GroupNorm``, whose reduction over the ``[..., G, C/G]``
    view (a 2-wide innermost axis for 64 channels in 32 groups) XLA's CPU backend runs
    unvectorised: here per-channel sums over the positions (a contiguous reduction) are
    folded into groups afterwards, and the normalisation is one fused ``x * a + b`` pass,
    1.2-3x faster (``benchmarks/RESULTS.md``). Variance as ``E[x^2] - E[x]^2`` in float32, as
    ``nnx.GroupNorm``'s default.
    """

    def __init__(
        self, channels: int, groups: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        if channels % groups:
            raise ValueError(f"{groups} groups do not divide {channels} channels")
        del rngs  # ones and zeros: nothing random to draw
        self.num_groups = groups
        self.epsilon = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((channels,), PARAM_DTYPE))
        self.bias = nnx.Param(jnp.zeros((channels,), PARAM_DTYPE))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, ..., C]`` -> normalised ``[B, ..., C]`` in the compute dtype."""
        b, c = x.shape[0], x.shape[-1]
        g = self.num_groups
        xf = x.astype(jnp.float32)
        positions = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // g)
        mean = jnp.sum(xf, positions).reshape(b, g, c // g).sum(-1) / count  # [B, G]
        mean_sq = jnp.sum(xf * xf, positions).reshape(b, g, c // g).sum(-1) / count
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + self.epsilon)
        a = jnp.repeat(inv, c // g, axis=1) * self.scale[...]  # [B, C]
        shift = self.bias[...] - jnp.repeat(mean, c // g, axis=1) * a
        bcast = (b,) + (1,) * (x.ndim - 2) + (c,)
        return (xf * a.reshape(bcast) + shift.reshape(bcast)).astype(self.dtype)


def layer_norm(
    features: int, eps: float = 1e-5, *, dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """LayerNorm over the last axis; statistics in float32 whatever ``dtype`` is."""
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=PARAM_DTYPE, rngs=rngs)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of ``timesteps [B]`` -> ``[B, dim]`` float32 (diffusers'
    ``Timesteps``)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = linear(in_dim, embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (default "default" time-embedding norm, SiLU, no up/down).

    ``temb_channels=None`` drops the time projection (the VAE's blocks).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        groups_out: int | None = None,
        output_scale_factor: float = 1.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm1 = group_norm(in_ch, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (
            linear(temb_channels, out_ch, dtype=dtype, rngs=rngs)
            if temb_channels is not None
            else None
        )
        self.norm2 = group_norm(out_ch, groups_out or groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (
            conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None
        )
        self.output_scale_factor = output_scale_factor

    @boundary(BLOCK)
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """``x [B, H, W, Cin]``, ``temb [B, T]`` -> ``[B, H, W, Cout]``."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution named ``conv`` (diffusers' ``Downsample2D`` with ``use_conv``).

    ``pad=(lo, hi)``: the UNet uses PyTorch ``padding=1`` -> ``(1, 1)``; the VAE encoder pads
    ``(0, 1)`` by hand before an unpadded conv.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        pad=(1, 1),
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = conv(
            channels,
            out_channels or channels,
            3,
            stride=2,
            padding=(tuple(pad), tuple(pad)),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv named ``conv`` (diffusers' ``Upsample2D``)."""

    def __init__(
        self, channels: int, out_channels: int | None = None, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.conv = conv(channels, out_channels or channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        b, h, w, c = x.shape
        oh, ow = output_size if output_size is not None else (2 * h, 2 * w)
        if (oh, ow) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # PyTorch 'nearest' for an explicit size: src = floor(dst * in / out)
            rows = (jnp.arange(oh) * h) // oh
            cols = (jnp.arange(ow) * w) // ow
            x = x[:, rows][:, :, cols]
        return self.conv(x)


# Largest [B, H, Lq, Lk] score block the XLA path materialises, in elements, per backend.
# Longer query sequences are processed in chunks of queries, one after another (the result is
# the same: query rows are independent). On CPU a 4 MiB block stays in cache: 1.5-6x faster
# than one big block at 1024-4096 tokens (benchmarks/RESULTS.md). Elsewhere the bound only
# caps memory (1 GiB in float32), e.g. for the VAE's single-head attention on large tiles.
MAX_SCORE_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_MAX_SCORE_ELEMENTS = 1 << 28


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head scaled dot-product attention.

    ``q [B, Lq, H*D]``, ``k, v [B, Lk, H*D]`` -> ``[B, Lq, H*D]``; the softmax runs in float32
    for low-precision inputs.

    On a GPU with bfloat16/float16 inputs and a head size cuDNN supports, this is
    ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention; its
    default ``xla`` implementation materialises the score matrix). Elsewhere it is written out
    heads-first with the softmax normalisation deferred to the output: XLA's CPU lowering of
    ``jax.nn.dot_product_attention`` transposes the whole ``[Lq, Lk]`` probability matrix of
    every head between the two matmuls, which cost 4.5x the time at 1024 tokens (see
    ``benchmarks/RESULTS.md``). Score blocks above :data:`MAX_SCORE_ELEMENTS` are computed
    in query chunks, and gradients recompute the scores rather than store them.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    if _use_cudnn(q.dtype, d):
        try:
            out = jax.nn.dot_product_attention(
                q.reshape(b, lq, heads, d),
                k.reshape(b, lk, heads, d),
                v.reshape(b, lk, heads, d),
                implementation="cudnn",
            )
            return out.reshape(b, lq, inner)
        except NotImplementedError:
            pass  # jax's trace-time check: a shape this cuDNN cannot fuse; use the XLA path
    q = (q * d**-0.5).reshape(b, lq, heads, d).transpose(0, 2, 1, 3)  # [B, H, Lq, D]
    k = k.reshape(b, lk, heads, d).transpose(0, 2, 3, 1)  # [B, H, D, Lk]
    v = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)  # [B, H, Lk, D]
    limit = MAX_SCORE_ELEMENTS.get(jax.default_backend(), DEFAULT_MAX_SCORE_ELEMENTS)
    chunk = limit // (b * heads * lk)
    # Rematerialised: a backward pass recomputes each block's scores instead of keeping the
    # float32 [Lq, Lk] probabilities of every layer (320 MiB per SD-2 attention layer at
    # 512 px and batch 1; they were most of a train step's memory, measured with
    # benchmarks/memory_plan.py), as flash attention does; forward passes are unchanged.
    attend = jax.checkpoint(_softmax_attention)
    if chunk >= lq:
        out = attend(q, k, v)
    else:
        chunk = max(8, chunk // 8 * 8)
        n = -(-lq // chunk)
        # Zero-padded queries give finite rows that are cut off again below.
        qc = jnp.pad(q, ((0, 0), (0, 0), (0, n * chunk - lq), (0, 0)))
        qc = qc.reshape(b, heads, n, chunk, d).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda qi: attend(qi, k, v), qc)  # [n, B, H, chunk, D]
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, heads, n * chunk, d)[:, :, :lq]
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k) v`` for pre-scaled ``q [B, H, Lq, D]``, ``k [B, H, D, Lk]``,
    ``v [B, H, Lk, D]`` -> ``[B, H, Lq, D]`` in ``q``'s dtype (float32 softmax)."""
    scores = jnp.matmul(q, k, preferred_element_type=jnp.float32)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    # Normalising the [Lq, D] output instead of the [Lq, Lk] probabilities saves a full pass.
    out = jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(p, axis=-1, keepdims=True)).astype(q.dtype)


def _use_cudnn(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention serves this call (GPU, 16-bit, head size <= 128, % 8)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim <= 128
        and head_dim % 8 == 0
        and _cudnn_attention_compiles()
    )


@functools.cache
def _cudnn_attention_compiles() -> bool:
    """Probe once whether this process's default device compiles cuDNN attention (a GPU with
    a recent enough cuDNN); anything else uses the XLA formulation."""
    if jax.default_backend() != "gpu":
        return False
    spec = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    fn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    try:
        jax.jit(fn).lower(spec, spec, spec).compile()
    except (RuntimeError, ValueError, NotImplementedError):
        # cuDNN missing or too old for the fused kernel: the XLA path is correct, only slower.
        return False
    return True


class Attention(nnx.Module):
    """diffusers' ``Attention`` for the UNet: ``to_q/to_k/to_v`` and ``to_out[0]``.

    Self-attention when ``context`` is None, cross-attention otherwise.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.to_q = linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List(
            [linear(inner, query_dim, use_bias=out_bias, dtype=dtype, rngs=rngs)]
        )

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x [B, L, Dq]``, ``context [B, Lc, Dc]`` -> ``[B, L, Dq]``."""
        ctx = x if context is None else context
        out = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads)
        return self.to_out[0](out)
