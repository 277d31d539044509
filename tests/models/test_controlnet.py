"""ControlNet: parity with diffusers' ControlNetModel (pixel conditioning) through
``weights.load_controlnet``, ``controlnet_from_unet`` vs ``ControlNetModel.from_unet``, the
UNet + ControlNet composition, the latent conditioning, full-size counts and errors."""

import dataclasses
import inspect
import json

import jax
import numpy as np
import pytest
from flax import nnx

from segsr_jax import weights
from segsr_jax.models.controlnet import ControlNet, ControlNetConfig, controlnet_config_from_unet
from segsr_jax.models.unet import UNetConfig
from segsr_jax.weights import unet as unet_weights
from segsr_jax.weights.torch_mapping import load_state_dict, state_dict_from_module
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, perturb_, torch

diffusers = pytest.importorskip("diffusers")

CN_CONFIGS = {
    # SD-2 style: linear projections, per-block heads, 8 groups, diffusers' 8x pixel stack.
    "linear_tuple_heads": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=24,
        norm_num_groups=8,
        use_linear_projection=True,
        conditioning_embedding_out_channels=(8, 16, 16, 32),
    ),
    # Three levels, 1x1-conv projections, 4 heads, 16 groups, two layers, two transformer
    # layers in the first block, sin-first embedding with shift 1, BGR input with 5 channels
    # at 2x resolution.
    "conv_bgr_2x": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        attention_head_dim=4,
        transformer_layers_per_block=(2, 1, 1),
        cross_attention_dim=16,
        norm_num_groups=16,
        flip_sin_to_cos=False,
        freq_shift=1,
        controlnet_conditioning_channel_order="bgr",
        conditioning_channels=5,
        conditioning_embedding_out_channels=(8, 16),
    ),
}

UNET_KW = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=24,
    norm_num_groups=8,
    use_linear_projection=True,
)
COND_CHANNELS = (8, 16, 16, 32)


def _inputs(latent, cross_dim, cond_shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, latent, latent, 4)).astype(np.float32)
    t = np.array([11, 905])
    ctx = rng.standard_normal((2, 5, cross_dim)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, *cond_shape)).astype(np.float32)
    return x, t, ctx, cond


def _torch_cn(ref, x, t, ctx, cond, scale):
    with torch.no_grad():
        down, mid = ref(
            nhwc_to_nchw(x),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            nhwc_to_nchw(cond),
            conditioning_scale=scale,
            return_dict=False,
        )
    return down, mid


def _jit(module):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)), state


def _assert_residuals_close(ours, want, what):
    down, mid = ours
    assert len(down) == len(want[0]), what
    for i, (a, b) in enumerate(zip(down, want[0], strict=True)):
        assert_close_rel(a, nchw_to_nhwc(b), what=f"{what} down[{i}]")
    assert_close_rel(mid, nchw_to_nhwc(want[1]), what=f"{what} mid")


@pytest.mark.parametrize(
    "name,latent,scale", [("linear_tuple_heads", 8, 1.0), ("conv_bgr_2x", 8, 0.6)]
)
def test_controlnet_matches_diffusers(name, latent, scale, tmp_path):
    kw = CN_CONFIGS[name]
    ref = perturb_(diffusers.ControlNetModel(**kw), seed=len(name))  # zero convs non-zero
    ref.save_pretrained(tmp_path / "controlnet")
    ours = weights.load_controlnet(tmp_path)  # a pipeline folder with controlnet/
    assert ours.config.conditioning == "pixel"
    up = 2 ** (len(kw["conditioning_embedding_out_channels"]) - 1)
    x, t, ctx, cond = _inputs(
        latent,
        kw["cross_attention_dim"],
        (latent * up, latent * up, kw.get("conditioning_channels", 3)),
    )
    fn, state = _jit(ours)
    _assert_residuals_close(
        fn(state, x, t, ctx, cond, scale), _torch_cn(ref, x, t, ctx, cond, scale), name
    )


def test_from_unet_and_composition_match_diffusers(tmp_path):
    """``controlnet_from_unet`` copies what ``ControlNetModel.from_unet`` copies and zeroes
    what it zeroes; with the same conditioning / zero-conv weights (perturbed, so non-zero)
    both give the same residuals, and UNet(..., residuals) equals diffusers' composition."""
    ref_unet = perturb_(diffusers.UNet2DConditionModel(**UNET_KW), seed=3)
    ref_unet.save_pretrained(tmp_path / "unet")
    ref_cn = diffusers.ControlNetModel.from_unet(
        ref_unet, conditioning_embedding_out_channels=COND_CHANNELS
    ).eval()
    unet = weights.load_unet(tmp_path)
    cn = weights.controlnet_from_unet(unet, {"conditioning_embedding_out_channels": COND_CHANNELS})

    ours_sd = state_dict_from_module(cn)
    ref_sd = {k: v.numpy() for k, v in ref_cn.state_dict().items()}
    assert ours_sd.keys() == ref_sd.keys()
    randomly_initialised = ("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.blocks")
    zero = (
        "controlnet_down_blocks.",
        "controlnet_mid_block.",
        "controlnet_cond_embedding.conv_out",
    )
    for key, value in ours_sd.items():
        if key.startswith(zero):
            assert not value.any() and not ref_sd[key].any(), key
        elif not key.startswith(randomly_initialised):
            np.testing.assert_array_equal(value, ref_sd[key], err_msg=key)

    # Give both the same non-zero conditioning stack and zero convs; keep our copied encoder.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for key, p in ref_cn.named_parameters():
            if key.startswith("controlnet_"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ours_sd.update(
        {
            k: v.detach().numpy()
            for k, v in ref_cn.state_dict().items()
            if k.startswith("controlnet_")
        }
    )
    cn = load_state_dict(lambda: ControlNet(cn.config, rngs=nnx.Rngs(0)), ours_sd)

    x, t, ctx, cond = _inputs(8, 24, (64, 64, 3), seed=1)
    want_cn = _torch_cn(ref_cn, x, t, ctx, cond, 0.8)
    with torch.no_grad():
        want = nchw_to_nhwc(
            ref_unet(
                nhwc_to_nchw(x),
                torch.from_numpy(t),
                torch.from_numpy(ctx),
                down_block_additional_residuals=list(want_cn[0]),
                mid_block_additional_residual=want_cn[1],
            ).sample
        )

    graphdef_u, state_u = nnx.split(unet)
    graphdef_c, state_c = nnx.split(cn)

    @jax.jit
    def compose(su, sc, x, t, ctx, cond):
        down, mid = nnx.merge(graphdef_c, sc)(x, t, ctx, cond, 0.8)
        return (down, mid), nnx.merge(graphdef_u, su)(x, t, ctx, down, mid)

    residuals, eps = compose(state_u, state_c, x, t, ctx, cond)
    _assert_residuals_close(residuals, want_cn, "from_unet")
    assert_close_rel(eps, want, what="unet + controlnet")


def test_latent_conditioning(tmp_path):
    """SegSR's branch: cond = concat(Z_lq, C_t) at latent resolution. The zero-initialised output
    conv makes the residuals independent of cond (even with non-zero residual convs); once it
    is non-zero they depend on it. A config.json with "conditioning": "latent" loads back."""
    diffusers.UNet2DConditionModel(**UNET_KW).save_pretrained(tmp_path / "unet")
    unet = weights.load_unet(tmp_path)
    cn = weights.controlnet_from_unet(unet, {"conditioning": "latent", "conditioning_channels": 8})
    assert cn.config.cond_downscale == 1
    x, t, ctx, cond_a = _inputs(8, 24, (8, 8, 8), seed=2)
    cond_b = np.random.default_rng(9).standard_normal(cond_a.shape).astype(np.float32)
    fn, state = _jit(cn)
    flat = lambda out: np.concatenate([np.ravel(r) for r in (*out[0], out[1])])

    assert not flat(fn(state, x, t, ctx, cond_a)).any()  # a fresh ControlNet adds nothing

    key = jax.random.key(0)
    for zc in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
        key, sub = jax.random.split(key)
        zc.kernel.set_value(0.1 * jax.random.normal(sub, zc.kernel.get_value().shape))
    state = nnx.state(cn)
    res_a, res_b = flat(fn(state, x, t, ctx, cond_a)), flat(fn(state, x, t, ctx, cond_b))
    assert np.abs(res_a).max() > 1e-3
    np.testing.assert_array_equal(res_a, res_b)

    conv_out = cn.controlnet_cond_embedding.conv_out
    conv_out.kernel.set_value(0.1 * jax.random.normal(key, conv_out.kernel.get_value().shape))
    state = nnx.state(cn)
    res_a2, res_b2 = flat(fn(state, x, t, ctx, cond_a)), flat(fn(state, x, t, ctx, cond_b))
    assert np.abs(res_a2 - res_b2).max() > 1e-2 * np.abs(res_a2).max()
    assert np.abs(res_a2 - res_a).max() > 1e-2 * np.abs(res_a).max()

    with pytest.raises(ValueError, match=r"latent conditioning must be \[B, 8, 8, 8\]"):
        fn(state, x, t, ctx, np.zeros((2, 64, 64, 8), np.float32))

    # Round trip through the loader: diffusers layout + our "conditioning" key.
    from safetensors.numpy import save_file

    folder = tmp_path / "latent_cn"
    folder.mkdir()
    # safetensors.numpy writes a non-contiguous (transposed) array's buffer as if it were
    # C-ordered, so make every tensor contiguous first.
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict_from_module(cn).items()}
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "ControlNetModel", **dataclasses.asdict(cn.config)})
    )
    again = weights.load_controlnet(folder)
    assert again.config == cn.config
    np.testing.assert_array_equal(
        state_dict_from_module(again)["controlnet_mid_block.weight"],
        state_dict_from_module(cn)["controlnet_mid_block.weight"],
    )


def test_full_size_parameter_counts():
    """diffusers' ControlNetModel.from_unet(SD-2-base UNet) has 364,228,240 parameters. Our
    latent-conditioning ControlNet from the same UNet with concat(Z_lq [4], C_t [4]) = 8
    input channels has 364,228,960 (only the first conditioning conv is wider: 5*16*9 more)."""

    def count(config):
        cn = nnx.eval_shape(lambda: ControlNet(config, rngs=nnx.Rngs(0)))
        leaves = nnx.to_flat_state(nnx.state(cn, nnx.Param))
        return sum(int(np.prod(v.get_value().shape)) for _, v in leaves)

    sd2 = UNetConfig.sd2_base()
    assert count(controlnet_config_from_unet(sd2)) == 364_228_240
    latent = controlnet_config_from_unet(
        sd2, {"conditioning": "latent", "conditioning_channels": 8}
    )
    assert count(latent) == 364_228_960


def test_config_keys_and_errors(tmp_path):
    keys = set(inspect.signature(diffusers.ControlNetModel.__init__).parameters) - {"self"}
    ours = (
        {f.name for f in dataclasses.fields(ControlNetConfig)}
        | set(unet_weights.CONTROLNET_UNSUPPORTED)
        | unet_weights.CONTROLNET_IGNORED
    )
    assert keys <= ours, keys - ours

    kw = dict(
        CN_CONFIGS["linear_tuple_heads"],
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=2,
    )
    diffusers.ControlNetModel(**kw).save_pretrained(tmp_path)
    assert weights.load_controlnet(tmp_path).config == ControlNetConfig(**kw)
    with pytest.raises(weights.CheckpointError, match="conditioning='voxel'"):
        weights.load_controlnet(tmp_path, conditioning="voxel")
    config = tmp_path / "config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "global_pool_conditions": True}))
    with pytest.raises(weights.CheckpointError, match="global_pool_conditions=True"):
        weights.load_controlnet(tmp_path)
    config.write_text(json.dumps({**raw, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(weights.CheckpointError, match="not a ControlNetModel"):
        weights.load_controlnet(tmp_path)


def test_from_unet_rejects_a_different_encoder(tmp_path):
    diffusers.UNet2DConditionModel(**UNET_KW).save_pretrained(tmp_path)
    unet = weights.load_unet(tmp_path)
    other = controlnet_config_from_unet(unet.config, {"layers_per_block": 2})
    with pytest.raises(ValueError, match="down_blocks does not match the UNet"):
        weights.controlnet_from_unet(unet, other)
