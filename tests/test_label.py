"""`python -m segsr_jax.label`: sliding-window geometry, labels equal to transformers' argmax,
stitching, resumability, histogram and corrupt inputs."""

import json

import numpy as np
import pytest
from PIL import Image

from segsr_jax import label as L
from segsr_jax.tiles import owned_ranges, tile_starts
from tests.torch_reference import nhwc_to_nchw, perturb_, torch

tf = pytest.importorskip("transformers")

WINDOW, OVERLAP = 64, 16


@pytest.mark.parametrize("length", [10, 64, 65, 100, 150, 176, 333])
def test_tiles_cover_every_pixel_exactly_once_inside_their_window(length):
    starts = tile_starts(length, WINDOW, OVERLAP)
    ranges = owned_ranges(starts, length, WINDOW)
    assert ranges[0][0] == 0 and ranges[-1][1] == length
    for (lo, hi), (lo2, _) in zip(ranges, ranges[1:], strict=False):
        assert hi == lo2 and lo < hi
    for s, (lo, hi) in zip(starts, ranges, strict=True):
        assert s <= lo and hi <= s + WINDOW
        # At least overlap/2 context on every side that has image.
        assert lo == 0 or lo - s >= OVERLAP // 2
        assert hi == length or s + WINDOW - hi >= OVERLAP // 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=4,
    )  # fmt: skip
    cfg.id2label = {i: n for i, n in enumerate(["sky", "grass", "brick", "water"])}
    model = perturb_(tf.SegformerForSemanticSegmentation(cfg), seed=0).eval()
    folder = tmp_path_factory.mktemp("seg") / "segformer"
    model.save_pretrained(folder)
    return model, folder


def _reference_labels(model, image):
    """transformers: logits upsampled bilinearly to the image size, argmax."""
    pixels = (image.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        logits = model(pixel_values=nhwc_to_nchw(pixels[None].astype(np.float32))).logits
        up = torch.nn.functional.interpolate(
            logits, size=image.shape[:2], mode="bilinear", align_corners=False
        )
    return up.argmax(1)[0].numpy()


def test_label_folder_matches_reference_stitches_and_resumes(checkpoint, tmp_path):
    model, folder = checkpoint
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shapes = {"exact": (64, 64), "small": (40, 48), "sub/big": (150, 100)}
    arrays = {}
    for stem, (h, w) in shapes.items():
        arrays[stem] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arrays[stem]).save(images / f"{stem}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "labels"
    argv = ["--checkpoint", str(folder), "--images", str(images), "--output", str(out),
            "--window", str(WINDOW), "--overlap", str(OVERLAP), "--batch-size", "3"]  # fmt: skip
    assert L.main(argv) == 0

    labels = {stem: np.asarray(Image.open(out / f"{stem}.png")) for stem in shapes}
    for stem, (h, w) in shapes.items():
        assert labels[stem].shape == (h, w) and labels[stem].max() < 4
    # A window-sized image is one tile: the labels are transformers' labels.
    agree = (labels["exact"] == _reference_labels(model, arrays["exact"])).mean()
    assert agree > 0.995
    # A big image: each owned region equals the reference labels of its own tile.
    big = arrays["sub/big"]
    ys, xs = tile_starts(150, WINDOW, OVERLAP), tile_starts(100, WINDOW, OVERLAP)
    for y, (y0, y1) in zip(ys, owned_ranges(ys, 150, WINDOW), strict=True):
        for x, (x0, x1) in zip(xs, owned_ranges(xs, 100, WINDOW), strict=True):
            ref = _reference_labels(model, big[y : y + WINDOW, x : x + WINDOW])
            got = labels["sub/big"][y0:y1, x0:x1]
            assert (got == ref[y0 - y : y1 - y, x0 - x : x1 - x]).mean() > 0.995

    histogram = json.loads((out / "histogram.json").read_text())
    assert histogram["images"] == 3 and [c[0] for c in histogram["corrupt"]] == ["broken"]
    assert [c["name"] for c in histogram["classes"]] == ["sky", "grass", "brick", "water"]
    total = sum(np.bincount(lab.ravel(), minlength=4) for lab in labels.values())
    assert [c["pixels"] for c in histogram["classes"]] == total.tolist()

    # Resume: finished labels are not recomputed; a missing one is.
    stamps = {stem: (out / f"{stem}.png").stat().st_mtime_ns for stem in shapes}
    (out / "small.png").unlink()
    assert L.main(argv) == 0
    assert (out / "exact.png").stat().st_mtime_ns == stamps["exact"]
    assert (out / "sub/big.png").stat().st_mtime_ns == stamps["sub/big"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "small.png")), labels["small"])


def test_a_folder_that_is_no_segformer_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    argv = ["--checkpoint", str(tmp_path), "--images", str(tmp_path / "images")]
    assert L.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load a SegFormer") and len(err.strip().splitlines()) == 1
