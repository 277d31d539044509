"""`python -m segsr_jax.evaluate` and `segsr_jax.metrics`: PSNR/SSIM against scikit-image, the
Y conversion, mIoU by hand, NIQE's basic properties, the CLI end to end (pairing, CSV/JSON,
errors), pyiqa's optional metrics, and semantic mIoU through a real SegFormer."""

import csv
import io
import json
import math
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageFilter
from scipy.io import savemat
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from segsr_jax import evaluation as E
from segsr_jax import images
from segsr_jax import metrics as M
from segsr_jax.evaluate import main as evaluate_main
from segsr_jax.label import make_segment_fn
from segsr_jax.models.seg_encoder import SegFormer, SegFormerConfig
from segsr_jax.weights import fetch

CROP = 4
REAL_CACHE = fetch.cache_dir()  # read before the fixture below hides it


@pytest.fixture(autouse=True)
def no_fetched_weights(tmp_path, monkeypatch):
    """The command sees an empty weight cache (no LPIPS-VGG column, no Real-ESRGAN), so its
    columns do not depend on what this machine has fetched; :func:`fetched` undoes it."""
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "no_weights"))


@pytest.fixture
def fetched(monkeypatch):
    """``fetched(name)``: the weights folder of ``name`` in the real cache (fetched on demand,
    skipped when the registry cannot be reached); the command sees that cache too."""
    from tests.weights.test_fetch import fetched_model

    monkeypatch.setenv(fetch.CACHE_ENV, str(REAL_CACHE))
    return fetched_model


def _degraded(img: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2)))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=20)
    return np.asarray(Image.open(buf).convert("RGB"))


# --- metrics -------------------------------------------------------------------------------


def test_y_channel_is_matlab_rgb2ycbcr():
    px = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]], np.uint8)
    y = M.rgb_to_y(np.repeat(px, 8, axis=0))
    np.testing.assert_allclose(
        y[0], [235.0, 16.0, 16 + 65.481, 16 + 219 * 128 / 255], rtol=0, atol=1e-12
    )
    assert y.dtype == np.float64  # not rounded: BasicSR's float path


@pytest.mark.parametrize("y_channel", [True, False], ids=["y", "rgb"])
@pytest.mark.parametrize("kind", ["noise", "blur", "jpeg"])
@pytest.mark.parametrize("source", ["astronaut", "coffee"])
def test_psnr_and_ssim_match_scikit_image(source, kind, y_channel):
    gt = getattr(data, source)()
    pred = _degraded(gt, kind)
    crop = (slice(CROP, -CROP), slice(CROP, -CROP))
    a, b = (M.rgb_to_y(x[crop]) if y_channel else x[crop].astype(np.float64) for x in (gt, pred))
    want_psnr = peak_signal_noise_ratio(a, b, data_range=255)
    # skimage filters the whole image (reflect padding) and then drops the (win - 1) / 2 = 5
    # border rows and columns from the mean: the same "valid" windows as BasicSR, so the two
    # agree to rounding. channel_axis averages per-channel SSIM, as BasicSR does for RGB.
    want_ssim = structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=None if y_channel else -1,
    )
    got_psnr = M.psnr(pred, gt, CROP, y_channel)
    got_ssim = M.ssim(pred, gt, CROP, y_channel)
    assert abs(got_psnr - want_psnr) < 1e-9
    assert abs(got_ssim - want_ssim) < 1e-9
    assert 15 < got_psnr < 40 and 0.3 < got_ssim < 0.99  # a real degradation, not a no-op


def test_psnr_of_a_constant_offset_is_exact():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 240, (40, 50, 3), dtype=np.uint8)
    pred = gt + np.uint8(10)
    assert M.psnr(pred, gt, 0, y_channel=False) == pytest.approx(
        10 * math.log10(255**2 / 100), abs=1e-12
    )
    # Y moves by 10 * (65.481 + 128.553 + 24.966) / 255 = 10 * 219 / 255.
    assert M.psnr(pred, gt, 0, y_channel=True) == pytest.approx(
        20 * math.log10(255 / (2190 / 255)), abs=1e-9
    )
    assert M.psnr(gt, gt, 0) == math.inf
    assert M.ssim(gt, gt, 0) == pytest.approx(1.0, abs=1e-12)


def test_border_crop_removes_crop_pixels_from_every_side():
    gt = data.astronaut()[:64, :80]
    pred = gt.copy()
    for sl in (np.s_[:CROP], np.s_[-CROP:], np.s_[:, :CROP], np.s_[:, -CROP:]):
        pred[sl] = 255 - pred[sl]
    assert M.psnr(pred, gt, CROP) == math.inf
    assert M.ssim(pred, gt, CROP) == pytest.approx(1.0, abs=1e-12)
    assert M.psnr(pred, gt, CROP - 1) < 30
    with pytest.raises(ValueError, match="crop_border 32"):
        M.psnr(pred, gt, 32)
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(pred[:18], gt[:18], CROP)
    with pytest.raises(ValueError, match="sizes differ"):
        M.psnr(pred[:60], gt, CROP)


def test_confusion_and_miou_by_hand():
    true = np.array([[0, 0, 1, 255], [1, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 4], [1, 1, 2, 3]])
    conf = M.confusion(pred, true, num_classes=6)
    want = np.zeros((6, 6), np.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (1, 1), (2, 2), (2, 3)]:
        want[t, p] += 1  # the ignored pixel (predicted 4) is not counted
    np.testing.assert_array_equal(conf, want)
    value, iou = M.miou(conf)
    # 0: 1/(1+1); 1: 3/(3+1); 2: 1/(1+1); 3: predicted only -> 0; 4 (ignored pixel only) and
    # 5 (nowhere): union 0 -> NaN, left out of the mean.
    np.testing.assert_array_equal(iou[:4], [0.5, 0.75, 0.5, 0.0])
    assert np.isnan(iou[4]) and np.isnan(iou[5])
    assert value == pytest.approx((0.5 + 0.75 + 0.5 + 0.0) / 4, abs=1e-15)

    # A dataset's mIoU comes from the summed matrix, not the mean of per-image mIoUs.
    other = M.confusion(np.array([[2, 2]]), np.array([[2, 2]]), 6)
    assert M.miou(other)[0] == 1.0
    assert M.miou(conf + other)[0] == pytest.approx((0.5 + 0.75 + 3 / 4 + 0.0) / 4)
    assert np.isnan(M.miou(np.zeros((3, 3)))[0])
    with pytest.raises(ValueError, match=r"true labels \[7\]"):
        M.confusion(pred, np.where(true == 2, 7, true), 6)
    with pytest.raises(ValueError, match="differ in size"):
        M.confusion(pred[:, :3], true, 6)


@pytest.fixture(scope="module")
def niqe_params():
    """A pristine model fitted on two clean photographs (no official parameters offline)."""
    return M.fit_niqe_params([data.astronaut(), data.coffee()])


def test_niqe_is_deterministic_finite_and_worse_for_noise(niqe_params):
    assert niqe_params["mu_prisparam"].shape == (36,)
    cov = niqe_params["cov_prisparam"]
    assert cov.shape == (36, 36) and np.allclose(cov, cov.T)
    clean = data.chelsea()
    noisy = _degraded(clean, "noise")
    heavy = np.clip(clean + np.random.default_rng(1).normal(0, 40, clean.shape), 0, 255)
    scores = [M.niqe(x, **niqe_params) for x in (clean, noisy, heavy.astype(np.uint8))]
    assert all(np.isfinite(scores)) and scores[0] < scores[1] < scores[2]
    assert M.niqe(clean, **niqe_params) == scores[0]
    with pytest.raises(ValueError, match="at least 96x96"):
        M.niqe(clean[:100], **niqe_params, crop_border=4)


def test_niqe_params_load_from_npz_and_mat(niqe_params, tmp_path):
    np.savez(tmp_path / "p.npz", **niqe_params)
    savemat(
        tmp_path / "p.mat",
        {
            "mu_prisparam": niqe_params["mu_prisparam"][None],
            "cov_prisparam": niqe_params["cov_prisparam"],
        },
    )
    for name in ("p.npz", "p.mat"):
        loaded = E.load_niqe_params(tmp_path / name)
        for key, value in niqe_params.items():
            np.testing.assert_array_equal(loaded[key], value)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(36))
    with pytest.raises(E.EvaluationError, match="no 'mu_prisparam'"):
        E.load_niqe_params(tmp_path / "bad.npz")


# --- the command line ----------------------------------------------------------------------


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folders(tmp_path):
    """pred/ as the sampler writes it (3 images, one without ground truth), gt/, labels/."""
    photo = data.astronaut()
    gts = {"scene0": photo[:128, :128], "scene1": photo[200:328, 100:228]}
    preds = {
        "scene0": _degraded(gts["scene0"], "noise"),
        "scene1": _degraded(gts["scene1"], "blur"),
        "scene2": photo[:128, 300:428],
    }
    labels = {
        stem: (np.arange(128)[:, None] // 32 + np.zeros(128, int)).astype(np.uint8) for stem in gts
    }  # four horizontal bands: classes 0..3
    labels["scene1"][:10] = 255
    seg = {stem: lab.copy() for stem, lab in labels.items()}
    seg["scene0"][:32, :64] = 1  # half of class 0 predicted as 1
    seg["scene1"][:10] = 2
    for stem, img in preds.items():
        _save(tmp_path / "pred" / f"{stem}_sr.png", img)
        _save(tmp_path / "pred" / f"{stem}_seg.png", np.zeros((128, 128, 3), np.uint8))
        _save(tmp_path / "pred" / f"{stem}_sheet.png", np.zeros((128, 300, 3), np.uint8))
    for stem in gts:
        _save(tmp_path / "gt" / f"{stem}_hr.png", gts[stem])
        _save(tmp_path / "labels" / f"{stem}_label.png", labels[stem])
        _save(tmp_path / "pred" / f"{stem}_seg_labels.png", seg[stem])
    return tmp_path, gts, preds


def test_cli_scores_pairs_and_writes_csv_and_json(folders, niqe_params, capsys, monkeypatch):
    root, gts, preds = folders
    monkeypatch.setenv("SEGSR_JAX_CACHE_DIR", str(root / "empty_cache"))  # no LPIPS weights
    np.savez(root / "niqe.npz", **niqe_params)
    argv = [
        "--pred",
        str(root / "pred"),
        "--gt",
        str(root / "gt"),
        "--labels",
        str(root / "labels"),
        "--seg-pred",
        str(root / "pred"),
        "--out",
        str(root / "out"),
        "--niqe-params",
        str(root / "niqe.npz"),
        "--no-pyiqa",
        "--per-image",
    ]
    assert evaluate_main(argv) == 0
    out, err = capsys.readouterr()
    assert "scene2" in err and "without ground truth" in err
    assert "PSNR" in out and "NIQE" in out and "seg mIoU" in out and "scene1" in out
    assert "pyiqa metrics skipped" in out
    # No LPIPS weights: one line says how to fetch them; the other metrics are there.
    (lpips_note,) = [line for line in out.splitlines() if "LPIPS" in line]
    assert "python -m segsr_jax.weights.fetch lpips" in lpips_note

    with open(root / "out" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["scene0", "scene1", "mean"]
    assert {r["method"] for r in rows} == {"pred"}
    assert list(rows[0]) == ["method", "name", "psnr", "ssim", "niqe", "seg_miou"]
    psnrs = [M.psnr(preds[s], gts[s], 4) for s in ("scene0", "scene1")]
    for row, want in zip(rows, psnrs, strict=False):
        assert float(row["psnr"]) == pytest.approx(want, abs=1e-12)
        assert float(row["niqe"]) == pytest.approx(
            M.niqe(preds[row["name"]], **niqe_params, crop_border=4), abs=1e-12
        )
    assert float(rows[2]["psnr"]) == pytest.approx(np.mean(psnrs), abs=1e-12)
    # scene0: half of class 0 (2048 px) predicted 1: IoU 2048/4096 and 4096/6144; classes 2
    # and 3 exact. scene1's ignored rows (predicted 2) do not count: perfect.
    assert float(rows[0]["seg_miou"]) == pytest.approx((1 / 2 + 2 / 3 + 1 + 1) / 4)
    assert float(rows[1]["seg_miou"]) == 1.0

    doc = json.loads((root / "out" / "metrics.json").read_text())
    assert doc["counts"]["images"] == 2 and doc["counts"]["missing_gt"] == ["scene2"]
    assert doc["settings"]["crop_border"] == 4 and doc["settings"]["y_channel"] is True
    assert doc["mean"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-12)
    # Dataset mIoU from the summed confusion: class 0 has 2048 + 22 * 128 hits and 2048
    # misses, class 1 2 * 4096 hits and 2048 false alarms.
    ious = [c["iou"] for c in doc["per_class_iou"]["seg_miou"]]
    want = [(2048 + 2816) / (4096 + 2816), 8192 / 10240, 1.0, 1.0]
    assert ious == pytest.approx(want) and len(ious) == 4
    assert doc["mean"]["seg_miou"] == pytest.approx(np.mean(want))
    assert [r["name"] for r in doc["per_image"]] == ["scene0", "scene1"]

    # --out defaults to --pred; --rgb scores RGB.
    assert (
        evaluate_main(
            [
                "--pred",
                str(root / "pred"),
                "--gt",
                str(root / "gt"),
                "--rgb",
                "--no-pyiqa",
                "--crop-border",
                "0",
            ]
        )
        == 0
    )
    doc = json.loads((root / "pred" / "metrics.json").read_text())
    assert doc["settings"]["y_channel"] is False and "niqe" not in doc["mean"]
    assert doc["per_image"][0]["psnr"] == pytest.approx(
        M.psnr(preds["scene0"], gts["scene0"], 0, y_channel=False), abs=1e-12
    )
    assert any("NIQE omitted" in n for n in doc["notes"])
    assert not list((root / "pred").glob("*.tmp"))


def test_cli_errors_name_the_files(folders, capsys):
    root, gts, _ = folders
    empty = root / "empty"
    empty.mkdir()
    assert evaluate_main(["--pred", str(empty), "--gt", str(root / "gt"), "--no-pyiqa"]) == 2
    assert "no prediction" in capsys.readouterr().err

    _save(root / "gt" / "scene1_hr.png", gts["scene1"][:120])
    assert (
        evaluate_main(["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--no-pyiqa"]) == 2
    )
    err = capsys.readouterr().err
    assert "scene1_sr.png is 128x128" in err and "scene1_hr.png is 128x120" in err

    _save(root / "gt" / "scene1_hr.png", gts["scene1"])
    _save(root / "labels" / "scene0_label.png", np.zeros((64, 128), np.uint8))
    assert (
        evaluate_main(
            [
                "--pred",
                str(root / "pred"),
                "--gt",
                str(root / "gt"),
                "--labels",
                str(root / "labels"),
                "--seg-pred",
                str(root / "pred"),
                "--no-pyiqa",
            ]
        )
        == 2
    )
    assert "scene0_label.png is 128x64 but the image scene0 is 128x128" in capsys.readouterr().err

    (root / "pred" / "scene0_sr.png").write_bytes(b"\x89PNG not really")
    assert (
        evaluate_main(["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--no-pyiqa"]) == 2
    )
    assert "scene0_sr.png" in capsys.readouterr().err
    assert not (root / "pred" / "metrics.json").exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not numpy", b"PK\x03\x04 broken zip", "npy", b"MATLAB 5.0 nonsense"],
    ids=["empty", "text", "zip", "npy", "mat"],
)
def test_cli_unreadable_niqe_params_is_a_one_line_error(folders, content, capsys):
    root, _, _ = folders
    path = root / ("p.mat" if content == b"MATLAB 5.0 nonsense" else "p.npz")
    if content == "npy":
        np.save(root / "p.npy", np.zeros(36))
        (root / "p.npy").rename(path)
    else:
        path.write_bytes(content)
    assert (
        evaluate_main(
            [
                "--pred",
                str(root / "pred"),
                "--gt",
                str(root / "gt"),
                "--no-pyiqa",
                "--niqe-params",
                str(path),
            ]
        )
        == 2
    )
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --niqe-params {path}: ")


def test_labels_matching_no_prediction_are_reported(folders):
    root, _, _ = folders
    other = root / "other_labels"
    for stem in ("x", "y"):
        _save(other / f"{stem}_label.png", np.zeros((128, 128), np.uint8))
    warnings = []
    ev = E.evaluate_folders(
        root / "pred",
        root / "gt",
        labels=other,
        seg_pred=root / "pred",
        use_pyiqa=False,
        progress=False,
        warn=warnings.append,
    )
    assert all(np.isnan(r["seg_miou"]) for r in ev.rows)
    (warning,) = [w for w in warnings if "matches a prediction" in w]
    assert f"no label map in {other} matches a prediction (2 label files)" in warning
    assert "scene0_sr.png <-> scene0_label.png" in warning
    # Labels that match: no such warning. Labels with nothing to score them: said so.
    warnings.clear()
    E.evaluate_folders(
        root / "pred",
        root / "gt",
        labels=root / "labels",
        seg_pred=root / "pred",
        use_pyiqa=False,
        progress=False,
        warn=warnings.append,
    )
    label_warnings = lambda: [w for w in warnings if "label map" in w or "--labels" in w]
    assert not label_warnings()
    E.evaluate_folders(
        root / "pred",
        root / "gt",
        labels=root / "labels",
        use_pyiqa=False,
        progress=False,
        warn=warnings.append,
    )
    assert label_warnings() == [
        f"warning: --labels {root / 'labels'} is used only with "
        "--segmenter or --seg-pred; no mIoU without them"
    ]


def test_pairing_prefers_sr_and_ignores_sampler_outputs(folders):
    root, _, _ = folders
    preds = E.find_predictions(root / "pred")
    assert {s: p.name for s, p in preds.items()} == {
        "scene0": "scene0_sr.png",
        "scene1": "scene1_sr.png",
        "scene2": "scene2_sr.png",
    }
    _save(root / "plain" / "a.png", np.zeros((16, 16, 3), np.uint8))
    _save(root / "plain" / "a.jpg", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(E.EvaluationError, match="a.jpg and a.png|a.png and a.jpg"):
        E.find_predictions(root / "plain")
    assert E.split_suffix("x_seg_labels") == ("x", "_seg_labels")
    assert E.split_suffix("_sr") == ("_sr", "")


def test_pyiqa_metrics_are_used_when_importable_and_failures_noted(folders, monkeypatch):
    """pyiqa is not installed here: a stand-in module checks the calls and failure handling."""
    root, _, _ = folders
    calls = []

    def create_metric(name):
        if name == "lpips":
            return lambda pred, ref: calls.append((pred, ref)) or 0.25
        if name == "musiq":  # fails on one image: NaN there, the column stays
            return lambda pred: 50.0 if "scene0" in pred else 1 / 0
        raise RuntimeError("weights not downloadable")

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    ev = E.evaluate_folders(
        root / "pred", root / "gt", crop_border=4, progress=False, warn=lambda msg: None
    )
    assert ev.columns == ["psnr", "ssim", "lpips", "musiq"]
    assert ev.mean["lpips"] == 0.25 and ev.mean["musiq"] == 50.0
    assert ev.rows[0]["musiq"] == 50.0 and math.isnan(ev.rows[1]["musiq"])
    (note,) = [n for n in ev.notes if n.startswith("musiq failed")]
    assert "on 1 of 2 image(s)" in note and "scene1_sr.png (ZeroDivisionError" in note
    assert [p.split("/")[-1] for p, _ in calls] == ["scene0_sr.png", "scene1_sr.png"]
    assert [r.split("/")[-1] for _, r in calls] == ["scene0_hr.png", "scene1_hr.png"]
    assert sum("omitted" in n for n in ev.notes) == 4  # NIQE, dists, maniqa, clipiqa
    assert any(n.startswith("dists omitted") and "not downloadable" in n for n in ev.notes)


# --- semantic fidelity ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def segformer():
    cfg = SegFormerConfig(
        num_encoder_blocks=2,
        depths=(1, 1),
        sr_ratios=(2, 1),
        hidden_sizes=(16, 32),
        patch_sizes=(7, 3),
        strides=(4, 2),
        num_attention_heads=(1, 2),
        mlp_ratios=(2, 2),
        decoder_hidden_size=32,
        num_labels=5,
        id2label=("a", "b", "c", "d", "e"),
    )
    # An RBG key: threefry initialisers compile one program per parameter shape (slow here).
    return SegFormer(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def test_semantic_miou_is_one_against_own_labels_and_drops_when_perturbed(segformer, tmp_path):
    photo = data.astronaut()
    shots = {"x": photo[:100, :76], "y": photo[300:400, 200:276]}  # not multiples of 32
    own = {s: E.semantic_labels(segformer, img) for s, img in shots.items()}
    for lab in own.values():
        assert lab.shape == (100, 76) and lab.dtype == np.uint8 and lab.max() < 5
    assert len(np.unique(np.concatenate([lab.ravel() for lab in own.values()]))) > 1
    graphdef, _ = nnx.split(segformer)
    assert make_segment_fn(graphdef)._cache_size() == 1  # one compile per image shape

    for s, img in shots.items():
        _save(tmp_path / "pred" / f"{s}_sr.png", img)
        _save(tmp_path / "gt" / f"{s}.png", img)
        _save(tmp_path / "labels" / f"{s}.png", own[s])
    ev = E.evaluate_folders(
        tmp_path / "pred",
        tmp_path / "gt",
        labels=tmp_path / "labels",
        segmenter=segformer,
        use_pyiqa=False,
        progress=False,
    )
    assert ev.mean["semantic_miou"] == 1.0 and all(r["semantic_miou"] == 1.0 for r in ev.rows)
    assert [c["name"] for c in ev.per_class_iou["semantic_miou"]] == list("abcde")

    wrong = own["x"].copy()
    wrong[:50] = (wrong[:50] + 1) % 5
    _save(tmp_path / "labels" / "x.png", wrong)
    ev = E.evaluate_folders(
        tmp_path / "pred",
        tmp_path / "gt",
        labels=tmp_path / "labels",
        segmenter=segformer,
        use_pyiqa=False,
        progress=False,
    )
    assert ev.rows[0]["semantic_miou"] < 0.8 and ev.rows[1]["semantic_miou"] == 1.0
    assert ev.mean["semantic_miou"] < 1.0

    (tmp_path / "labels" / "y.png").unlink()
    warnings = []
    ev = E.evaluate_folders(
        tmp_path / "pred",
        tmp_path / "gt",
        labels=tmp_path / "labels",
        segmenter=segformer,
        use_pyiqa=False,
        progress=False,
        warn=warnings.append,
    )
    assert np.isnan(ev.rows[1]["semantic_miou"]) and ev.counts["missing_labels"] == ["y"]
    assert ev.mean["semantic_miou"] == ev.rows[0]["semantic_miou"] and "y" in warnings[0]

    _save(tmp_path / "labels" / "x.png", np.full((100, 76), 7, np.uint8))
    with pytest.raises(E.EvaluationError, match=r"x.png.*true labels \[7\]"):
        E.evaluate_folders(
            tmp_path / "pred",
            tmp_path / "gt",
            labels=tmp_path / "labels",
            segmenter=segformer,
            use_pyiqa=False,
            progress=False,
        )


def test_segmenter_from_a_segsr_checkpoint(tmp_path):
    """The bundled tiny checkpoint (an Orbax folder): its SegFormer scores the demo images."""
    from segsr_jax.sample import tiny_paths

    ckpt, _ = tiny_paths()
    gt = ckpt.parent / "demo_gt"
    (tmp_path / "pred").mkdir()
    for path in gt.glob("*_hr.png"):
        (tmp_path / "pred" / path.name.replace("_hr", "_sr")).write_bytes(path.read_bytes())
    assert (
        evaluate_main(
            [
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(gt),
                "--labels",
                str(gt),
                "--segmenter",
                str(ckpt),
                "--no-pyiqa",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["counts"]["images"] == 3 and doc["mean"]["psnr"] is None  # identical: inf
    assert doc["settings"]["segmenter"] == str(ckpt)
    assert len(doc["per_class_iou"]["semantic_miou"]) == 8
    assert 0.3 < doc["mean"]["semantic_miou"] < 1.0  # a trained segmenter on its own domain


def test_segmenter_from_a_transformers_folder_matches_its_labels(tmp_path):
    tf = pytest.importorskip("transformers")
    from tests.torch_reference import nhwc_to_nchw, perturb_, torch

    torch.manual_seed(0)
    cfg = tf.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 2],
        sr_ratios=[2, 1],
        patch_sizes=[7, 3],
        strides=[4, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=4,
    )
    # Perturbed enough that the argmax is not one class everywhere.
    model = perturb_(tf.SegformerForSemanticSegmentation(cfg), seed=0, scale=0.2).eval()
    model.save_pretrained(tmp_path / "segformer")
    seg = E.load_segmenter(tmp_path / "segformer")
    assert isinstance(seg, SegFormer) and seg.config.num_labels == 4

    image = data.coffee()[:90, :130]
    pixels = (image / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        logits = model(pixel_values=nhwc_to_nchw(pixels[None])).logits
        logits = torch.nn.functional.interpolate(
            logits, size=image.shape[:2], mode="bilinear", align_corners=False
        )
    want = logits.argmax(1)[0].numpy()
    assert len(np.unique(want)) > 1
    assert (E.semantic_labels(seg, image) == want).mean() > 0.995  # float ties at most


def test_psnr_ssim_agree_with_pyiqa_ycbcr_settings_when_installed():
    """pyiqa (optional) with ``test_y_channel=True, color_space='ycbcr'``: the same PSNR; its
    SSIM rounds Y to integers first (ours, like BasicSR, keeps Y float), so compare SSIM on
    rounded Y. Measured here against pyiqa 0.1.16's psnr/ssim archs: PSNR within 1.2e-4 dB,
    SSIM on rounded Y within 1e-6 (pyiqa's default color_space 'yiq' is another convention)."""
    pyiqa = pytest.importorskip("pyiqa")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a = data.astronaut()[:200, :240]
    b = np.clip(a + rng.normal(0, 15, a.shape), 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(x.copy()).permute(2, 0, 1)[None].double() / 255
    kw = dict(test_y_channel=True, color_space="ycbcr", crop_border=4, as_loss=False)
    p = pyiqa.create_metric("psnr", device="cpu", **kw)(t(a), t(b)).item()
    s = pyiqa.create_metric("ssim", device="cpu", **kw)(t(a), t(b)).item()
    assert abs(M.psnr(a, b, 4) - p) < 1e-3
    c = 4
    ya, yb = np.round(M.rgb_to_y(a)), np.round(M.rgb_to_y(b))
    assert abs(M._ssim_channel(ya[c:-c, c:-c], yb[c:-c, c:-c]) - s) < 1e-5


# --- LPIPS-VGG, baselines and the page -------------------------------------------------------


def _lq_folder(root, gts) -> dict:
    """x4 bicubic-downscaled ground truth as LQ inputs (``lq/<stem>.png``)."""
    lqs = {stem: images.resize(gt, (32, 32)) for stem, gt in gts.items()}
    for stem, lq in lqs.items():
        _save(root / "lq" / f"{stem}.png", lq)
    return lqs


def _csv_rows(path) -> dict:
    with open(path, newline="") as f:
        return {(r["method"], r["name"]): r for r in csv.DictReader(f)}


def test_lpips_column_is_segsr_jax_lpips_of_each_pair(folders, fetched, capsys):
    from segsr_jax.lpips import load_lpips

    metric = load_lpips(fetched("lpips"))
    root, gts, preds = folders
    base = ["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--no-pyiqa"]
    assert evaluate_main([*base, "--out", str(root / "out")]) == 0
    assert "LPIPS-VGG" in capsys.readouterr().out
    rows = _csv_rows(root / "out" / "metrics.csv")
    want = {
        s: float(
            metric(images.to_unit_range(preds[s])[None], images.to_unit_range(gts[s])[None])[0]
        )
        for s in gts
    }
    assert 0.05 < min(want.values())  # degraded images: a real distance
    for s, w in want.items():
        assert float(rows["pred", s]["lpips_vgg"]) == pytest.approx(w, abs=1e-6)
    assert float(rows["pred", "mean"]["lpips_vgg"]) == pytest.approx(np.mean(list(want.values())))
    assert evaluate_main([*base, "--out", str(root / "off"), "--no-lpips"]) == 0
    assert "lpips_vgg" not in next(iter(_csv_rows(root / "off" / "metrics.csv").values()))


def test_baselines_are_scored_as_extra_rows_and_shown_in_the_page(folders, fetched, capsys):
    from segsr_jax.models.rrdbnet import load_rrdbnet

    fetched("lpips")
    esrgan = load_rrdbnet(fetched("realesrgan"))
    root, gts, preds = folders
    lqs = _lq_folder(root, gts)
    argv = ["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--lq", str(root / "lq")]
    argv += ["--baseline", "bicubic", "--baseline", "realesrgan", "--baseline", "bicubic"]
    argv += ["--no-pyiqa", "--out", str(root / "out"), "--html", "--per-image"]
    assert evaluate_main(argv) == 0
    out = capsys.readouterr().out
    assert "mean (bicubic, 2)" in out and "mean (realesrgan, 2)" in out
    rows = _csv_rows(root / "out" / "metrics.csv")
    assert [m for m, n in rows if n == "mean"] == ["pred", "bicubic", "realesrgan"]

    # bicubic: PIL's bicubic of the LQ to the ground truth's size, scored like a prediction.
    for s, gt in gts.items():
        up = images.resize(lqs[s], gt.shape[:2])
        written = images.read_image(root / "out" / "baselines" / "bicubic" / f"{s}_sr.png")
        np.testing.assert_array_equal(written, up)
        assert float(rows["bicubic", s]["psnr"]) == pytest.approx(M.psnr(up, gt, CROP), abs=1e-12)
    # realesrgan: the x4plus network on the LQ (one tile at this size).
    for s, gt in gts.items():
        x = (lqs[s].astype(np.float32) / 255)[None]
        want = np.round(np.clip(np.asarray(nnx.jit(lambda m, v: m(v))(esrgan, x))[0], 0, 1) * 255)
        written = images.read_image(root / "out" / "baselines" / "realesrgan" / f"{s}_sr.png")
        diff = np.abs(written.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        assert float(rows["realesrgan", s]["psnr"]) == pytest.approx(M.psnr(written, gt, CROP))
        assert 0 < float(rows["realesrgan", s]["lpips_vgg"]) < 1
    doc = json.loads((root / "out" / "metrics.json").read_text())
    assert sorted(doc["baselines"]) == ["bicubic", "realesrgan"]
    assert doc["baselines"]["bicubic"]["mean"]["psnr"] == pytest.approx(
        float(rows["bicubic", "mean"]["psnr"])
    )

    page = (root / "out" / "index.html").read_text()
    from tests.test_report import assert_self_contained, decoded

    assert_self_contained(page)
    # Per image: bicubic | pred, realesrgan | pred, pred | ground truth; then the overlay of
    # the sampler's labels (the folder's _seg_labels.png).
    assert page.count('<figure class="cmp"') == 2 * 3 and page.count('class="seg"') == 2
    shown = decoded(page)
    np.testing.assert_array_equal(shown[0], preds["scene0"])
    np.testing.assert_array_equal(shown[1], images.resize(lqs["scene0"], (128, 128)))
    np.testing.assert_array_equal(shown[4], gts["scene0"])  # "after" of pred | ground truth
    assert f"{float(rows['realesrgan', 'scene0']['psnr']):.4f}" in page


def test_baseline_errors_are_one_line(folders, capsys):
    root, gts, _ = folders
    base = ["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--no-pyiqa"]
    with pytest.raises(SystemExit):
        evaluate_main([*base, "--baseline", "bicubic"])
    assert "--baseline needs --lq" in capsys.readouterr().err
    _lq_folder(root, gts)
    argv = [*base, "--lq", str(root / "lq"), "--baseline", "realesrgan", "--out", str(root / "o")]
    assert evaluate_main(argv) == 2  # the autouse fixture hides the fetched weights
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert "python -m segsr_jax.weights.fetch realesrgan" in line
    (root / "lq" / "scene1.png").unlink()
    assert evaluate_main([*argv[:-3], "bicubic", "--out", str(root / "o")]) == 2
    assert "no LQ image for scene1" in capsys.readouterr().err
