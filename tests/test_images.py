"""Reading odd user images, atomic writes, colour maps."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from segsr_jax import images


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()[::8, ::8]  # 64x64 RGB uint8


def test_modes_are_converted_to_rgb(tmp_path, photo):
    gray = (photo.mean(-1)).astype(np.uint8)
    cases = {
        "rgb.png": Image.fromarray(photo),
        "gray.png": Image.fromarray(gray),
        "palette.png": Image.fromarray(photo).convert("P"),
        "16bit.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "photo.jpg": Image.fromarray(photo),
        "photo.webp": Image.fromarray(photo),
        "photo.tiff": Image.fromarray(photo),
        "photo.bmp": Image.fromarray(photo),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        arr = images.read_image(tmp_path / name)
        assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8, name
    np.testing.assert_array_equal(images.read_image(tmp_path / "16bit.png")[..., 0], gray)
    np.testing.assert_array_equal(images.read_image(tmp_path / "rgb.png"), photo)


def test_rgba_is_composited_on_white(tmp_path, photo):
    rgba = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    rgba[:32, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = images.read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(arr[:32], photo[:32])
    assert (arr[32:] == 255).all()


def test_exif_rotation_is_applied(tmp_path, photo):
    img = Image.fromarray(photo[:, :40])  # 64 high, 40 wide
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif)
    assert images.read_image(tmp_path / "r.jpg").shape == (40, 64, 3)


def test_bad_files_raise_image_error_naming_the_file(tmp_path, photo, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.fromarray(photo).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(raw[: len(raw) // 2])
    Image.fromarray(photo[:4, :4]).save(tmp_path / "tiny.png")
    for name, reason in [
        ("empty.png", "empty"),
        ("text.jpg", "not a readable image"),
        ("trunc.png", "cannot decode"),
        ("tiny.png", "too small"),
    ]:
        with pytest.raises(images.ImageError, match=reason) as err:
            images.read_image(tmp_path / name)
        assert name in str(err.value)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(images.ImageError, match="too large"):
        images.read_image(tmp_path / "full.png")


def test_write_png_is_atomic_and_leaves_no_temp(tmp_path, photo):
    images.write_png(tmp_path / "o" / "x.png", photo)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "x.png")), photo)
    with pytest.raises(TypeError):
        images.write_png(tmp_path / "o" / "bad.png", np.zeros((4, 4, 3), object))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.png"]
    assert (tmp_path / "o" / "x.png").stat().st_mode & 0o044  # readable by others (umask 022)


def test_palette_is_distinct_and_colorize_maps_labels():
    pal = images.palette(20)
    assert len({tuple(c) for c in pal}) == 20
    lab = np.array([[0, 1], [19, 255]])
    col = images.colorize(lab, 20)
    np.testing.assert_array_equal(col[0, 1], pal[1])
    np.testing.assert_array_equal(col[1, 1], [0, 0, 0])
    sheet = images.side_by_side(np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    assert sheet.shape == (8, 8 + 8 + 8, 3)
