"""UNet2DCondition: parity with diffusers' UNet2DConditionModel through ``weights.load_unet``,
the full-size parameter count, bfloat16, and the loader's errors."""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax import weights
from segsr_jax.models.layers import TimestepEmbedding
from segsr_jax.models.unet import UNet2DCondition, UNetConfig, embed_timesteps
from segsr_jax.weights import unet as unet_weights
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, perturb_, torch

diffusers = pytest.importorskip("diffusers")

# Small configs covering the options SD-1.x / SD-2.x use.
CONFIGS = {
    # SD-2 style: linear projections, per-block head counts, 8 groups, one layer per block.
    "linear_tuple_heads": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=24,
        norm_num_groups=8,
        use_linear_projection=True,
    ),
    # SD-1 style: 1x1-conv projections, one int head count (4), 16 groups, two layers, two
    # transformer layers in the first block, cos-first off and freq_shift 1, other eps.
    "conv_int_heads": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        transformer_layers_per_block=(2, 1),
        cross_attention_dim=16,
        norm_num_groups=16,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
    ),
    # Three levels, plain block first, unpadded downsampling, odd latent size (10 -> 5 -> 2,
    # so the decoder must upsample to the skips' sizes), centred input, mid scale factor.
    "three_levels_odd_size": dict(
        sample_size=10,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 8),
        cross_attention_dim=12,
        norm_num_groups=8,
        use_linear_projection=True,
        downsample_padding=0,
        mid_block_scale_factor=1.414,
        center_input_sample=True,
    ),
}


# The smallest valid UNet, for loader and error tests.
TINY = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=8,
)


def _make_reference(kw, seed):
    return perturb_(diffusers.UNet2DConditionModel(**kw), seed=seed)


def _inputs(kw, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    size = kw["sample_size"]
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([3, 617][:batch])
    ctx = rng.standard_normal((batch, 7, kw["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def _random_residuals(ref, x, t, ctx, seed=1):
    """Random ControlNet-like residuals shaped like the reference's encoder skips / mid."""
    shapes = []
    hooks = [ref.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))]
    for block in ref.down_blocks:
        hooks.append(
            block.register_forward_hook(lambda m, i, o: shapes.extend(r.shape for r in o[1]))
        )
    hooks.append(ref.mid_block.register_forward_hook(lambda m, i, o: shapes.append(o.shape)))
    with torch.no_grad():
        ref(nhwc_to_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx))
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    res = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    return res[:-1], res[-1]


def _run_ours(unet, *args):
    """One jitted call (graphdef bound by closure, arrays as arguments)."""
    graphdef, state = nnx.split(unet)
    out = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)
    return np.asarray(out.astype(jnp.float32))


# bfloat16 vs float32 (same float32 params), max abs error relative to the output scale:
# measured 1.2-2.2% over the three configs here with two seeds each (1.6-2.1% for
# "linear_tuple_heads"), so the bound is 5%.
BF16_REL_TOL = 5e-2


@pytest.mark.parametrize(
    "name,safe,with_residuals,scalar_t,check_bf16",
    [
        ("linear_tuple_heads", True, True, False, True),
        ("conv_int_heads", False, False, False, False),  # loaded from a .bin file
        ("three_levels_odd_size", True, True, True, False),
    ],
)
def test_unet_matches_diffusers(name, safe, with_residuals, scalar_t, check_bf16, tmp_path):
    kw = CONFIGS[name]
    ref = _make_reference(kw, seed=len(name))
    # A pipeline-folder layout: load_unet(tmp_path) must find tmp_path/unet.
    ref.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    suffix = "safetensors" if safe else "bin"
    assert (tmp_path / "unet" / f"diffusion_pytorch_model.{suffix}").is_file()
    ours = weights.load_unet(tmp_path)
    assert isinstance(ours, UNet2DCondition)
    x, t, ctx = _inputs(kw)
    t_ref, t_ours = (617, 617) if scalar_t else (torch.from_numpy(t), t)
    down = mid = None
    if with_residuals:
        down, mid = _random_residuals(ref, x, t, ctx)
    with torch.no_grad():
        want = nchw_to_nhwc(
            ref(
                nhwc_to_nchw(x),
                t_ref,
                torch.from_numpy(ctx),
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        )
    args = (
        x,
        t_ours,
        ctx,
        None if down is None else [nchw_to_nhwc(r) for r in down],
        None if mid is None else nchw_to_nhwc(mid),
    )
    got = _run_ours(ours, *args)
    assert_close_rel(got, want, what=name)

    if check_bf16:
        bf16 = weights.load_unet(tmp_path, dtype=jnp.bfloat16)
        params = nnx.to_flat_state(nnx.state(bf16, nnx.Param))
        assert all(v.get_value().dtype == jnp.float32 for _, v in params)
        got16 = _run_ours(bf16, *args)
        rel = np.abs(got16 - got).max() / np.abs(got).max()
        assert 0 < rel < BF16_REL_TOL, rel


def test_timesteps_broadcast():
    """A scalar, a [1] and a [B] timestep give the same time embedding for every example."""
    cfg = UNetConfig(**TINY)
    mlp = TimestepEmbedding(8, 32, rngs=nnx.Rngs(0))
    embs = [embed_timesteps(mlp, cfg, t, 3) for t in (42, jnp.array([42]), jnp.array([42] * 3))]
    assert embs[0].shape == (3, 32)
    for e in embs[1:]:
        np.testing.assert_array_equal(e, embs[0])


def test_sd2_base_parameter_count():
    """SD-2-base's UNet has 865,910,724 parameters in diffusers; built abstractly here."""
    unet = nnx.eval_shape(lambda: UNet2DCondition(UNetConfig.sd2_base(), rngs=nnx.Rngs(0)))
    leaves = nnx.to_flat_state(nnx.state(unet, nnx.Param))
    assert sum(int(np.prod(v.get_value().shape)) for _, v in leaves) == 865_910_724


# stabilityai/stable-diffusion-2-base unet/config.json as published (diffusers 0.8 era).
SD2_BASE_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.8.0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "use_linear_projection": True,
}


def test_config_keys_classified():
    """The published SD-2-base config parses to sd2_base(); every key diffusers 0.42's
    UNet2DConditionModel config can hold is used, ignored or checked for a neutral value,
    and diffusers' own full default config parses."""
    assert unet_weights.unet_config_from_diffusers(SD2_BASE_CONFIG) == UNetConfig.sd2_base()
    keys = set(inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters) - {"self"}
    ours = (
        {f.name for f in dataclasses.fields(UNetConfig)}
        | set(unet_weights.UNET_UNSUPPORTED)
        | unet_weights.UNET_IGNORED
    )
    assert keys <= ours, keys - ours
    full = dict(diffusers.UNet2DConditionModel(**TINY).config)  # every key, diffusers' values
    cfg = unet_weights.unet_config_from_diffusers(json.loads(json.dumps(full)))
    assert cfg == UNetConfig(**TINY)


@pytest.fixture
def tiny_unet_dir(tmp_path):
    diffusers.UNet2DConditionModel(**TINY).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"frobnicate_attention": True}, "unknown config field.*frobnicate_attention"),
        ({"class_embed_type": "timestep"}, "unsupported setting.*class_embed_type='timestep'"),
        (
            {"down_block_types": ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]},
            "unsupported down block type.*SimpleCrossAttnDownBlock2D",
        ),
        ({"_class_name": "ControlNetModel"}, "ControlNetModel, not a UNet2DConditionModel"),
        # Checkpoints from a different config: two transformer layers (their tensors are
        # missing), or other widths (shapes differ).
        ({"transformer_layers_per_block": 2}, "does not match the model config.*missing"),
        ({"block_out_channels": [8, 24], "norm_num_groups": 4}, "shape mismatch"),
    ],
)
def test_config_errors(tiny_unet_dir, changes, message):
    path = tiny_unet_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(weights.CheckpointError, match=message):
        weights.load_unet(tiny_unet_dir)


def test_file_errors(tiny_unet_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    assert isinstance(weights.load_unet(tiny_unet_dir), UNet2DCondition)
    with pytest.raises(weights.CheckpointError, match="not found"):
        weights.load_unet(tmp_path / "nowhere")

    weights_file = tiny_unet_dir / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights_file)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors[name] = np.zeros((8, 5), np.float32)
    save_file(tensors, weights_file)
    with pytest.raises(weights.CheckpointError, match=name.replace(".", r"\.")):
        weights.load_unet(tiny_unet_dir)

    weights_file.unlink()
    with pytest.raises(weights.CheckpointError, match="no weights"):
        weights.load_unet(tiny_unet_dir)


def test_residual_count_checked():
    unet = nnx.eval_shape(lambda: UNet2DCondition(UNetConfig(**TINY), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(unet)
    x, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 3, 8))
    call = lambda st, down: nnx.merge(graphdef, st)(x, 1, ctx, down_residuals=down)
    with pytest.raises(ValueError, match="down_residuals has 2 tensors; this UNet has 4"):
        jax.eval_shape(call, state, [x, x])
