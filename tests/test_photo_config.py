"""configs/photo.py (the real-photo architecture) and scripts/prepare_photos.py's pseudo-classes."""

import importlib.util
import pathlib

import numpy as np

from configs import photo
from segsr_jax.models.segsr import SegSRConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_photo_stages_build_one_architecture_without_full_resolution_attention():
    models = {n: SegSRConfig.from_dict(photo.get_config(n).model.to_dict()) for n in photo.STAGES}
    assert len({repr(m) for m in models.values()}) == 1  # every stage restores the previous one
    m = models["joint"]
    assert m.class_names == photo.CLASS_NAMES and len(set(photo.CLASS_NAMES)) == 10
    assert m.segformer.num_labels == m.segdm.num_classes == 10
    # CPU speed: no self-attention over every latent position (the tiny model's cost).
    assert m.unet.down_block_types[0] == "DownBlock2D" and m.unet.up_block_types[-1] == "UpBlock2D"
    assert m.controlnet.down_block_types == m.unet.down_block_types
    assert m.segdm.attention_blocks == () and not m.vae.mid_block_add_attention
    assert photo.get_config("sr").init_from == "runs/photo/vae/checkpoints"


def _prepare():
    spec = importlib.util.spec_from_file_location(
        "prepare_photos", ROOT / "scripts/prepare_photos.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kmeans_and_pixel_assignment_separate_two_clear_clusters():
    prep = _prepare()
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (200, 3)), rng.normal(5, 0.1, (200, 3))])
    centres = prep.kmeans(x.astype(np.float32), 2, seed=0)
    assert sorted(np.round(centres.mean(axis=1)).tolist()) == [0.0, 5.0]
    feat = np.zeros((2, 2, 3), np.float32)
    feat[:, 1] = 5.0  # right half of the 1/8 feature map is the second cluster
    labels, margin = prep.assign_pixels(feat, centres, (16, 16))
    left = labels[:, :4]
    assert (left == left[0, 0]).all() and (labels[:, 12:] != left[0, 0]).all()
    assert margin.shape == (16, 16) and (margin >= 0).all()


def test_bundled_default_is_the_photo_architecture_with_its_chosen_sampling():
    """The bundled checkpoint is this config's model, with the sampling defaults chosen on
    the training-photo validation set (docs/realphoto/model.md) and its class names."""
    import json

    from segsr_jax.diffusion.options import SampleOptions
    from segsr_jax.sample import bundled_paths

    ckpt, demo = bundled_paths()
    cfg = json.loads((ckpt / "0" / "config" / "metadata").read_text())
    assert SegSRConfig.from_dict(cfg["model"]) == photo.model_config()
    options = SampleOptions.from_dict(cfg["sampling"])
    assert (options.cleaner, options.strength, options.denoising_steps) == ("realesrgan", 0.05, 1)
    assert (options.color_fix, options.prompt_mode) == ("wavelet", "tags")  # trained with tags
    assert cfg["source"] == "runs/photo/decoder/checkpoints"  # the LPIPS-fine-tuned decoder
    assert sorted(p.name for p in demo.glob("*.png")) == ["astronaut.png", "rocket.png"]
