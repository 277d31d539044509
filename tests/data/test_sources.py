"""Image-folder and ArrayRecord sources: decoding, label pairing, corrupt files skipped and
counted (never silently), the record format."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from segsr_jax.data import sources as S


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array, quality=95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_folder(root, n=5, size=(24, 32), corrupt=(), mismatched=(), labels=True, seed=0):
    """n images (PNG, nested dirs for odd i) + label PNGs; returns {stem: (image, label)}."""
    rng = np.random.default_rng(seed)
    images, label_dir = root / "images", root / "labels"
    truth = {}
    for i in range(n):
        stem = f"sub/img{i:02d}" if i % 2 else f"img{i:02d}"
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        label = rng.integers(0, 7, size, dtype=np.uint8)
        (images / stem).parent.mkdir(parents=True, exist_ok=True)
        data = _png(image)
        if i in corrupt:
            data = data[: len(data) // 2]  # truncated file
        (images / f"{stem}.png").write_bytes(data)
        if labels:
            (label_dir / stem).parent.mkdir(parents=True, exist_ok=True)
            lab = label[:-1] if i in mismatched else label
            (label_dir / f"{stem}.png").write_bytes(_png(lab))
        truth[stem] = (image, label)
    return images, (label_dir if labels else None), truth


def test_folder_source_pairs_images_and_labels_by_stem(tmp_path):
    images, labels, truth = make_folder(tmp_path)
    source = S.ImageFolderSource(images, labels)
    assert len(source) == 5 and list(source.stems) == sorted(truth)
    for i, stem in enumerate(source.stems):
        ex = source[i]
        np.testing.assert_array_equal(ex["hr"], truth[stem][0])
        np.testing.assert_array_equal(ex["label"], truth[stem][1])
        assert ex["index"] == i and ex["hr"].dtype == np.uint8 and ex["label"].dtype == np.uint8
    assert source.num_corrupt == 0


def test_folder_source_without_labels_and_other_formats(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a.jpg").write_bytes(_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    gray16 = (rng.integers(0, 65536, (16, 16))).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(
        tmp_path / "c.png"
    )
    (tmp_path / "notes.txt").write_text("not an image")
    source = S.ImageFolderSource(tmp_path)
    assert source.stems == ("a", "b", "c")
    for i in range(3):
        ex = source[i]
        assert ex["hr"].shape == (16, 16, 3) and "label" not in ex
    np.testing.assert_array_equal(source[1]["hr"][..., 0], (gray16 >> 8).astype(np.uint8))


def test_corrupt_and_mismatched_records_are_skipped_counted_and_logged(tmp_path, caplog):
    images, labels, _ = make_folder(tmp_path, n=6, corrupt=(1,), mismatched=(4,))
    source = S.ImageFolderSource(images, labels)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        got = [source[i] for i in range(len(source))]
    skipped = [stem for stem, g in zip(source.stems, got, strict=True) if g is None]
    assert skipped == ["img04", "sub/img01"]  # sorted stems: the mismatched label, the truncation
    assert source.num_corrupt == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "img04.png" in messages[0] and "does not match" in messages[0]
    assert "sub/img01.png" in messages[1] and "truncated" in messages[1]


def test_missing_labels_and_empty_folders_are_clear_errors(tmp_path):
    images, labels, _ = make_folder(tmp_path, n=3)
    (labels / "img02.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 images have no label"):
        S.ImageFolderSource(images, labels)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        S.ImageFolderSource(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        S.ImageFolderSource(tmp_path / "missing")


def test_duplicate_stems_are_refused(tmp_path):
    img = _png(np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "x.png").write_bytes(img)
    (tmp_path / "x.jpg").write_bytes(_jpeg(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(ValueError, match="share the stem"):
        S.ImageFolderSource(tmp_path)


def test_record_round_trip_and_truncation():
    record = S.encode_record("a/b", b"IMAGE", b"LBL")
    assert S.split_record(record) == ("a/b", b"IMAGE", b"LBL")
    assert S.split_record(S.encode_record("c", b"X")) == ("c", b"X", None)
    with pytest.raises(S.CorruptRecordError, match="truncated"):
        S.split_record(record[:-1])
    with pytest.raises(S.CorruptRecordError, match="header"):
        S.split_record(b"\x05\x00")


def test_label_must_be_single_channel_class_ids():
    with pytest.raises(S.CorruptRecordError, match="single-channel"):
        S.decode_label(_png(np.zeros((4, 4, 3), np.uint8)))
    palette = Image.fromarray(np.array([[0, 3], [5, 1]], np.uint8), "P")
    palette.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    np.testing.assert_array_equal(S.decode_label(buf.getvalue()), [[0, 3], [5, 1]])


def test_array_record_source_requires_a_finished_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        S.ArrayRecordSource(tmp_path)


def test_exif_orientation_is_applied():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :5] = 255  # a white band on the left
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", exif=exif.tobytes())
    decoded = S.decode_image(buf.getvalue())
    assert decoded.shape == (20, 10, 3)
    assert decoded[:5].mean() > 200 and decoded[-5:].mean() < 50  # the band is now on top
