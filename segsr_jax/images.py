"""Reading users' images robustly and writing results atomically.

Pixel conventions: files hold 8- or 16-bit images of any PIL mode; :func:`read_image`
returns uint8 RGB ``[H, W, 3]``; model inputs are float32 in ``[-1, 1]``.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Refuse decompression bombs: 16k x 16k is far beyond what anyone super-resolves.
MAX_PIXELS = 16384 * 16384
MIN_SIDE = 8


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""


def list_images(path: str | os.PathLike) -> list[Path]:
    """The image files under ``path`` (a file, or a folder searched non-recursively, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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


def to_unit_range(img_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 in ``[-1, 1]``."""
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
