"""Reading the checkpoint folders users have: ``config.json`` plus weight files.

Weights are read from safetensors first; a ``.bin`` file is read only through
``torch.load(weights_only=True)`` (never unpickled otherwise). Sharded checkpoints
(``*.safetensors.index.json``) and variant files (``*.fp16.safetensors``) are understood.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used, with a message saying why."""


# Weight file stems in the order they are looked for.
DIFFUSERS_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_config(folder: str | os.PathLike) -> dict:
    """Read ``folder/config.json`` into a dict, with a clear error if it is missing or bad."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return cfg


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight files of one checkpoint in ``folder`` (several if sharded)."""
    suffix = f".{variant}" if variant else ""
    for stem in DIFFUSERS_STEMS:
        for ext in (".safetensors", ".bin"):
            index = folder / f"{stem}{suffix}{ext}.index.json"
            if index.is_file():
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f).get("weight_map", {})
                files = sorted({folder / name for name in weight_map.values()})
                missing = [p.name for p in files if not p.is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists missing shard(s): {missing}")
                return files
            single = folder / f"{stem}{suffix}{ext}"
            if single.is_file():
                return [single]
    return []


def find_weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """Locate weight files, safetensors before ``.bin``; ``variant`` e.g. ``"fp16"``.

    Without a variant, a folder holding only variant files (``*.fp16.safetensors``) is used.
    """
    folder = Path(folder)
    files = _weight_files(folder, variant)
    if not files and variant is None:
        for cand in ("fp16", "bf16", "fp32"):
            files = _weight_files(folder, cand)
            if files:
                break
    if not files:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"no weights in {folder}: expected one of "
            f"{', '.join(s + '.safetensors' for s in DIFFUSERS_STEMS)} (or .bin); found {present}"
        )
    return files


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types; name the file
        if "bfloat16" in str(e) or "BF16" in str(e):
            return _read_safetensors_bf16(path)
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return out


def _read_safetensors_bf16(path: Path) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: read through ml_dtypes by hand."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "I64": np.int64,
        "I32": np.int32,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(data[lo:hi], dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch .bin file; reading it needs torch (pip install torch), "
            "or convert the checkpoint to safetensors"
        ) from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler refuses anything but tensors: say so
        raise CheckpointError(f"cannot read {path} safely (weights_only=True): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):
            v = v.detach()
            if v.dtype == torch.bfloat16:
                v = v.float()
            out[k] = v.numpy()
    return out


def read_tensors(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in ``folder`` as numpy arrays, keyed by PyTorch name."""
    tensors: dict[str, np.ndarray] = {}
    for path in find_weight_files(folder, variant):
        part = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path)
        tensors.update(part)
    return tensors


def resolve_component(path: str | os.PathLike, subfolder: str) -> Path:
    """``path`` itself if it holds a ``config.json``, else ``path/subfolder`` (a whole diffusers
    pipeline folder such as ``stable-diffusion-2-base/`` with ``unet/``, ``vae/`` ...)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / subfolder / "config.json").is_file():
        return path / subfolder
    if not path.exists():
        raise CheckpointError(f"checkpoint path not found: {path}")
    raise CheckpointError(f"{path} has neither config.json nor {subfolder}/config.json")
