"""Image geometry of a sampling run, decided once: output size, working size, padding, crop.

::

    out_hw, work_hw = working_size(lq.shape[:2], upscale=4, min_side=128)
    batch = model_input([lq, ...], work_hw, latent_factor)   # float32 [B, H', W', 3]
    sr = crop(batch_out, work_hw)                             # back to [B, *work_hw, ...]

The model sees every LQ bicubically resized to the working size (``upscale`` x the input,
after SeeSR's small-input rule), in ``[-1, 1]``, padded at the bottom and right to a multiple
of the VAE's factor; the caller resizes the result to ``out_hw``. numpy only (host side).
"""

from __future__ import annotations

import numpy as np

from segsr_jax import images


def working_size(
    lq_hw: tuple[int, int], upscale: float, min_side: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(out_hw, work_hw)`` for an LQ image of ``lq_hw``: the output is exactly ``upscale``
    x the input; the model works at ``work_hw``, which is the same unless the LQ's short side
    is below ``min_side`` (SeeSR: 128), when the LQ is first enlarged so that it is."""
    h, w = lq_hw
    out_hw = (max(1, round(h * upscale)), max(1, round(w * upscale)))
    grow = max(1.0, min_side / min(h, w))
    return out_hw, (round(h * grow * upscale), round(w * grow * upscale))


def pad_to_multiple(batch: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``batch`` ``[B, H, W, C]`` at the bottom and right so H and W are multiples of
    ``multiple`` (the VAE needs multiples of its factor): mirrored (``reflect``, no flat
    borders) where the image is larger than the padding, else by repeating the edge."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = batch.shape[1:3]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return batch
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(batch, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


def crop(x, size_hw: tuple[int, int]):
    """The top-left ``size_hw`` of ``x`` ``[B, H', W', ...]``: undoes :func:`pad_to_multiple`
    (at a smaller scale too, e.g. latent-resolution labels with ``ceil(size / f)``)."""
    h, w = size_hw
    if h > x.shape[1] or w > x.shape[2]:
        raise ValueError(f"cannot crop {tuple(x.shape[1:3])} to the larger {tuple(size_hw)}")
    return x[:, :h, :w]


def model_input(lqs: list[np.ndarray], work_hw: tuple[int, int], multiple: int) -> np.ndarray:
    """uint8 LQ images ``[h, w, 3]`` (any sizes) -> the sampler's float32 input
    ``[B, H', W', 3]`` in ``[-1, 1]``: each bicubically resized to ``work_hw``, then padded to
    a multiple of ``multiple``."""
    batch = np.stack([images.to_unit_range(images.resize(x, work_hw)) for x in lqs])
    return pad_to_multiple(batch, multiple)
