"""SegFormer: parity with transformers' SegformerForSemanticSegmentation through
``weights.load_segformer``, parameter counts, bfloat16, input normalisation and loader errors."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from segsr_jax import weights
from segsr_jax.models.seg_encoder import (
    SegFormer,
    SegFormerConfig,
    normalize_images,
    resize_bilinear,
)
from segsr_jax.weights.segformer import segformer_config_from_transformers
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, perturb_, torch

tf = pytest.importorskip("transformers")

# Small configs: non-default heads, sr ratios, MLP ratios, patch sizes and activations; image
# sizes that are square, non-square, and not multiples of the total stride (so the decode
# head upsamples by non-integer factors and the sr convs floor).
CONFIGS = {
    "4stage_64x64": (
        dict(
            num_encoder_blocks=4,
            depths=[1, 2, 1, 1],
            hidden_sizes=[8, 16, 24, 32],
            num_attention_heads=[1, 2, 3, 4],
            sr_ratios=[4, 2, 2, 1],
            mlp_ratios=[2, 4, 2, 3],
            decoder_hidden_size=16,
            num_labels=5,
            # transformers never reads layer_norm_eps; parity shows we ignore it too
            layer_norm_eps=1e-3,
        ),
        (64, 64),
    ),
    "2stage_64x96": (
        dict(
            num_encoder_blocks=2,
            depths=[2, 1],
            hidden_sizes=[8, 16],
            num_attention_heads=[2, 4],
            sr_ratios=[2, 1],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[4, 2],
            decoder_hidden_size=32,
            num_labels=7,
            hidden_act="gelu_new",
        ),
        (64, 96),
    ),
    "3stage_72x88": (
        dict(
            num_encoder_blocks=3,
            depths=[1, 1, 2],
            hidden_sizes=[12, 16, 24],
            num_attention_heads=[3, 1, 2],
            sr_ratios=[8, 4, 1],
            patch_sizes=[5, 3, 3],
            strides=[4, 2, 2],
            mlp_ratios=[4, 4, 2],
            decoder_hidden_size=16,
            num_labels=6,
        ),
        (72, 88),
    ),
}


# One compiled program per model and shape (much faster here than op-by-op dispatch).
_forward = nnx.jit(lambda seg, pixels: seg(pixels))


def _reference(kwargs, seed):
    """A perturbed transformers model; BN statistics made non-trivial (variance kept > 0)."""
    torch.manual_seed(seed)
    cfg = tf.SegformerConfig(**kwargs)
    cfg.id2label = {i: f"class_{i}" for i in range(kwargs["num_labels"])}
    model = perturb_(tf.SegformerForSemanticSegmentation(cfg), seed=seed)
    bn = model.decode_head.batch_norm
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 1.5 + 0.5)
    return model


def _run_reference(model, pixels_nhwc):
    """Reference logits and fused features (captured at the head's ReLU), both NHWC."""
    captured = {}
    hook = model.decode_head.activation.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("feats", out)
    )
    with torch.no_grad():
        logits = model(pixel_values=nhwc_to_nchw(pixels_nhwc)).logits
    hook.remove()
    return nchw_to_nhwc(logits), nchw_to_nhwc(captured["feats"])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """One saved reference (the first config) shared by the cheaper tests."""
    model = _reference(CONFIGS["4stage_64x64"][0], seed=0)
    folder = tmp_path_factory.mktemp("segformer") / "tiny"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, tmp_path, np_rng):
    kwargs, (h, w) = CONFIGS[name]
    ref = _reference(kwargs, seed=len(name))
    ref.save_pretrained(tmp_path)
    seg = weights.load_segformer(tmp_path)
    assert seg.config.id2label == tuple(f"class_{i}" for i in range(kwargs["num_labels"]))

    pixels = np_rng.standard_normal((2, h, w, 3)).astype(np.float32)
    want_logits, want_feats = _run_reference(ref, pixels)
    logits, feats = _forward(seg, jnp.asarray(pixels))
    assert feats.shape[-1] == kwargs["decoder_hidden_size"]
    assert_close_rel(logits, want_logits, what=f"{name} logits")
    assert_close_rel(feats, want_feats, what=f"{name} fused features")


def test_transformers5_in_memory_names_load_the_same(tiny_folder, tmp_path):
    model, folder = tiny_folder
    # model.state_dict() has transformers 5's renamed keys (stages.N.blocks.M, q_proj, ...).
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert any(".stages." in k for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    a = nnx.to_flat_state(nnx.state(weights.load_segformer(folder)))
    b = dict(nnx.to_flat_state(nnx.state(weights.load_segformer(tmp_path))))
    for path, var in a:
        np.testing.assert_array_equal(var.get_value(), b[path].get_value(), err_msg=str(path))


def test_bfloat16_close_to_float32(tiny_folder, np_rng):
    _, folder = tiny_folder
    pixels = jnp.asarray(np_rng.standard_normal((2, 64, 64, 3)).astype(np.float32))
    logits32, feats32 = _forward(weights.load_segformer(folder), pixels)
    logits16, feats16 = _forward(weights.load_segformer(folder, dtype=jnp.bfloat16), pixels)
    assert logits16.dtype == jnp.bfloat16 and feats16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits; through ~20 layers 3e-2 of the output scale holds.
    assert_close_rel(logits16.astype(jnp.float32), logits32, tol=3e-2, what="bf16 logits")
    assert_close_rel(feats16.astype(jnp.float32), feats32, tol=3e-2, what="bf16 feats")


def _count(cfg):
    """(parameters, BatchNorm statistics) of SegFormer(cfg), built abstractly."""
    abstract = nnx.eval_shape(lambda: SegFormer(cfg, rngs=nnx.Rngs(0)))
    size = lambda s: sum(math.prod(x.shape) for x in jax.tree.leaves(s))
    return size(nnx.state(abstract, nnx.Param)), size(nnx.state(abstract, nnx.BatchStat))


def test_full_size_parameter_counts():
    # transformers counts parameters only; BN running mean/var are buffers.
    counts = {"b5": _count(SegFormerConfig.b5())}
    assert counts["b5"] == (84_708_694, 2 * 768)
    counts.update({v: _count(getattr(SegFormerConfig, v)()) for v in ("b0", "b1")})
    # B2-B4 are left out for time: in flax 0.12 / jax 0.10 abstract construction grows
    # quadratically with the number of rng draws (each RngCount update asks a tracer for
    # .sharding, whose error message walks the whole jaxpr); B5 alone takes ~15 s here.
    paper = {"b0": 3.8, "b1": 13.7, "b5": 84.7}  # SegFormer paper, M params, 150 classes
    for variant, (params, _) in counts.items():
        assert round(params / 1e6, 1) == paper[variant], variant
        cfg = getattr(SegFormerConfig, variant)()
        with torch.device("meta"):  # shapes only, no memory, no init
            ref = tf.SegformerForSemanticSegmentation(
                tf.SegformerConfig(
                    depths=list(cfg.depths),
                    hidden_sizes=list(cfg.hidden_sizes),
                    decoder_hidden_size=cfg.decoder_hidden_size,
                    num_labels=150,
                )
            )
        assert params == sum(p.numel() for p in ref.parameters()), variant
    # B0 is transformers' default SegformerConfig.
    b0, default = SegFormerConfig.b0(), tf.SegformerConfig()
    for field in (
        "depths",
        "sr_ratios",
        "hidden_sizes",
        "patch_sizes",
        "strides",
        "num_attention_heads",
        "mlp_ratios",
    ):
        assert getattr(b0, field) == tuple(getattr(default, field)), field
    assert b0.decoder_hidden_size == default.decoder_hidden_size


def test_resize_bilinear_matches_torch(np_rng):
    for (h, w), (oh, ow) in [
        ((2, 3), (16, 24)),
        ((5, 6), (18, 22)),
        ((9, 11), (18, 22)),
        ((18, 22), (9, 11)),
        ((18, 18), (7, 5)),
    ]:
        x = np_rng.standard_normal((2, h, w, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(
            nhwc_to_nchw(x), size=(oh, ow), mode="bilinear", align_corners=False
        )
        assert_close_rel(
            resize_bilinear(jnp.asarray(x), (oh, ow)),
            nchw_to_nhwc(want),
            tol=1e-5,
            what=f"{(h, w)}->{(oh, ow)}",
        )


def test_normalize_images_matches_image_processor(np_rng):
    pil = pytest.importorskip("transformers.models.segformer.image_processing_pil_segformer")
    images = np_rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    want = pil.SegformerImageProcessorPil(do_resize=False)(list(images), return_tensors="np")[
        "pixel_values"
    ].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(normalize_images(images), want, atol=1e-5)
    minus1_1 = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(normalize_images(jnp.asarray(minus1_1)), want, atol=1e-5)


def _copy_with(folder, dest, *, config=None, tensors=None):
    dest.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config(raw) if config else raw))
    sd = load_file(str(folder / "model.safetensors"))
    if tensors is not None:
        sd = tensors(sd)
    if sd is not None:
        save_file(sd, str(dest / "model.safetensors"))
    return dest


def test_loader_errors(tiny_folder, tmp_path):
    _, folder = tiny_folder
    CheckpointError = weights.CheckpointError

    bad = _copy_with(folder, tmp_path / "unknown", config=lambda c: {**c, "foo_ratio": 3})
    with pytest.raises(CheckpointError, match="foo_ratio"):
        weights.load_segformer(bad)
    bad = _copy_with(
        folder, tmp_path / "encdec", config=lambda c: {**c, "is_encoder_decoder": True}
    )
    with pytest.raises(CheckpointError, match="is_encoder_decoder"):
        weights.load_segformer(bad)
    bad = _copy_with(folder, tmp_path / "act", config=lambda c: {**c, "hidden_act": "mish"})
    with pytest.raises(CheckpointError, match="mish"):
        weights.load_segformer(bad)
    with pytest.raises(CheckpointError, match="num_labels=9"):
        segformer_config_from_transformers({"id2label": {"0": "a", "1": "b"}, "num_labels": 9})

    with pytest.raises(CheckpointError, match="not found"):
        weights.load_segformer(tmp_path / "nowhere")
    bad = _copy_with(folder, tmp_path / "noweights", tensors=lambda sd: None)
    with pytest.raises(CheckpointError, match="no weights"):
        weights.load_segformer(bad)

    key = "decode_head.classifier.weight"
    bad = _copy_with(
        folder,
        tmp_path / "shape",
        tensors=lambda sd: {**sd, key: np.zeros((4, 16, 1, 1), np.float32)},
    )
    with pytest.raises(CheckpointError, match=key):
        weights.load_segformer(bad)
    key = "segformer.encoder.block.1.0.attention.self.sr.weight"
    bad = _copy_with(
        folder, tmp_path / "missing", tensors=lambda sd: {k: v for k, v in sd.items() if k != key}
    )
    with pytest.raises(CheckpointError, match=key):
        weights.load_segformer(bad)

    # A bare MiT encoder (SegformerModel) has no decode head: refused, saying so.
    encoder = tf.SegformerModel(tf.SegformerConfig(**CONFIGS["2stage_64x96"][0]))
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.raises(CheckpointError, match="encoder-only"):
        weights.load_segformer(tmp_path / "encoder")
