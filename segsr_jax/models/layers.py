"""Building blocks shared by the VAE, UNet and ControlNet.

Attribute names follow diffusers' module names exactly (``norm1``, ``conv1``, ``to_q``,
``to_out[0]`` ...) so that :mod:`segsr_jax.weights.torch_mapping` can map a PyTorch state dict
onto these modules by name alone. Tensors are NHWC; parameters are float32 and the compute
dtype is ``dtype``. Normalisation statistics are always computed in float32 (Flax promotes).
"""

from __future__ import annotations

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
