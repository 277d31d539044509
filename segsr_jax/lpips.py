"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", 2018), VGG16 variant, in Flax NNX.

    from segsr_jax.lpips import load_lpips
    metric = load_lpips()   # converted by `python -m segsr_jax.weights.fetch lpips`
    d = metric(x, y)        # x, y [B, H, W, 3] RGB in [-1, 1] -> [B]

Definition (LPIPS v0.1): both images pass LPIPS's scaling layer ``(x - shift) / scale`` with
``shift = (-0.030, -0.088, -0.188)``, ``scale = (0.458, 0.448, 0.450)``, then VGG16's conv
layers (3x3, padding 1, ReLU; 2x2 max-pool between the five stages); the activations after
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are unit-normalised along channels
(``f / (||f||_2 + 1e-10)``), their squared differences weighted per channel by the learned
linear heads (1x1 convs to one channel, no bias), averaged over space, and summed over the five
layers. Tensors are NHWC; parameters float32. Sub-module names (``convs.{i}``, ``lins.{k}``)
are the keys of the converted safetensors (PyTorch layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models import layers

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# VGG16 conv widths per stage; LPIPS taps the last ReLU of each stage.
STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_EPS = 1e-10


def _normalize(f: jax.Array) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2, stride 2, odd rows / columns dropped (PyTorch's ``MaxPool2d(2, 2)``)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LPIPS(nnx.Module):
    """LPIPS distance with a VGG16 backbone: ``(x, y) [B, H, W, 3]`` in ``[-1, 1]`` -> ``[B]``.

    ``convs`` are VGG16's 13 conv layers (torchvision ``features`` 0, 2, 5, ..., 28); ``lins``
    the five linear heads. ``dtype`` is the compute dtype (float32 for a metric).
    """

    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        convs, lins, cin = [], [], 3
        for stage in STAGES:
            for cout in stage:
                convs.append(layers.conv(cin, cout, 3, dtype=dtype, rngs=rngs))
                cin = cout
            lins.append(layers.conv(cin, 1, 1, use_bias=False, dtype=dtype, rngs=rngs))
        self.convs = nnx.List(convs)
        self.lins = nnx.List(lins)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five tapped VGG activations (relu1_2 ... relu5_3) of scaled inputs ``x``."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        h = (x.astype(jnp.float32) - shift) / scale
        taps, i = [], 0
        for s, stage in enumerate(STAGES):
            if s:
                h = _max_pool(h)
            for _ in stage:
                h = jax.nn.relu(self.convs[i](h))
                i += 1
            taps.append(h)
        return taps

    def layer_distances(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Per-layer terms ``[B, 5]`` whose sum over the last axis is the distance."""
        if x.shape != y.shape or x.shape[-1] != 3:
            raise ValueError(
                f"LPIPS needs two [B, H, W, 3] images of one shape, got {x.shape} and {y.shape}"
            )
        b = x.shape[0]
        feats = self.features(jnp.concatenate([x, y]))  # one pass for both images
        terms = []
        for f, lin in zip(feats, self.lins, strict=True):
            d = (_normalize(f[:b]) - _normalize(f[b:])) ** 2
            terms.append(jnp.mean(lin(d), axis=(1, 2, 3)))
        return jnp.stack(terms, axis=-1)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sum(self.layer_distances(x, y), axis=-1)


def lpips_params(metric: LPIPS) -> dict:
    """``metric``'s weights as a pure dict (what a training step takes as ``loss_params``)."""
    return nnx.to_pure_dict(nnx.state(metric, nnx.Param))


def lpips_from_params(params: dict, dtype=jnp.float32) -> LPIPS:
    """The LPIPS module holding ``params`` (inverse of :func:`lpips_params`; traceable)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LPIPS(dtype=dtype, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_lpips(path: str | os.PathLike | None = None, dtype=jnp.float32) -> LPIPS:
    """LPIPS with the weights converted by ``python -m segsr_jax.weights.fetch lpips``.

    ``path`` is the converted folder (``model.safetensors``); default: the fetch cache's
    ``lpips`` folder (``$SEGSR_JAX_CACHE_DIR`` or ``~/.cache/segsr_jax``).
    """
    from segsr_jax.weights.checkpoint_files import CheckpointError, read_tensors
    from segsr_jax.weights.fetch import model_dir
    from segsr_jax.weights.torch_mapping import load_state_dict

    folder = Path(path) if path is not None else model_dir("lpips")
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"{folder}: no model.safetensors (run `python -m "
            "segsr_jax.weights.fetch lpips` to create it)"
        )
    cfg = folder / "config.json"
    if cfg.is_file():
        net = json.loads(cfg.read_text()).get("model", {}).get("net", "vgg16")
        if net != "vgg16":
            raise CheckpointError(f"{folder}: LPIPS net {net!r}; only vgg16 is implemented")
    return load_state_dict(
        lambda: LPIPS(dtype=dtype, rngs=nnx.Rngs(0)), read_tensors(folder), source=str(folder)
    )
