"""Scaled dot-product attention and diffusers' ``Attention`` module (UNet, SegDM, VAE,
SegFormer all attend through :func:`attention`).

One function, so that every model gets the same memory bounds and kernels: cuDNN's fused
attention where it applies, else an XLA formulation that chunks long query sequences and
recomputes the scores in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models.layers import linear

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
