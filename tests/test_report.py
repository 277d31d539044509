"""The comparison page (:mod:`segsr_jax.report`): what ``sample --report`` embeds (the SR and
bicubic pixels exactly, the checkpoint's class names), self-containment, the overlay and the
JPEG fallback. The page in a real browser: tests/test_report_browser.py."""

import base64
import io
import re

import numpy as np
from PIL import Image

from segsr_jax import images, report
from segsr_jax.sample import main as sample_main
from segsr_jax.sample import parse_args, tiny_paths

URI = re.compile(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"')


def assert_self_contained(page: str) -> None:
    """Every src/href is a data: URI or an in-page anchor; no http(s) anywhere; the CSP that
    forbids loading anything else is there."""
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs[:5]
    assert "http://" not in page and "https://" not in page
    assert f'content="{report.CSP}"' in page and "default-src 'none'" in report.CSP


def decoded(page: str) -> list[np.ndarray]:
    """The page's images, decoded, in document order."""
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        for _, data in URI.findall(page)
    ]


def test_sample_report_embeds_outputs_and_class_names(tmp_path):
    ckpt, demo = tiny_paths()
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--input", str(demo / "scene0.png"), "--output", str(out)]
    argv += ["--steps", "2"]
    assert sample_main([*argv, "--cache-dir", "", "--report"]) == 0
    page = (out / "index.html").read_text()
    assert_self_contained(page)

    sr = images.read_image(out / "scene0_sr.png")
    lq = images.read_image(demo / "scene0.png")
    labels = np.asarray(Image.open(out / "scene0_seg_labels.png"))
    names = report.class_names_of_checkpoint(ckpt)
    assert len(names) == 8 and names[0] == "brick"
    after, before, seg = decoded(page)  # slider: the "after" image first, then "before"
    np.testing.assert_array_equal(after, sr)
    np.testing.assert_array_equal(before, images.resize(lq, sr.shape[:2]))
    np.testing.assert_array_equal(seg, report.overlay(sr, labels, len(names)))
    legend = re.findall(r'<li><span class="sw"[^>]*></span>([^<(]+) \(', page)
    assert sorted(legend) == sorted(names[k] for k in np.unique(labels))
    assert page.count('<figure class="cmp"') == 1 and 'type="range"' in page

    # Without --report there is no page (the flag is off by default).
    assert not parse_args(argv).report


def test_overlay_blends_class_colours_and_leaves_ignored_pixels():
    image = np.full((4, 6, 3), 100, np.uint8)
    labels = np.array([[0] * 6, [1] * 6, [2] * 6, [255] * 6], np.uint8)
    out = report.overlay(image, labels, 3)
    pal = images.palette(3).astype(np.float32)
    for k in range(3):
        np.testing.assert_array_equal(
            out[k], np.round(0.5 * 100 + 0.5 * pal[k]).astype(np.uint8)[None].repeat(6, 0)
        )
    np.testing.assert_array_equal(out[3], image[3])


def test_large_noisy_images_are_sent_as_jpeg_small_ones_as_png(tmp_path):
    small = np.zeros((32, 32, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    assert report.data_uri(small).startswith("data:image/png;base64,")
    assert report.data_uri(noise).startswith("data:image/jpeg;base64,")  # its PNG is ~3 MB
    item = report.ReportImage("x", {"a": small, "b": small + 9}, [("a", "b")])
    path = report.write_report(tmp_path / "p" / "index.html", [item], title="t <&>")
    page = path.read_text()
    assert_self_contained(page)
    assert "<title>t &lt;&amp;&gt;</title>" in page
    assert [img[0, 0, 0] for img in decoded(page)] == [9, 0]
    assert not list(path.parent.glob("*.tmp"))
