"""Reading users' images robustly and writing results atomically.

Pixel conventions: files hold 8- or 16-bit images of any PIL mode; :func:`read_image`
returns uint8 RGB ``[H, W, 3]``; model inputs are float32 in ``[-1, 1]``.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The files written per restored image: SR, segmentation colours, raw labels, sheet.
OUTPUT_SUFFIXES = ("_sr.png", "_seg.png", "_seg_labels.png", "_sheet.png")
# Refuse decompression bombs: 16k x 16k is far beyond what anyone super-resolves.
MAX_PIXELS = 16384 * 16384
MIN_SIDE = 8


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""


def list_images(path: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files (by suffix, :data:`IMAGE_SUFFIXES`) under ``path``, sorted: a file is
    itself; a folder is searched non-recursively unless ``recursive`` (a dataset tree)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    found = path.rglob("*") if recursive else path.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255)
        return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as viewers show it, instead of dropping alpha
        # (which would reveal arbitrary colours under transparent pixels).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    arr = np.asarray(img.convert("RGB"))
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB ``[H, W, 3]``, EXIF rotation applied.

    Raises:
      ImageError: empty, truncated, unreadable, too large (decompression bomb) or too small
        (< 8 px) files, with the file name and the reason in the message.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                arr = _to_uint8_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: too large ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{path}: not a readable image") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL's truncated/corrupt-data errors
        raise ImageError(f"{path}: cannot decode ({e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ImageError(
            f"{path}: too small ({arr.shape[1]}x{arr.shape[0]} px; need at least "
            f"{MIN_SIDE} px per side)"
        )
    return arr


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically: to a temporary name in the same folder, then ``os.replace``,
    so a killed run never leaves a partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as PNG atomically (:func:`write_atomic`)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def to_unit_range(img_u8):
    """uint8 ``[..., 3]`` -> float32 in ``[-1, 1]``: the model's pixel range, for numpy arrays
    on the host and JAX arrays in a jitted step alike."""
    return img_u8.astype(np.float32) / 127.5 - 1.0


def from_unit_range(x: np.ndarray) -> np.ndarray:
    """float in ``[-1, 1]`` -> uint8 (rounded, clipped)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def resize(img_u8: np.ndarray, size_hw: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    """Resize a uint8 image to ``size_hw = (H, W)`` with PIL."""
    h, w = size_hw
    if img_u8.shape[:2] == (h, w):
        return img_u8
    return np.asarray(Image.fromarray(img_u8).resize((w, h), resample))


def palette(num_classes: int) -> np.ndarray:
    """A fixed, distinguishable colour per class: ``[num_classes, 3]`` uint8 (golden-angle
    hues, alternating lightness)."""
    import colorsys

    cols = []
    for k in range(num_classes):
        h = (k * 0.618033988749895) % 1.0
        light = 0.45 if k % 2 else 0.6
        cols.append([int(255 * c) for c in colorsys.hls_to_rgb(h, light, 0.75)])
    return np.asarray(cols, np.uint8)


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map ``[H, W]`` -> colour image ``[H, W, 3]``; out-of-range labels are black."""
    pal = np.concatenate([palette(num_classes), np.zeros((1, 3), np.uint8)])
    return pal[np.where((labels >= 0) & (labels < num_classes), labels, num_classes)]


def side_by_side(*images: np.ndarray, gap: int = 8) -> np.ndarray:
    """Images of equal height side by side with white gaps: ``[H, sum W + gaps, 3]``."""
    h = max(i.shape[0] for i in images)
    parts = []
    for n, img in enumerate(images):
        if img.shape[0] != h:
            img = resize(img, (h, round(img.shape[1] * h / img.shape[0])), Image.NEAREST)
        parts.append(img)
        if n < len(images) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def output_names(files: list[Path]) -> dict[Path, str]:
    """The output name of each input: its stem, or ``stem_ext`` when another input has the
    same stem (compared case-insensitively, as some file systems do), so none overwrites
    another's outputs."""
    counts = collections.Counter(f.stem.casefold() for f in files)
    return {
        f: f"{f.stem}_{f.suffix.lstrip('.')}" if counts[f.stem.casefold()] > 1 else f.stem
        for f in files
    }


def outputs_of(out_dir: Path, name: str) -> list[Path]:
    """The files written for the input whose output name (:func:`output_names`) is ``name``."""
    return [out_dir / f"{name}{s}" for s in OUTPUT_SUFFIXES]


def write_outputs(
    paths: list[Path],
    lq: np.ndarray,
    out_hw: tuple[int, int],
    sr: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
) -> None:
    """Write the four files of one restored image to ``paths`` (:func:`outputs_of`), each
    atomically, the sheet last: the SR image resized to ``out_hw``, the segmentation
    ``labels`` (any resolution) upsampled to it in colour and raw, and LQ | SR | colours."""
    sr = resize(sr, out_hw)
    labels_hr = resize(labels.astype(np.uint8), out_hw, resample=Image.NEAREST)
    seg = colorize(labels_hr, num_classes)
    lq_big = resize(lq, out_hw, resample=Image.NEAREST)
    sr_p, seg_p, lab_p, sheet_p = paths
    write_png(sr_p, sr)
    write_png(seg_p, seg)
    write_png(lab_p, labels_hr)
    write_png(sheet_p, side_by_side(lq_big, sr, seg))
