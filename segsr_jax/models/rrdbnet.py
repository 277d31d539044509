"""RRDBNet (ESRGAN's generator; Real-ESRGAN x4plus) in Flax NNX, and tiled upscaling.

Architecture (Wang et al., "ESRGAN", 2018; "Real-ESRGAN", 2021), all convs 3x3, stride 1,
padding 1, with bias::

    feat = conv_first(x)
    body = conv_body(RRDB_{num_block}(... RRDB_1(feat)))  ;  feat = feat + body
    feat = lrelu(conv_up1(nearest_x2(feat)))
    feat = lrelu(conv_up2(nearest_x2(feat)))
    out  = conv_last(lrelu(conv_hr(feat)))

An RRDB is three residual dense blocks and a scaled residual, ``x + 0.2 * rdb3(rdb2(rdb1(x)))``;
a residual dense block has five convs, conv ``k`` seeing the concatenation of the block input
and the outputs of convs ``1..k-1`` (``num_grow_ch`` channels each, LeakyReLU 0.2 after convs
1-4), and returns ``x + 0.2 * conv5(...)``. For scales 2 and 1 the input is pixel-unshuffled
first (by 2 or 4), as in BasicSR, so the body always runs at 1/4 of the output size.

Images are NHWC RGB in ``[0, 1]``; the output is ``scale`` times larger and not clipped.
Sub-modules are named as BasicSR's ``RRDBNet`` (``conv_first``, ``body.0.rdb1.conv1`` ...,
``conv_last``) so :func:`segsr_jax.weights.torch_mapping.load_state_dict` maps its state dict,
and :func:`segsr_jax.weights.ncnn_rrdbnet.rrdbnet_from_layers` produces the same names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models import layers
from segsr_jax.models.vae_tiling import tiled_apply

_SLOPE = 0.2  # LeakyReLU negative slope
_RES_SCALE = 0.2  # residual scaling of the dense blocks and the RRDBs


@dataclasses.dataclass(frozen=True)
class RRDBNetConfig:
    """BasicSR ``RRDBNet`` arguments (same names, Real-ESRGAN x4plus defaults)."""

    num_in_ch: int = 3
    num_out_ch: int = 3
    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32

    def __post_init__(self):
        if self.scale not in (1, 2, 4):
            raise ValueError(f"scale must be 1, 2 or 4, got {self.scale}")
        if min(self.num_in_ch, self.num_out_ch, self.num_feat, self.num_grow_ch) < 1:
            raise ValueError(f"channel counts must be positive: {self}")
        if self.num_block < 0:
            raise ValueError(f"num_block must be >= 0, got {self.num_block}")

    @property
    def unshuffle(self) -> int:
        """Pixel-unshuffle factor applied to the input (4 / scale)."""
        return 4 // self.scale


def _lrelu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, _SLOPE)


def _up2(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H/f, W/f, C*f*f]`` with PyTorch's channel order (``c * f*f +
    i * f + j`` for the pixel at row offset ``i``, column offset ``j``)."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle by {factor} needs H and W divisible by it, got {h}x{w}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor**2)


def _conv3(cin: int, cout: int, *, dtype, rngs: nnx.Rngs, zeros: bool) -> nnx.Conv:
    """:func:`layers.conv` 3x3 (padding 1, float32 parameters), or the same layer with zero
    parameters, which builds several times faster (no random-initialiser programs to
    compile) when the weights are about to be loaded anyway."""
    if not zeros:
        return layers.conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    init = nnx.initializers.zeros
    return nnx.Conv(
        cin,
        cout,
        (3, 3),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=layers.PARAM_DTYPE,
        kernel_init=init,
        bias_init=init,
        rngs=rngs,
    )


class ResidualDenseBlock(nnx.Module):
    """Five densely connected convs and a 0.2-scaled residual (``conv1`` ... ``conv5``)."""

    def __init__(
        self,
        num_feat: int,
        num_grow_ch: int,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        zeros: bool = False,
    ):
        for k in range(1, 6):
            out = num_grow_ch if k < 5 else num_feat
            setattr(
                self,
                f"conv{k}",
                _conv3(num_feat + (k - 1) * num_grow_ch, out, dtype=dtype, rngs=rngs, zeros=zeros),
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        feats = [x]
        for k in range(1, 5):
            feats.append(_lrelu(getattr(self, f"conv{k}")(jnp.concatenate(feats, axis=-1))))
        return x + _RES_SCALE * self.conv5(jnp.concatenate(feats, axis=-1))


class RRDB(nnx.Module):
    """Residual-in-residual dense block: ``rdb1 -> rdb2 -> rdb3`` and a 0.2-scaled residual."""

    def __init__(
        self,
        num_feat: int,
        num_grow_ch: int,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        zeros: bool = False,
    ):
        kw = dict(dtype=dtype, rngs=rngs, zeros=zeros)
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch, **kw)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch, **kw)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + _RES_SCALE * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nnx.Module):
    """ESRGAN / Real-ESRGAN generator: ``[B, H, W, num_in_ch]`` in ``[0, 1]`` ->
    ``[B, scale*H, scale*W, num_out_ch]``.

    The RRDB trunk runs as a ``lax.scan`` over the blocks' stacked weights (one block is
    compiled, not ``num_block``), which is the same computation as calling them in turn.

    ``zeros=True`` starts every parameter at zero instead of Flax's default initialisers: the
    model to load weights into (:func:`load_rrdbnet`), built in about 2 s instead of 10 s
    for x4plus (no initialiser programs to compile; tracing it abstractly with
    ``nnx.eval_shape`` is slower still, quadratic in the number of parameters).
    """

    def __init__(
        self,
        config: RRDBNetConfig = RRDBNetConfig(),
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        zeros: bool = False,
    ):
        cfg = config
        self.config = cfg
        feat = cfg.num_feat
        conv = functools.partial(_conv3, dtype=dtype, rngs=rngs, zeros=zeros)
        self.conv_first = conv(cfg.num_in_ch * cfg.unshuffle**2, feat)
        self.body = nnx.List(
            [
                RRDB(feat, cfg.num_grow_ch, dtype=dtype, rngs=rngs, zeros=zeros)
                for _ in range(cfg.num_block)
            ]
        )
        self.conv_body = conv(feat, feat)
        self.conv_up1 = conv(feat, feat)
        self.conv_up2 = conv(feat, feat)
        self.conv_hr = conv(feat, feat)
        self.conv_last = conv(feat, cfg.num_out_ch)

    def trunk(self, feat: jax.Array) -> jax.Array:
        """The RRDB blocks in order (a scan over their stacked parameters)."""
        if not len(self.body):
            return feat
        graphdef, _ = nnx.split(self.body[0])
        states = [nnx.state(block) for block in self.body]
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)

        def step(h, state):
            return nnx.merge(graphdef, state)(h), None

        return jax.lax.scan(step, feat, stacked)[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.config.unshuffle > 1:
            x = pixel_unshuffle(x, self.config.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.trunk(feat))
        feat = _lrelu(self.conv_up1(_up2(feat)))
        feat = _lrelu(self.conv_up2(_up2(feat)))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


def upscale(
    model: RRDBNet,
    x: jax.Array,
    *,
    tile: int | None = 128,
    overlap: int = 16,
    tiles_per_step: int = 1,
) -> jax.Array:
    """``model(x)`` for images too large to run in one piece, tile by tile.

    ``x [B, H, W, C]`` in ``[0, 1]`` is cut into overlapping ``tile``-pixel windows (fixed
    shape; the last one ends flush with the image, none sees invented pixels), the network runs
    on ``tiles_per_step`` windows at a time, and the ``scale``-times-larger outputs are blended
    with linear ramps across the ``scale * overlap``-pixel overlaps (weights summing to one), as
    :func:`segsr_jax.models.vae_tiling.tiled_apply` does for the VAE. An image that fits in one
    tile (or ``tile=None``) gives exactly ``model(x)``. Each tile sees only its own window, so
    pixels near a seam differ slightly from the untiled result (the receptive field is cut
    there); a wider overlap hides more of it.

    For scales 2 and 1 the tile, the overlap and ``H``, ``W`` must be multiples of the
    pixel-unshuffle factor. Returns ``[B, scale*H, scale*W, num_out_ch]`` (not clipped).
    Call it under ``jax.jit`` / ``nnx.jit`` (eagerly, every call traces the RRDB scan anew).
    """
    if tile is None:
        return model(x)
    s, f = model.config.scale, model.config.unshuffle
    _, h, w, _ = x.shape
    if any(v % f for v in (tile, overlap, h, w)):
        raise ValueError(
            f"scale {s} needs tile, overlap, H and W divisible by {f}; got "
            f"tile={tile}, overlap={overlap}, {h}x{w}"
        )
    return tiled_apply(
        model, x, tile, overlap, num=s, den=1, align=f, tiles_per_step=tiles_per_step
    )


def rrdbnet_from_tensors(
    config: RRDBNetConfig, tensors, *, dtype=jnp.float32, source: str = "checkpoint"
) -> RRDBNet:
    """An :class:`RRDBNet` holding ``tensors`` (PyTorch layout, BasicSR names, e.g. from
    :func:`segsr_jax.weights.ncnn_rrdbnet.rrdbnet_from_layers` or a BasicSR ``params_ema`` dict).

    Raises:
      CheckpointError: a missing or unexpected tensor, or a shape mismatch (named).
    """
    from segsr_jax.weights.torch_mapping import load_state_dict

    return load_state_dict(
        lambda: RRDBNet(config, dtype=dtype, rngs=nnx.Rngs(0), zeros=True),
        tensors,
        allow_missing=[_NO_KEY],
        source=source,
    )


# A pattern no key matches: load_state_dict then builds the module for real (zeros=True:
# about 2 s for x4plus) and fills it, instead of tracing it with nnx.eval_shape, which for
# 702 parameters in one trace took 13-27 s on a 2-core machine (Flax asks every new tracer
# for its sharding, and JAX's error text for that walks the whole trace so far). Every
# tensor must still be present: nothing is allowed to be missing.
_NO_KEY = r"(?!)"


def load_rrdbnet(path: str | os.PathLike, dtype=jnp.float32) -> RRDBNet:
    """Load a converted RRDBNet folder (``config.json`` + ``model.safetensors`` with BasicSR
    names, as written by ``python -m segsr_jax.weights.fetch realesrgan``)."""
    from segsr_jax.weights.checkpoint_files import CheckpointError, read_tensors
    from segsr_jax.weights.torch_mapping import config_from_dict

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json (run `python -m segsr_jax.weights.fetch "
            "realesrgan` to create it)"
        )
    raw = json.loads((folder / "config.json").read_text())
    config = config_from_dict(RRDBNetConfig, raw.get("model", {}), source=str(folder))
    return rrdbnet_from_tensors(config, read_tensors(folder), dtype=dtype, source=str(folder))
