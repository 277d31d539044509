"""Random-access example sources: an image folder (+ label folder) and ArrayRecord shards.

Each source is a grain-compatible sequence: `len(source)` and `source[i]`, where `source[i]` is
`{"hr": uint8 [H, W, 3] RGB, "label": uint8 [H, W] (only with labels), "index": i}`, or `None`
when record i cannot be decoded. A `None` is dropped by the pipeline; every such record is
logged with its name and counted in `source.num_corrupt` (per process: each grain worker holds
its own copy of the source), so bad data is never skipped silently.

Both sources share one record format, so `prepare` copies folder records into shards byte for
byte: `<u32 header length><JSON header><image file bytes><label PNG bytes>`, with the header
`{"stem": str, "image": n_image_bytes, "label": n_label_bytes or null}`. Image bytes are the
original file (any format PIL reads); decoding is the same function for both sources.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import struct

import grain
import numpy as np
from PIL import Image, ImageOps

from segsr_jax import images as image_io
from segsr_jax.images import IMAGE_SUFFIXES

SHARD_SUFFIX = ".array_record"
_HEADER_LEN = struct.Struct("<I")

log = logging.getLogger(__name__)


class CorruptRecordError(ValueError):
    """A record whose image or label cannot be decoded, or whose label does not fit its image."""


def encode_record(stem: str, image_bytes: bytes, label_bytes: bytes | None = None) -> bytes:
    """Packs one example's file bytes into the shared record format."""
    header = json.dumps(
        {
            "stem": stem,
            "image": len(image_bytes),
            "label": None if label_bytes is None else len(label_bytes),
        }
    ).encode()
    return b"".join((_HEADER_LEN.pack(len(header)), header, image_bytes, label_bytes or b""))


def split_record(record: bytes) -> tuple[str, bytes, bytes | None]:
    """Inverse of `encode_record`: (stem, image bytes, label bytes or None)."""
    try:
        (n,) = _HEADER_LEN.unpack_from(record)
        header = json.loads(record[4 : 4 + n])
        start = 4 + n
        image = record[start : start + header["image"]]
        label = None
        if header["label"] is not None:
            label = record[start + header["image"] : start + header["image"] + header["label"]]
        if len(image) != header["image"] or (label is not None and len(label) != header["label"]):
            raise CorruptRecordError(f"record {header['stem']!r} is truncated")
        return header["stem"], image, label
    except (struct.error, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptRecordError(f"unreadable record header: {e}") from e


def decode_image(data: bytes) -> np.ndarray:
    """Decodes image file bytes to uint8 [H, W, 3] RGB, honouring EXIF orientation.

    Raises CorruptRecordError for unreadable or truncated files (PIL, unlike OpenCV, refuses a
    truncated JPEG instead of returning a half-grey image).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright image
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey: scale to 8 bits rather than clip at 255.
                arr = np.asarray(img, dtype=np.uint32) >> 8
                return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptRecordError(f"cannot decode image: {e}") from e


def decode_label(data: bytes) -> np.ndarray:
    """Decodes a label PNG (mode L or P: the pixel values are class ids) to uint8 [H, W]."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptRecordError(f"cannot decode label: {e}") from e
    if arr.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
        raise CorruptRecordError(f"label must be a single-channel class-id image, got mode {mode}")
    if arr.max(initial=0) > 255:
        raise CorruptRecordError(f"label has class ids above 255 (max {arr.max()})")
    return arr.astype(np.uint8)


def decode_example(record: bytes, index: int) -> dict:
    """Record bytes -> example dict; raises CorruptRecordError."""
    stem, image_bytes, label_bytes = split_record(record)
    example = {"hr": decode_image(image_bytes), "index": np.int64(index)}
    if label_bytes is not None:
        label = decode_label(label_bytes)
        if label.shape != example["hr"].shape[:2]:
            raise CorruptRecordError(
                f"{stem}: label {label.shape} does not match image {example['hr'].shape[:2]}"
            )
        example["label"] = label
    return example


class _CorruptCounter:
    """Shared by the sources: decode or log, count and return None."""

    num_corrupt: int = 0

    def _decode_or_skip(self, index: int, name: str, read) -> dict | None:
        try:
            return decode_example(read(), index)
        except (CorruptRecordError, OSError) as e:
            self.num_corrupt += 1
            log.warning(
                "skipping corrupt record %d (%s): %s [%d skipped so far by this process's %s]",
                index, name, e, self.num_corrupt, type(self).__name__,
            )  # fmt: skip
            return None


def list_images(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Image files under `directory` (recursively: :func:`segsr_jax.images.list_images`),
    keyed by relative path without suffix, the key a label PNG and a record are found by."""
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    found: dict[str, pathlib.Path] = {}
    for path in image_io.list_images(root, recursive=True):
        stem = path.relative_to(root).with_suffix("").as_posix()
        if stem in found:
            raise ValueError(f"two images share the stem {stem!r}: {found[stem].name}, {path.name}")
        found[stem] = path
    return found


class ImageFolderSource(_CorruptCounter):
    """Images in a folder tree, with optional label PNGs at the same relative stems.

    Args:
      images: folder of images (searched recursively, sorted by relative path).
      labels: folder of label PNGs, `<labels>/<stem>.png` for every image `<images>/<stem>.*`.
    """

    def __init__(self, images: str | os.PathLike, labels: str | os.PathLike | None = None):
        found = list_images(images)
        if not found:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")
        self.stems = tuple(found)
        self.image_paths = tuple(found.values())
        self.label_paths = None
        if labels is not None:
            self.label_paths = tuple(pathlib.Path(labels) / f"{stem}.png" for stem in self.stems)
            missing = [str(p) for p in self.label_paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(self.stems)} images have no label PNG, "
                    f"e.g. {missing[:3]}"
                )

    def __len__(self) -> int:
        return len(self.stems)

    def record(self, index: int) -> bytes:
        """Record bytes of example `index` (raises OSError if a file cannot be read)."""
        label = None if self.label_paths is None else self.label_paths[index].read_bytes()
        return encode_record(self.stems[index], self.image_paths[index].read_bytes(), label)

    def __getitem__(self, index: int) -> dict | None:
        return self._decode_or_skip(index, str(self.image_paths[index]), lambda: self.record(index))


class ArrayRecordSource(_CorruptCounter):
    """Examples stored by `python -m segsr_jax.data.prepare` as ArrayRecord shards.

    Reads the shard list from `manifest.json`, which `prepare` writes only once every shard is
    finished, so a half-written folder is refused instead of silently read in part.
    """

    def __init__(self, directory: str | os.PathLike):
        root = pathlib.Path(directory)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: run `python -m segsr_jax.data.prepare` to completion"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.paths = [str(root / name) for name in self.manifest["shards"]]
        self._records = grain.sources.ArrayRecordDataSource(self.paths)
        if len(self._records) != self.manifest["records"]:
            raise ValueError(
                f"{root}: shards hold {len(self._records)} records, manifest says "
                f"{self.manifest['records']}"
            )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict | None:
        return self._decode_or_skip(index, f"record {index}", lambda: self._records[index])
