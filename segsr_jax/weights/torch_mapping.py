"""Map a PyTorch state dict onto a Flax NNX module whose attribute names mirror PyTorch's.

Our modules name their sub-modules exactly as diffusers / transformers do, so the PyTorch key
of every NNX variable follows from its path: ``('down_blocks', 0, 'resnets', 1, 'conv1',
'kernel')`` is ``down_blocks.0.resnets.1.conv1.weight``. Only the leaf names and layouts differ:

=============  ==================  =========================================
NNX leaf       PyTorch leaf        layout change
=============  ==================  =========================================
``kernel``     ``weight``          Linear ``[out, in] -> [in, out]``;
                                   Conv ``[O, I, kh, kw] -> [kh, kw, I, O]``
``scale``      ``weight``          none (norms)
``embedding``  ``weight``          none (embeddings)
``mean``       ``running_mean``    none (BatchNorm statistics)
``var``        ``running_var``     none
=============  ==================  =========================================

A 1x1 convolution and a linear layer are interchangeable (diffusers' ``proj_in`` switches
between them, and old VAE checkpoints store attention as 1x1 convs); shapes are adapted.
Every mismatch is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segsr_jax.weights.checkpoint_files import CheckpointError

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_key(path: tuple) -> str:
    """The PyTorch state-dict key of the NNX variable at ``path``."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax_layout(name: str, leaf: str, value: np.ndarray, target_shape: tuple) -> np.ndarray:
    """Convert one PyTorch tensor to the layout of the NNX variable (raises on mismatch)."""
    value = np.asarray(value)
    if leaf == "kernel":
        if value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
            value = value.transpose(2, 3, 1, 0)
            if len(target_shape) == 2 and value.shape[:2] == (1, 1):  # 1x1 conv -> linear
                value = value[0, 0]
        elif value.ndim == 2:  # linear [out, in] -> [in, out]
            value = value.T
            if len(target_shape) == 4:  # linear -> 1x1 conv
                value = value[None, None]
        elif value.ndim == 3 and len(target_shape) == 3:  # conv1d [O, I, k] -> [k, I, O]
            value = value.transpose(2, 1, 0)
    if tuple(value.shape) != tuple(target_shape):
        raise CheckpointError(
            f"shape mismatch for tensor '{name}': checkpoint has {tuple(np.shape(value))} "
            f"(after layout change), the model expects {tuple(target_shape)}"
        )
    return value


def load_state_dict(
    factory: Callable[[], nnx.Module],
    tensors: Mapping[str, np.ndarray],
    *,
    rename: Callable[[str], str | None] | None = None,
    ignore: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    source: str = "checkpoint",
) -> nnx.Module:
    """Build ``factory()`` abstractly (no random init) and fill it from a PyTorch state dict.

    Args:
      factory: builds the module, e.g. ``lambda: UNet2DCondition(cfg, rngs=nnx.Rngs(0))``.
      tensors: PyTorch key -> numpy array.
      rename: maps a checkpoint key to our key (``None`` drops it), e.g. to strip a prefix.
      ignore: regexes of checkpoint keys that are expected and unused (buffers like
        ``position_ids``, ``num_batches_tracked``).
      allow_missing: regexes of our keys that may be absent from the checkpoint; those keep
        their freshly initialised values (so the module is then built for real, not abstractly).
      source: a name for error messages (the folder).

    Returns:
      The module with every variable taken from ``tensors`` (float32 for params).

    Raises:
      CheckpointError: missing or unexpected tensors, or a shape mismatch, each named.
    """
    ignore_re = [re.compile(p) for p in ignore]
    missing_re = [re.compile(p) for p in allow_missing]
    renamed: dict[str, np.ndarray] = {}
    for k, v in tensors.items():
        new = rename(k) if rename is not None else k
        if new is None or any(r.fullmatch(k) or r.fullmatch(new) for r in ignore_re):
            continue
        renamed[new] = v

    if missing_re:
        module = factory()
    else:
        module = nnx.eval_shape(factory)
    graphdef, state = nnx.split(module)
    flat = list(nnx.to_flat_state(state))

    missing, new_flat, used = [], [], set()
    for path, var in flat:
        key = torch_key(path)
        cur = var.get_value()
        if key not in renamed:
            if any(r.fullmatch(key) for r in missing_re):
                new_flat.append((path, var))
            else:
                missing.append(key)
            continue
        value = to_flax_layout(key, str(path[-1]), renamed[key], tuple(cur.shape))
        used.add(key)
        new_flat.append((path, var.replace(jnp.asarray(value, dtype=cur.dtype))))
    unexpected = sorted(set(renamed) - used)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected tensor(s) in the checkpoint, e.g. {unexpected[:5]}"
            )
        raise CheckpointError(
            f"{source} does not match the model config: "
            + "; ".join(parts)
            + ". Is this the right checkpoint for this config?"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def state_dict_from_module(module: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse mapping: our module's variables as a PyTorch-layout state dict (for tests
    and for exporting)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module)):
        value = np.asarray(jax.device_get(var.get_value()))
        if path[-1] == "kernel":
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 2:
                value = value.T
        # Transposes are views; safetensors' numpy writer needs C-contiguous data.
        out[torch_key(path)] = np.ascontiguousarray(value)
    return out


def config_from_dict(
    cls,
    raw: Mapping,
    *,
    ignored: Iterable[str] = (),
    unsupported: Mapping[str, object] | None = None,
    renames: Mapping[str, str] | None = None,
    source: str = "config",
):
    """Build the frozen dataclass ``cls`` from a diffusers / transformers ``config.json``.

    Keys are sorted into: fields of ``cls`` (used); ``renames`` (a reference key that maps to
    a differently named field); ``unsupported`` (features we do not implement, accepted only at
    the given neutral value, e.g. ``{"class_embed_type": None}``); ``ignored`` (informational
    keys such as ``_name_or_path``; every key starting with ``_`` is ignored too). Anything
    else is an error naming the key, so a checkpoint with a feature we would silently drop is
    refused instead of giving wrong outputs.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    renames = dict(renames or {})
    unsupported = dict(unsupported or {})
    ignored = set(ignored)
    kwargs, unknown, bad = {}, [], []
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        name = renames.get(key, key)
        if name in fields:
            if isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        elif key in unsupported:
            ok = unsupported[key]
            ok_values = ok if isinstance(ok, (set, frozenset)) else {ok}
            value_key = tuple(value) if isinstance(value, list) else value
            if value_key not in ok_values:
                bad.append(f"{key}={value!r} (supported: {sorted(map(repr, ok_values))})")
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: unknown config field(s) {sorted(unknown)}; "
            f"{cls.__name__} does not know how to honour them"
        )
    if bad:
        raise CheckpointError(f"{source}: unsupported setting(s): {'; '.join(bad)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid {cls.__name__}: {e}") from e
