"""``python -m segsr_jax.convert`` on a tiny diffusers pipeline + transformers SegFormer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segsr_jax import convert
from segsr_jax.inference import Restorer
from tests.models.test_text_encoder import _write_sd2_style_folder
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, perturb_, torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny SD-style pipeline folder, weights perturbed, plus a tiny SegFormer folder."""
    root = tmp_path_factory.mktemp("pipe")
    unet = perturb_(
        diffusers.UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2,
            cross_attention_dim=16,
            use_linear_projection=True,
            sample_size=8,
        ),
        seed=1,
    )
    vae = perturb_(
        diffusers.AutoencoderKL(
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        ),
        seed=2,
    )
    text = perturb_(
        transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=12,
                hidden_act="gelu",
            )
        ),
        seed=3,
    )
    seg = perturb_(
        transformers.SegformerForSemanticSegmentation(
            transformers.SegformerConfig(
                num_encoder_blocks=2,
                depths=[1, 1],
                sr_ratios=[2, 1],
                hidden_sizes=[8, 16],
                patch_sizes=[7, 3],
                strides=[4, 2],
                num_attention_heads=[1, 2],
                mlp_ratios=[2, 2],
                decoder_hidden_size=8,
                num_labels=3,
            )
        ),
        seed=4,
    )
    with torch.no_grad():  # BatchNorm variance must stay positive after perturbing
        seg.decode_head.batch_norm.running_var.abs_().add_(0.5)
    unet.save_pretrained(root / "sd" / "unet")
    vae.save_pretrained(root / "sd" / "vae")
    text.save_pretrained(root / "sd" / "text_encoder")
    _write_sd2_style_folder(root / "sd" / "tokenizer", max_length=12)
    seg.save_pretrained(root / "segformer")
    return root, unet


def test_convert_then_restore_matches_the_references(pipeline, tmp_path, np_rng):
    root, ref_unet = pipeline
    out = tmp_path / "ck"
    assert (
        convert.main(
            [
                "--pipeline",
                str(root / "sd"),
                "--segformer",
                str(root / "segformer"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    restorer = Restorer.from_checkpoint(out)
    from flax import nnx

    model = nnx.merge(restorer.graphdef, restorer.state)
    x = np_rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = np_rng.standard_normal((1, 5, 16)).astype(np.float32)
    with torch.no_grad():
        want = nchw_to_nhwc(
            ref_unet(nhwc_to_nchw(x), torch.tensor([321]), torch.from_numpy(ctx)).sample
        )
    assert_close_rel(model.unet(jnp.asarray(x), jnp.array([321]), jnp.asarray(ctx)), want)
    # The ControlNet starts as the UNet's encoder; its outputs and the bridge's are zero.
    np.testing.assert_array_equal(
        model.controlnet.conv_in.kernel[...], model.unet.conv_in.kernel[...]
    )
    cond = jnp.ones((1, 8, 8, model.config.controlnet.conditioning_channels))
    down, mid = model.controlnet(jnp.asarray(x), 321, jnp.asarray(ctx), cond)
    assert not any(bool(jnp.any(d)) for d in down) and not bool(jnp.any(mid))
    i_t, c_t = model.bridge(jnp.asarray(x), jnp.ones((1, 8, 8, 16)), 321)
    assert not bool(jnp.any(i_t)) and not bool(jnp.any(c_t))
    assert model.config.segdm.num_classes == 3
    assert restorer.tokenizer(["the cat"]).shape == (1, 12)
    # Text encoder weights survived the trip.
    leaves = jax.tree.leaves(nnx.state(model.text_encoder))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)


def test_convert_errors(pipeline, tmp_path, capsys):
    root, _ = pipeline
    out = tmp_path / "exists"
    out.mkdir()
    assert convert.main(["--pipeline", str(root / "sd"), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    rc = convert.main(["--pipeline", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
