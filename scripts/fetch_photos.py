"""Fetch the training photos from pinned Debian packages, with a licence manifest.

    python scripts/fetch_photos.py                 # -> ~/.cache/segsr_jax/photos
    python scripts/fetch_photos.py --out DIR

These are the real-photo TRAINING photos (``scripts/prepare_photos.py`` turns them into
training data). They are not for evaluation: the held-out evaluation photos are a separate
set, from PyPI wheels (``scripts/fetch_heldout.py``), and are never used to train, tune or pick.

Four Debian 12 (bookworm) packages are downloaded with ``apt-get download NAME=VERSION`` (run
``apt-get update`` once first), checked against sha256 hashes pinned here, and unpacked with
``dpkg-deb -x`` (which only extracts files: no maintainer script runs). The photographic
JPEGs listed below (chosen by eye: no renders, drawings, logos, screenshots, stereo
duplicates or synthetic degradations) are copied to ``<out>/<package>/`` and described in
``<out>/manifest.json``: file, package and version, path in the package, sha256, size in
pixels, and the licence and copyright found for it:

* the stanza of the package's machine-readable ``debian/copyright`` (DEP-5) that covers the
  file (the last matching ``Files:`` pattern, as DEP-5 specifies);
* for Plasma wallpapers also the wallpaper's own ``metadata.json`` (licence and authors).

The OpenCV sample images fall under that package's catch-all stanza; several are classic test
images whose original provenance the Debian file does not record (noted in the manifest).
Any failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

CACHE_ENV = "SEGSR_JAX_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str
    # installed-path prefix -> path prefix in the source tree (what debian/copyright names)
    prefix: tuple[str, str]
    files: tuple[str, ...]  # installed paths below ``prefix[0]`` (globs allowed)
    note: str = ""


_PLASMA = (
    "BytheWater",
    "ColdRipple",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
)

PACKAGES = (
    Package(
        "plasma-workspace-wallpapers",
        "4:5.27.5-2",
        "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b",
        ("usr/share/wallpapers/", ""),
        tuple(f"{w}/contents/images/*.jpg" for w in _PLASMA),
        note="largest resolution of each wallpaper kept (the others are downscales)",
    ),
    Package(
        "mate-backgrounds",
        "1.26.0-1",
        "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
        ("usr/share/backgrounds/mate/", ""),
        tuple(
            f"nature/{n}.jpg"
            for n in (
                "Aqua",
                "Blinds",
                "Dune",
                "FreshFlower",
                "Garden",
                "GreenMeadow",
                "LadyBird",
                "RainDrops",
                "Storm",
                "TwoWings",
                "Wood",
                "YellowFlower",
            )
        ),
    ),
    Package(
        "lomiri-wallpapers-16.04",
        "20.04.0-2",
        "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
        ("usr/share/backgrounds/", "16.04/"),
        tuple(
            f"{n}.jpg"
            for n in (
                "Bridge_by_Sander_Klootwijk",
                "Dragonfly_by_Bolly",
                "Picture_0B_by_freespace",
                "Picture_1A_by_freespace",
                "Wine_by_Jakkub_Mede",
                "aitzgorri_by_Aitzol_Berasategi",
                "free_by_Peter_Nerlich",
                "friends_by_Aitzol_Berasategi",
                "life_by_Aitzol_Berasategi",
                "picosdeeuropa_by_Aitzol_Berasategi",
                "seeding_by_Clements_Engelhardt",
                "sunset_by_Aitzol_Berasategi",
            )
        ),
    ),
    Package(
        "opencv-doc",
        "4.6.0+dfsg-12",
        "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
        ("usr/share/doc/opencv-doc/examples/data/", "samples/data/"),
        tuple(
            f"{n}.jpg"
            for n in (
                "aero1",
                "aero3",
                "aloeL",
                "apple",
                "baboon",
                "board",
                "building",
                "butterfly",
                "ela_original",
                "fruits",
                "home",
                "leuvenA",
                "orange",
                "squirrel_cls",
                "stuff",
            )
        ),
        note="OpenCV sample image; debian/copyright's catch-all stanza; the original "
        "source of classic test images (e.g. baboon) is not recorded there",
    ),
)


class PhotoError(RuntimeError):
    """A one-line failure."""


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = next(
            (ln for ln in lines if ln.startswith(("E:", "dpkg-deb:"))),
            lines[-1] if lines else "no output",
        )
        raise PhotoError(f"{what} failed: {detail.strip()}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_dep5(text: str) -> list[dict[str, str]]:
    """The stanzas of a machine-readable ``debian/copyright`` as field dicts (continuation
    lines joined with newlines; field names lower-cased)."""
    stanzas, cur, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def copyright_for(stanzas: list[dict[str, str]], source_path: str) -> dict[str, str]:
    """The last ``Files:`` stanza whose patterns match ``source_path`` (DEP-5: ``*`` matches
    across ``/``), as ``{"files", "copyright", "license"}``; the licence's first line only."""
    found = None
    for st in stanzas:
        if "files" not in st:
            continue
        if any(fnmatch.fnmatchcase(source_path, pat) for pat in st["files"].split()):
            found = st
    if found is None:
        raise PhotoError(f"debian/copyright has no stanza covering {source_path}")
    return {
        "files": found["files"].split()[0] if found["files"] else "",
        "copyright": " / ".join(s.strip() for s in found.get("copyright", "").splitlines()),
        "license": found.get("license", "").splitlines()[0] if found.get("license") else "",
    }


def _pixels(path: Path) -> int:
    m = re.fullmatch(r"(\d+)x(\d+)", path.stem)
    return int(m.group(1)) * int(m.group(2)) if m else 0


def _plasma_metadata(image: Path) -> dict[str, str]:
    meta = image.parents[2] / "metadata.json"
    if not meta.is_file():
        return {}
    plugin = json.loads(meta.read_text()).get("KPlugin", {})
    authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
    return {
        "wallpaper": plugin.get("Name", ""),
        "license": plugin.get("License", ""),
        "authors": authors,
    }


def select(pkg: Package, root: Path) -> list[Path]:
    """The installed files of ``pkg`` under ``root`` that we keep (largest per Plasma
    wallpaper); every listed entry must match at least one file."""
    base = root / pkg.prefix[0]
    chosen = []
    for pattern in pkg.files:
        hits = sorted(base.glob(pattern))
        if not hits:
            raise PhotoError(f"{pkg.name}: nothing matches {pkg.prefix[0]}{pattern}")
        if pkg.name == "plasma-workspace-wallpapers":
            hits = [max(hits, key=lambda p: (_pixels(p), p.stat().st_size))]
        chosen += hits
    return chosen


def fetch_photos(out: Path, workdir: Path) -> list[dict]:
    entries = []
    for pkg in PACKAGES:
        spec = f"{pkg.name}={pkg.version}"
        _run(["apt-get", "download", spec], workdir, f"apt-get download {spec}")
        debs = [p for p in workdir.glob(f"{pkg.name}_*.deb")]
        if len(debs) != 1:
            raise PhotoError(f"apt-get download {spec} left {len(debs)} .deb files")
        got = _sha256(debs[0])
        if got != pkg.sha256:
            raise PhotoError(f"sha256 mismatch for {debs[0].name}: got {got}, pinned {pkg.sha256}")
        root = workdir / pkg.name
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], workdir, f"dpkg-deb -x {debs[0].name}")
        copyright_file = root / "usr/share/doc" / pkg.name / "copyright"
        stanzas = parse_dep5(copyright_file.read_text(encoding="utf-8", errors="replace"))
        dest = out / pkg.name
        dest.mkdir(parents=True, exist_ok=True)
        for src in select(pkg, root):
            rel = src.relative_to(root / pkg.prefix[0]).as_posix()
            name = rel.replace("/contents/images/", "_").replace("/", "_")
            target = dest / name
            shutil.copyfile(src, target)
            with Image.open(target) as im:
                width, height = im.size
                mode = im.mode
            entry = {
                "file": f"{pkg.name}/{name}",
                "package": pkg.name,
                "version": pkg.version,
                "package_path": "/" + src.relative_to(root).as_posix(),
                "sha256": _sha256(target),
                "width": width,
                "height": height,
                "mode": mode,
                "debian_copyright": copyright_for(stanzas, pkg.prefix[1] + rel),
            }
            if pkg.name == "plasma-workspace-wallpapers":
                entry["wallpaper_metadata"] = _plasma_metadata(src)
            if pkg.note:
                entry["note"] = pkg.note
            entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "segsr_jax") / "photos"
    parser.add_argument("--out", type=Path, default=default, help=f"output folder ({default})")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="segsr_photos_") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user writes the download here when it can
            entries = fetch_photos(args.out, Path(tmp))
    except (PhotoError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = {
        "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256} for p in PACKAGES],
        "photos": entries,
    }
    (args.out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    )
    print(f"{len(entries)} photos and manifest.json in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
