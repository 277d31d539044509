"""AutoencoderKL: parity with diffusers through ``weights.load_vae``, full-size parameter count,
tiled encode/decode, bfloat16, and loader errors."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from segsr_jax import weights
from segsr_jax.models.vae import AutoencoderKL, VAEConfig
from segsr_jax.models.vae_tiling import tiled_apply, tiled_decode, tiled_encode
from segsr_jax.tiles import tile_starts
from segsr_jax.weights.checkpoint_files import CheckpointError
from tests.torch_reference import assert_close_rel, nchw_to_nhwc, nhwc_to_nchw, perturb_, torch

diffusers = pytest.importorskip("diffusers")


def _reference(seed=0, **kw):
    n = len(kw["block_out_channels"])
    kw.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
    kw.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
    return perturb_(diffusers.AutoencoderKL(**kw), seed=seed)


def _state_dict(ref):
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _write_folder(folder, ref, tensors):
    """A diffusers-style component folder with ``tensors`` as its safetensors weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _old_attention_names(tensors, as_conv):
    """Rename to pre-0.14 diffusers attention names, optionally as 1x1 conv kernels."""
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in tensors.items():
        for new, old in new_to_old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if as_conv and v.ndim == 2:
                    v = v[:, :, None, None]
        out[k] = v
    return out


# (reference kwargs, image [H, W], how the checkpoint is written)
PARITY_CASES = [
    (dict(block_out_channels=(32, 64), layers_per_block=1), (32, 32), "pipeline"),
    (
        dict(
            block_out_channels=(16, 32, 32),
            layers_per_block=2,
            norm_num_groups=8,
            latent_channels=3,
        ),
        (16, 24),
        "bin",
    ),
    (
        dict(
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, scaling_factor=0.5
        ),
        (16, 24),
        "old_names_conv",
    ),
    (
        dict(
            block_out_channels=(16, 32),
            layers_per_block=2,
            norm_num_groups=8,
            in_channels=1,
            out_channels=2,
            use_quant_conv=False,
            mid_block_add_attention=False,
            shift_factor=0.1,
        ),
        (16, 16),
        "safetensors",
    ),
]


@pytest.mark.parametrize("kw,hw,how", PARITY_CASES, ids=[c[2] for c in PARITY_CASES])
def test_vae_matches_diffusers(kw, hw, how, tmp_path, np_rng):
    ref = _reference(seed=len(how), **kw)
    if how == "pipeline":  # a whole pipeline folder: load_vae finds vae/
        ref.save_pretrained(tmp_path / "vae")
    elif how == "bin":
        ref.save_pretrained(tmp_path, safe_serialization=False)
        assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    elif how == "old_names_conv":
        _write_folder(tmp_path, ref, _old_attention_names(_state_dict(ref), as_conv=True))
    else:
        ref.save_pretrained(tmp_path)
    vae = weights.load_vae(tmp_path)
    cfg = vae.config

    x = np_rng.uniform(-1, 1, (2, *hw, cfg.in_channels)).astype(np.float32)
    f = cfg.downscale_factor
    z = np_rng.standard_normal((2, hw[0] // f, hw[1] // f, cfg.latent_channels)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(nhwc_to_nchw(x)).latent_dist
        want_x = nchw_to_nhwc(ref.decode(nhwc_to_nchw(z)).sample)
    mean, logvar = vae.encode(jnp.asarray(x))
    assert mean.shape == (2, hw[0] // f, hw[1] // f, cfg.latent_channels)
    assert_close_rel(mean, nchw_to_nhwc(post.mean), what="mean")
    assert_close_rel(logvar, nchw_to_nhwc(post.logvar), what="logvar")
    assert_close_rel(vae.decode(jnp.asarray(z)), want_x, what="decode")

    # Scaled helpers: (z - shift) * scale, and back.
    shift = kw.get("shift_factor") or 0.0
    np.testing.assert_allclose(
        vae.encode_latent(jnp.asarray(x)),
        (np.asarray(mean) - shift) * cfg.scaling_factor,
        rtol=1e-6,
    )
    z_scaled = (z - shift) * cfg.scaling_factor
    assert_close_rel(vae.decode_latent(jnp.asarray(z_scaled)), want_x, what="decode_latent")
    sample = vae.encode_latent(jnp.asarray(x), key=jax.random.key(0))
    noise = (np.asarray(sample) / cfg.scaling_factor + shift - mean) / np.exp(0.5 * logvar)
    assert 0.5 < noise.std() < 1.5  # a draw from the posterior, not the mean


def test_old_linear_attention_names_load(tmp_path):
    ref = _reference(block_out_channels=(16, 32), norm_num_groups=8)
    sd = _state_dict(ref)
    vae = weights.load_vae(_write_folder(tmp_path, ref, _old_attention_names(sd, as_conv=False)))
    got = np.asarray(vae.encoder.mid_block.attentions[0].to_out[0].kernel.get_value())
    np.testing.assert_array_equal(got, sd["encoder.mid_block.attentions.0.to_out.0.weight"].T)


def test_sd2_parameter_count():
    vae = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.sd2(), rngs=nnx.Rngs(0)))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    assert n == 83_653_863
    assert VAEConfig.sd2().downscale_factor == 8


# ---------------------------------------------------------------- tiling


@pytest.fixture(scope="module")
def small_vae_folder(tmp_path_factory):
    """A perturbed diffusers VAE checkpoint (f=2), shared by the tiling and bfloat16 tests."""
    folder = tmp_path_factory.mktemp("vae")
    _reference(seed=7, block_out_channels=(32, 64), norm_num_groups=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_vae(small_vae_folder):
    return weights.load_vae(small_vae_folder)


# Tiling tests share these shapes, so the untiled computations compile once.
IMAGE_SHAPE = (1, 48, 48, 3)
LATENT_SHAPE = (1, 24, 24, 4)


def test_tile_layout():
    assert tile_starts(20, 32, 8) == [0]
    assert tile_starts(53, 16, 5) == [0, 9, 19, 28, 37]  # first at 0, last flush with the end
    starts = tile_starts(104, 32, 8, align=8)
    assert starts[0] == 0 and starts[-1] == 104 - 32
    assert all(s % 8 == 0 for s in starts)
    assert max(np.diff(starts)) <= 32 - 8  # every overlap >= the requested one


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
def test_blending_is_exact_for_pointwise_functions(ramp, np_rng):
    """Weights sum to one everywhere and tiles land where they came from: with a function that
    has no spatial context, tiled == untiled up to rounding, for up- and down-scaling too."""
    x = jnp.asarray(np_rng.standard_normal((2, 36, 52, 3)).astype(np.float32))
    up = lambda t: jnp.repeat(jnp.repeat(jnp.tanh(t), 4, axis=1), 4, axis=2)
    down = lambda t: t[:, ::4, ::4] * 2.0
    np.testing.assert_allclose(tiled_apply(up, x, 16, 5, num=4, ramp=ramp), up(x), atol=1e-6)
    np.testing.assert_allclose(
        tiled_apply(down, x, 16, 8, den=4, align=4, ramp=ramp, tiles_per_step=2), down(x), atol=1e-6
    )


def test_one_tile_equals_untiled_exactly(small_vae, np_rng):
    x = jnp.asarray(np_rng.uniform(-1, 1, IMAGE_SHAPE).astype(np.float32))
    mean, logvar = small_vae.encode(x)
    t_mean, t_logvar = tiled_encode(small_vae, x, 48, 8)
    np.testing.assert_array_equal(t_mean, mean)
    np.testing.assert_array_equal(t_logvar, logvar)
    z = jnp.asarray(np_rng.standard_normal(LATENT_SHAPE).astype(np.float32))
    np.testing.assert_array_equal(tiled_decode(small_vae, z, 32, 4), small_vae.decode(z))


def test_tiled_encode_is_the_documented_blend(small_vae, np_rng):
    """Two tiles side by side, blended by hand: 16-latent tiles at latent x = 0 and 8, a linear
    ramp across the 8 shared columns."""
    x = jnp.asarray(np_rng.uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32))
    mean, _ = tiled_encode(small_vae, x, 32, 16)
    left, _ = small_vae.encode(x[:, :, :32])
    right, _ = small_vae.encode(x[:, :, 16:])
    up = ((np.arange(8) + 0.5) / 8)[None, None, :, None]
    want = np.concatenate(
        [left[:, :, :8], left[:, :, 8:] * (1 - up) + right[:, :, :8] * up, right[:, :, 8:]], axis=2
    )
    np.testing.assert_allclose(mean, want, atol=1e-5)


# Max abs error relative to output scale on this perturbed random VAE with noise inputs,
# measured over three seeds: encode 0.11-0.16, decode 0.13-0.28; bounded with margin. A random
# VAE is far more sensitive to per-tile GroupNorm statistics than a trained one.
ENCODE_TILE_TOL = 0.25
DECODE_TILE_TOL = 0.4


def test_overlapping_tiles_stay_close_to_untiled(small_vae, np_rng):
    x = jnp.asarray(np_rng.uniform(-1, 1, IMAGE_SHAPE).astype(np.float32))
    mean, logvar = small_vae.encode(x)
    t_mean, t_logvar = tiled_encode(small_vae, x, 32, 16)  # 2x2 tiles of 16x16 latents
    assert_close_rel(t_mean, mean, tol=ENCODE_TILE_TOL, what="tiled mean")
    assert_close_rel(t_logvar, logvar, tol=ENCODE_TILE_TOL, what="tiled logvar")
    assert not np.allclose(t_mean, mean, atol=1e-4)  # really tiled

    z = jnp.asarray(np_rng.standard_normal(LATENT_SHAPE).astype(np.float32))
    x_full = small_vae.decode(z)
    x_tiled = tiled_decode(small_vae, z, 16, 8, ramp="cosine")
    assert_close_rel(x_tiled, x_full, tol=DECODE_TILE_TOL, what="tiled decode")
    assert not np.allclose(x_tiled, x_full, atol=1e-4)


def test_tiled_shapes_for_sizes_that_are_not_tile_multiples(small_vae, np_rng):
    x = jnp.asarray(np_rng.uniform(-1, 1, (2, 38, 54, 3)).astype(np.float32))
    mean, logvar = tiled_encode(small_vae, x, 16, 4, tiles_per_step=3)
    assert mean.shape == logvar.shape == (2, 19, 27, 4)
    z = jnp.asarray(np_rng.standard_normal((2, 11, 13, 4)).astype(np.float32))
    assert tiled_decode(small_vae, z, 8, 3).shape == (2, 22, 26, 3)
    with pytest.raises(ValueError, match="multiples of the downscale factor"):
        tiled_encode(small_vae, x[:, :37], 16, 4)
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(small_vae, z, 8, 8)


def test_tiled_decode_compiles_once_per_shape(small_vae, np_rng):
    graphdef, state = nnx.split(small_vae)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def decode_fn(state, z):
        return tiled_decode(nnx.merge(graphdef, state), z, 8, 2)

    z1, z2 = (
        jnp.asarray(np_rng.standard_normal((1, 12, 10, 4)).astype(np.float32)) for _ in range(2)
    )
    out1 = decode_fn(state, z1)
    out2 = decode_fn(state, z2)
    assert out1.shape == out2.shape == (1, 24, 20, 3)
    assert_close_rel(out2, tiled_decode(small_vae, z2, 8, 2), tol=1e-5)


# ---------------------------------------------------------------- bfloat16 and errors

BF16_DECODE_TOL = 5e-2  # measured 0.015-0.023 over three seeds (max abs err / output scale)


def test_bfloat16_decode_close_to_float32(small_vae, small_vae_folder, np_rng):
    bf16 = weights.load_vae(small_vae_folder, dtype=jnp.bfloat16)
    assert bf16.decoder.conv_in.kernel.get_value().dtype == jnp.float32  # params stay float32
    z = jnp.asarray(np_rng.standard_normal(LATENT_SHAPE).astype(np.float32))
    out = bf16.decode(z)
    assert out.dtype == jnp.float32
    assert_close_rel(out, small_vae.decode(z), tol=BF16_DECODE_TOL, what="bf16 decode")


def test_loader_errors(tmp_path):
    ref = _reference(block_out_channels=(16, 32), norm_num_groups=8)
    ref.save_pretrained(tmp_path / "ok")
    config = dict(ref.config)
    sd = _state_dict(ref)

    bad = _write_folder(tmp_path / "unknown", ref, sd)
    (bad / "config.json").write_text(json.dumps(dict(config, frobnicate=3)))
    with pytest.raises(CheckpointError, match="frobnicate"):
        weights.load_vae(bad)

    bad = _write_folder(tmp_path / "latents_mean", ref, sd)
    (bad / "config.json").write_text(json.dumps(dict(config, latents_mean=[0.1] * 4)))
    with pytest.raises(CheckpointError, match="latents_mean"):
        weights.load_vae(bad)

    bad = _write_folder(tmp_path / "act", ref, sd)
    (bad / "config.json").write_text(json.dumps(dict(config, act_fn="relu")))
    with pytest.raises(CheckpointError, match="act_fn"):
        weights.load_vae(bad)

    missing = dict(sd)
    del missing["decoder.up_blocks.1.resnets.1.norm2.bias"]
    with pytest.raises(CheckpointError, match=r"decoder\.up_blocks\.1\.resnets\.1\.norm2\.bias"):
        weights.load_vae(_write_folder(tmp_path / "missing", ref, missing))

    wrong = dict(sd)
    wrong["encoder.conv_out.weight"] = wrong["encoder.conv_out.weight"][:4]
    with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.weight"):
        weights.load_vae(_write_folder(tmp_path / "wrong", ref, wrong))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no weights"):
        weights.load_vae(no_weights)
    with pytest.raises(CheckpointError, match="not found"):
        weights.load_vae(tmp_path / "nowhere")
