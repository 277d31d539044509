"""``python -m segsr_jax.sample`` end to end on a tiny random checkpoint."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from segsr_jax import sample
from tests.diffusion.test_sampling import perturb
from tests.tiny_segsr import save_checkpoint, tiny_model

SAMPLING = {"sampler": "ddim", "steps": 2, "guidance": 2.0}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    return save_checkpoint(path, perturb(tiny_model(0), seed=1), SAMPLING)


@pytest.fixture
def inputs(tmp_path):
    """A folder mixing good images of several modes (all 24x32) and broken files."""
    d = tmp_path / "in"
    d.mkdir()
    photo = data.astronaut()[::16, ::16][:24]           # 24 x 32 RGB
    Image.fromarray(photo).save(d / "rgb.png")
    Image.fromarray(photo.mean(-1).astype(np.uint8)).save(d / "gray.jpg")
    rgba = np.dstack([photo, np.full(photo.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.webp")
    (d / "empty.png").write_bytes(b"")
    raw = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(raw[:60])
    (d / "notes.bmp").write_text("hello")
    Image.fromarray(photo[:3, :3]).save(d / "tiny.png")
    return d


def _args(ckpt, inputs, out, tmp_path, *extra):
    return ["--checkpoint", str(ckpt), "--input", str(inputs), "--output", str(out),
            "--upscale", "1", "--min-side", "16", "--cache-dir", str(tmp_path / "xla"), *extra]


def test_folder_with_good_and_bad_files(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = sample.main(_args(ckpt, inputs, out, tmp_path, "--batch-size", "2"))
    err = capsys.readouterr().err
    assert rc == 1
    for bad in ("empty.png", "truncated.png", "notes.bmp", "tiny.png"):
        assert bad in err
    assert err.count("error:") == 4
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{s}{suf}" for s in ("rgb", "gray", "rgba")
                             for suf in sample.OUTPUT_SUFFIXES)   # nothing partial, no temps
    sr = np.asarray(Image.open(out / "rgb_sr.png"))
    assert sr.shape == (24, 32, 3)
    labels = np.asarray(Image.open(out / "rgb_seg_labels.png"))
    assert labels.shape == (24, 32) and labels.max() < 4
    sheet = np.asarray(Image.open(out / "rgb_sheet.png"))
    assert sheet.shape[0] == 24 and sheet.shape[1] > 3 * 32

    # The compiled sampler went to the persistent cache, for the next process to reuse.
    assert any(p.is_file() for p in (tmp_path / "xla").rglob("*"))

    # A rerun skips what is done and leaves the files untouched.
    stamp = os.stat(out / "rgb_sr.png").st_mtime_ns
    good = tmp_path / "good"
    good.mkdir()
    for n in ("rgb.png", "gray.jpg", "rgba.webp"):
        (good / n).write_bytes((inputs / n).read_bytes())
    rc = sample.main(_args(ckpt, good, out, tmp_path))
    assert rc == 0
    assert "skipping 3 image(s)" in capsys.readouterr().out
    assert os.stat(out / "rgb_sr.png").st_mtime_ns == stamp


def test_upscale_and_seed_determinism(ckpt, inputs, tmp_path):
    one = tmp_path / "one.png"
    one.write_bytes((inputs / "rgb.png").read_bytes())
    for out in ("a", "b"):
        assert sample.main(_args(ckpt, one, tmp_path / out, tmp_path, "--upscale", "2",
                                 "--tile", "48", "--tile-overlap", "16")) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "one_sr.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "one_sr.png"))
    assert a.shape == (48, 64, 3)
    np.testing.assert_array_equal(a, b)


def test_checkpoint_errors(ckpt, inputs, tmp_path, capsys):
    rc = sample.main(_args(tmp_path / "missing", inputs / "rgb.png", tmp_path / "o", tmp_path))
    assert rc == 2 and "cannot load checkpoint" in capsys.readouterr().err
    # A checkpoint whose config names a field this code does not know.
    cfg_file = ckpt / "0" / "config" / "metadata"
    original = cfg_file.read_text()
    try:
        cfg = json.loads(original)
        cfg["model"]["unet"]["frobnicate"] = 3
        cfg_file.write_text(json.dumps(cfg))
        rc = sample.main(_args(ckpt, inputs / "rgb.png", tmp_path / "o", tmp_path))
        assert rc == 2 and "frobnicate" in capsys.readouterr().err
    finally:
        cfg_file.write_text(original)


def test_small_inputs_are_enlarged_first_and_resized_back():
    lq = np.zeros((24, 32, 3), np.uint8)
    job = sample.plan_job(sample.Path("x.png"), lq, upscale=4, min_side=128)
    assert job.out_hw == (96, 128)                   # exactly upscale x the input
    assert job.work_hw == (512, 683)                 # short side 128 before the x4
    assert sample.plan_job(sample.Path("x.png"), lq, 2, 16).work_hw == (48, 64)


def test_cli_defaults_are_the_library_defaults():
    from segsr_jax.inference import SampleOptions

    assert sample.DEFAULT_PROMPT == SampleOptions().prompt
    assert sample.DEFAULT_NEGATIVE == SampleOptions().negative_prompt


def test_bundled_default_runs_and_leaves_the_package_untouched(tmp_path):
    ckpt, demo = sample.bundled_paths()
    before = sorted(p for p in ckpt.parent.rglob("*"))
    rc = sample.main(["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "x")])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    stems = sorted(p.stem for p in demo.glob("*.png"))
    assert names == sorted(f"{s}{suf}" for s in stems for suf in sample.OUTPUT_SUFFIXES)
    sr = np.asarray(Image.open(tmp_path / "out" / f"{stems[0]}_sr.png"))
    lq = np.asarray(Image.open(demo / f"{stems[0]}.png"))
    assert sr.shape == (4 * lq.shape[0], 4 * lq.shape[1], 3)
    assert sr.std() > 5  # an image, not a constant
    assert sorted(p for p in ckpt.parent.rglob("*")) == before


def test_seg_prior_flag_switches_the_segmentation_guidance(ckpt, tmp_path, capsys):
    """``--seg-prior none`` is SRDM alone: with a trained (perturbed) bridge its SR image
    differs from full SegSR's (a run is otherwise bitwise reproducible, see
    test_upscale_and_seed_determinism); an unknown value is refused by argparse."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(data.astronaut()[::16, ::16][:24]).save(d / "a.png")
    out = {}
    for prior in ("diffusion", "none"):
        o = tmp_path / prior
        assert sample.main(_args(ckpt, d, o, tmp_path, "--seg-prior", prior)) == 0
        assert f"seg prior {prior}" in capsys.readouterr().out
        out[prior] = np.asarray(Image.open(o / "a_sr.png"), np.float32)
    assert not np.array_equal(out["diffusion"], out["none"])
    with pytest.raises(SystemExit):
        sample.parse_args(["--seg-prior", "oracle"])


def test_restorer_returns_label_trajectories(ckpt):
    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(ckpt)
    lq = data.astronaut()[::16, ::16][:24]
    opts = restorer.options(steps=3, seg_prior="diffusion")
    (sr, labels, traj), = restorer.restore_batch([lq], (24, 32), opts, record_labels=True)[0]
    f = restorer.config.latent_factor
    assert sr.shape == (24, 32, 3) and traj.shape == (3, 24 // f, 32 // f)
    np.testing.assert_array_equal(traj[-1], labels)


def test_bf16_restorer_holds_weights_in_bf16(ckpt, monkeypatch):
    """A bfloat16 Restorer keeps its conv / dense weights in bfloat16 (half the memory) and
    gives the result of the float32-parameter model computing in bfloat16."""
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax.inference import Restorer
    from segsr_jax.models import layers

    restorer = Restorer.from_checkpoint(ckpt, dtype="bfloat16")
    model = nnx.merge(restorer.graphdef, restorer.state)
    assert model.unet.conv_in.kernel[...].dtype == jnp.bfloat16
    assert model.vae.decoder.conv_out.kernel[...].dtype == jnp.bfloat16
    assert model.unet.conv_norm_out.scale[...].dtype == jnp.float32   # norms stay float32
    lq = data.astronaut()[::16, ::16][:24]
    opts = restorer.options(steps=2)
    (sr, labels), = restorer.restore_batch([lq], (24, 32), opts)[0]

    monkeypatch.setattr(layers, "inference_weights", lambda m: m)
    per_call = Restorer.from_checkpoint(ckpt, dtype="bfloat16")
    assert nnx.merge(per_call.graphdef, per_call.state).unet.conv_in.kernel[...].dtype == \
        jnp.float32
    (sr_ref, labels_ref), = per_call.restore_batch([lq], (24, 32), opts)[0]
    np.testing.assert_array_equal(sr, sr_ref)
    np.testing.assert_array_equal(labels, labels_ref)
