"""Helpers for parity tests against the PyTorch reference models (diffusers / transformers).

Reference models are built from small random configs; every parameter and buffer is then
perturbed with seeded noise, so zero-initialised layers (ControlNet's zero convs, ...) are
non-zero and a wrong mapping cannot hide behind zeros.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def perturb_(model, seed: int = 0, scale: float = 0.05):
    """Add ``N(0, scale^2)`` noise to every float parameter and buffer, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype.is_floating_point:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    model.eval()
    return model


def nchw_to_nhwc(x) -> np.ndarray:
    """A torch ``[B, C, H, W]`` tensor (or array) -> numpy ``[B, H, W, C]``."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return x.transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: np.ndarray):
    """Numpy ``[B, H, W, C]`` -> torch float32 ``[B, C, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def assert_close_rel(ours, ref, tol: float = 1e-4, what: str = "output"):
    """``max |ours - ref| <= tol * max(1, max |ref|)``: the parity criterion of the issues
    (error relative to output scale)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol} * scale {scale:.3g}"
