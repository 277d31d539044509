"""The training loop in-process (``segsr_jax.train.train_and_evaluate``) on the tiny model:
overfitting a few images, the NaN/Inf guard, and a checkpoint the sampler loads."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from segsr_jax import checkpoint, train
from segsr_jax.inference import Restorer
from segsr_jax.training import checkpointer
from segsr_jax.training import step as step_lib
from tests.training.tiny_train_config import get_config, random_params

OVERFIT_STEPS = 150
OVERFIT_FACTOR = 3.0


def _records(workdir, event="train"):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, init_checkpoint):
    """Stage seg (SegDM + SegFormer trained) on 2 fixed 32 px scenes, 150 steps."""
    workdir = tmp_path_factory.mktemp("overfit")
    c = get_config("seg")
    c.init_from = str(init_checkpoint)
    c.num_steps = OVERFIT_STEPS
    c.train.also_train = ("segformer",)
    c.optim.learning_rate = 1e-2
    c.data.update(num_examples=2, scene_size=32, global_batch_size=8, hflip=False)
    c.log.every = 10
    c.checkpoint.every = 1000
    c.sample.every = OVERFIT_STEPS  # one LQ | SR | seg | HR grid at the end
    assert train.train_and_evaluate(c, str(workdir)) == 0
    return workdir


def test_overfitting_a_few_images(overfit_run):
    """The seg cross-entropy (mean of 10 steps) falls by 3x within 150 steps."""
    losses = {r["step"]: r["loss_seg"] for r in _records(overfit_run)}
    assert losses[10] > 1.0  # ~log(4) at the start
    assert losses[OVERFIT_STEPS] < losses[10] / OVERFIT_FACTOR, losses
    compile_event = _records(overfit_run, "compile")[0]
    assert compile_event["seconds"] > 0 and compile_event["temp_bytes"] > 0


def test_sample_grid_of_the_validation_batch(overfit_run):
    (png,) = (overfit_run / "samples").glob("samples_step*.png")
    grid = np.asarray(Image.open(png))
    assert grid.shape == (8 * 32, 4 * 32, 3)  # 8 rows of LQ | SR | seg | HR
    assert _records(overfit_run, "compile_sampler")[0]["seconds"] > 0


def test_checkpoint_samples_with_ema_over_frozen_params(overfit_run):
    ck = overfit_run / "checkpoints"
    restorer = Restorer.from_checkpoint(ck)  # what `python -m segsr_jax.sample` does
    got = nnx.to_pure_dict(restorer.state)
    raw = ocp.CheckpointManager(ck, options=ocp.CheckpointManagerOptions(read_only=True))
    ema = raw.restore(
        OVERFIT_STEPS, args=ocp.args.Composite(ema_params=ocp.args.StandardRestore())
    )["ema_params"]
    raw.close()
    assert set(ema) == {"segdm", "segformer"}
    np.testing.assert_array_equal(
        got["segdm"]["conv_out"]["kernel"], ema["segdm"]["conv_out"]["kernel"]
    )
    # Frozen parts are exactly the initial values, never touched by 150 steps.
    _, init = random_params()
    for name in ("unet", "controlnet", "bridge", "vae", "text_encoder"):
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(init[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(
        got["segformer"]["decode_head"]["classifier"]["kernel"],
        init["segformer"]["decode_head"]["classifier"]["kernel"],
    )
    assert (ck / "tokenizer" / "vocab.json").is_file()
    assert restorer.tokenizer(["grass"]).shape == (1, 16)


def test_nan_guard_stops_without_saving_a_bad_state(tmp_path, init_checkpoint):
    c = get_config("seg")
    c.init_from = str(init_checkpoint)
    c.num_steps = 6
    c.optim.update(learning_rate=1e30, warmup_steps=0)  # step 1 blows the params up
    c.checkpoint.every = 2
    with pytest.raises(step_lib.NonFiniteError, match="at step 2"):
        train.train_and_evaluate(c, str(tmp_path))
    assert (
        checkpointer.TrainCheckpointer(
            tmp_path / "checkpoints", checkpointer.CheckpointOptions()
        ).all_steps()
        == []
    )
    steps = [r["step"] for r in _records(tmp_path)]
    assert steps == [1]  # step 1 was logged; step 2's metrics stopped the run


@pytest.mark.parametrize("stage", ["prior", "segmenter"])
def test_experiment_stages_train_only_their_modules(stage, tmp_path, init_checkpoint):
    """Stages prior (ControlNet + bridge from the fixed LQ-segmenter map) and segmenter
    (SegFormer on HR) run through the CLI's training loop and change only their modules;
    the segmenter's checkpoint loads as an evaluation segmenter."""
    c = get_config(stage)
    c.init_from = str(init_checkpoint)
    c.num_steps = 3
    c.checkpoint.every = 3
    c.sample.every = 0  # validation sampling: test_fsdp_training.py, the overfit run here
    assert train.train_and_evaluate(c, str(tmp_path)) == 0
    metrics = _records(tmp_path)[-1]
    assert np.isfinite(metrics["loss"])
    if stage == "segmenter":
        assert 0.0 <= metrics["pixel_accuracy"] <= 1.0
    _, before = random_params()  # what init_checkpoint holds
    after = nnx.to_pure_dict(Restorer.from_checkpoint(tmp_path / "checkpoints").state)
    changed = {
        name
        for name in before
        if any(
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree.leaves(before[name]), jax.tree.leaves(after[name]), strict=True
            )
        )
    }
    assert changed == {"prior": {"controlnet", "bridge"}, "segmenter": {"segformer"}}[stage]


def test_decoder_stage_fine_tunes_only_the_decoder_with_lpips(
    tmp_path, init_checkpoint, monkeypatch
):
    """Stage decoder runs through the CLI's training loop with LPIPS's weights read from the
    fetch cache (random ones here), logs the LPIPS term, and changes only the VAE's decoder
    side: the encoder, hence the latent space the diffusion stages learned, is bitwise kept."""
    from safetensors.numpy import save_file

    from segsr_jax.lpips import LPIPS
    from segsr_jax.weights import fetch
    from segsr_jax.weights.torch_mapping import state_dict_from_module

    (tmp_path / "cache" / "lpips").mkdir(parents=True)
    tensors = state_dict_from_module(LPIPS(rngs=nnx.Rngs(0)))
    tensors = {k: np.abs(v) if k.startswith("lins") else v for k, v in tensors.items()}  # >= 0
    save_file(tensors, str(tmp_path / "cache" / "lpips" / "model.safetensors"))
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    c = get_config("decoder")
    c.init_from = str(init_checkpoint)
    c.num_steps = 3
    c.checkpoint.every = 3
    assert train.train_and_evaluate(c, str(tmp_path / "run")) == 0
    metrics = _records(tmp_path / "run")[-1]
    assert np.isfinite(metrics["lpips"]) and metrics["lpips"] > 0
    np.testing.assert_allclose(metrics["loss"], metrics["loss_recon"] + metrics["lpips"], rtol=1e-5)
    _, before = random_params()
    after = nnx.to_pure_dict(Restorer.from_checkpoint(tmp_path / "run" / "checkpoints").state)
    flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))  # noqa: E731
    b, a = flat(before), flat(after)
    changed = {jax.tree_util.keystr(k[:2]) for k in b if not np.array_equal(b[k], a[k])}
    assert changed == {"['vae']['decoder']", "['vae']['post_quant_conv']"}


def test_checkpoint_carries_the_configs_sampling_defaults(tmp_path, init_checkpoint):
    """sample.options, inference-only defaults (min_side, tiling) included, become the
    checkpoint's sampling defaults; the validation grid samples with the options it knows."""
    c = get_config("seg")
    c.init_from = str(init_checkpoint)
    c.num_steps = c.checkpoint.every = c.sample.every = 1
    c.sample.options.update(min_side=32, tile=8, tile_overlap=2)
    assert train.train_and_evaluate(c, str(tmp_path)) == 0
    # Trained with seg-tag prompts (max 2 tags): it samples with tag prompts too.
    assert checkpoint.read_checkpoint_config(tmp_path / "checkpoints")["sampling"] == {
        **c.sample.options.to_dict(),
        "prompt_mode": "tags",
        "max_tags": 2,
    }
    assert _records(tmp_path, "compile_sampler")
    restorer = Restorer.from_checkpoint(tmp_path / "checkpoints")
    options = restorer.options()
    assert (options.min_side, options.tile, options.tile_overlap) == (32, 8, 2)
    assert (options.prompt_mode, options.max_tags) == ("tags", 2)
