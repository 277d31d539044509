"""CLIP text encoder and tokenizer: parity with transformers, loaded through `segsr_jax.weights`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax import weights
from segsr_jax.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from segsr_jax.weights.text_encoder import text_config_from_transformers
from tests.torch_reference import assert_close_rel, perturb_, torch

transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# Small configs: non-default head counts, both activations, different eps and lengths.
# eos_token_id 2 exercises the legacy "argmax id" pooling that SD-2's config selects.
CONFIGS = {
    "gelu_h2": dict(
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=37,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        max_position_embeddings=12,
        vocab_size=99,
        bos_token_id=97,
        eos_token_id=98,
        pad_token_id=0,
    ),
    "quick_h4": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=48,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-6,
        max_position_embeddings=12,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "gelu_h3": dict(
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=64,
        hidden_act="gelu",
        layer_norm_eps=1e-3,
        max_position_embeddings=16,
        vocab_size=77,
        bos_token_id=75,
        eos_token_id=76,
        pad_token_id=0,
    ),
}


def _reference(name, seed=0):
    cfg = transformers.CLIPTextConfig(**CONFIGS[name])
    return perturb_(transformers.CLIPTextModel(cfg), seed=seed, scale=0.1)


def _input_ids(cfg, batch, length, rng):
    """Rows ``BOS, random tokens, EOS, padding`` with different prompt lengths; the random
    tokens avoid the special ids and the largest id (so both pooling rules find EOS)."""
    ids = rng.integers(3, cfg["vocab_size"] - 3, (batch, length))
    ids[:, 0] = cfg["bos_token_id"]
    for row, n in enumerate(rng.integers(1, length - 1, batch)):
        ids[row, n] = cfg["eos_token_id"]
        ids[row, n + 1 :] = cfg["pad_token_id"]
    if cfg["eos_token_id"] == 2:  # legacy configs: EOS must be the largest id in its row
        ids[ids == cfg["eos_token_id"]] = cfg["vocab_size"] - 1
    return ids


def _save_v4_layout(model, folder):
    """What transformers 4.x wrote: ``text_model.``-prefixed keys plus the position_ids buffer."""
    model.config.save_pretrained(folder)
    sd = {f"text_model.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
    n = model.config.max_position_embeddings
    sd["text_model.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
    safetensors_numpy.save_file(sd, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "name,layout", [("gelu_h2", "component"), ("quick_h4", "pipeline"), ("gelu_h3", "v4_prefix")]
)
def test_matches_transformers(name, layout, tmp_path, np_rng):
    ref = _reference(name, seed=len(name))
    if layout == "component":
        ref.save_pretrained(tmp_path)
        te = weights.load_text_encoder(tmp_path)
    elif layout == "pipeline":
        ref.save_pretrained(tmp_path / "text_encoder")
        te = weights.load_text_encoder(tmp_path)
    else:
        _save_v4_layout(ref, tmp_path)
        te = weights.load_text_encoder(tmp_path)
    cfg = CONFIGS[name]
    # A sequence shorter than max_position_embeddings checks the position slice.
    length = cfg["max_position_embeddings"] - (3 if layout == "v4_prefix" else 0)
    ids = _input_ids(cfg, 3, length, np_rng)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    assert len(want.hidden_states) == cfg["num_hidden_layers"] + 1

    last, hidden = te(jnp.asarray(ids), output_hidden_states=True)
    assert len(hidden) == len(want.hidden_states)
    assert_close_rel(last, want.last_hidden_state.numpy(), what="last_hidden_state")
    assert_close_rel(te(jnp.asarray(ids)), want.last_hidden_state.numpy(), what="plain call")
    for i in (1, -1):  # first block, and the last block before final_layer_norm
        assert_close_rel(hidden[i], want.hidden_states[i].numpy(), what=f"hidden_states[{i}]")
    assert_close_rel(te.pool(last, jnp.asarray(ids)), want.pooler_output.numpy(), what="pooled")


def test_full_clip_model_folder(tmp_path, np_rng):
    """A CLIPModel checkpoint (nested text_config, vision tower, projections) loads its text
    tower and the vision tensors are skipped."""
    text = CONFIGS["gelu_h2"]
    vision = dict(
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    ref = perturb_(transformers.CLIPModel(cfg), seed=5, scale=0.1)
    ref.save_pretrained(tmp_path)
    te = weights.load_text_encoder(tmp_path)
    ids = _input_ids(text, 2, 12, np_rng)
    with torch.no_grad():
        want = ref.text_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert_close_rel(te(jnp.asarray(ids)), want)


def test_config_parsing():
    # SD-2's text_encoder/config.json as written by transformers 4.25.
    sd2_raw = {
        "_name_or_path": "hf-models/stable-diffusion-v2-base/text_encoder",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "pad_token_id": 1,
        "projection_dim": 512,
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
        "vocab_size": 49408,
    }
    assert text_config_from_transformers(sd2_raw) == CLIPTextConfig.sd2()
    # transformers 5 writes every key; defaults must agree with ours.
    assert (
        text_config_from_transformers(transformers.CLIPTextConfig().to_dict()) == CLIPTextConfig()
    )
    full = transformers.CLIPConfig(text_config=dict(hidden_size=64, num_attention_heads=4))
    assert text_config_from_transformers(full.to_dict()) == CLIPTextConfig(
        hidden_size=64, num_attention_heads=4
    )
    legacy = {
        "model_type": "clip",
        "text_config": {"hidden_size": 64},
        "text_config_dict": {"hidden_size": 96, "num_attention_heads": 4},
    }
    assert text_config_from_transformers(legacy).hidden_size == 96

    with pytest.raises(weights.CheckpointError, match="use_attention_mask"):
        text_config_from_transformers(dict(sd2_raw, use_attention_mask=True))
    with pytest.raises(weights.CheckpointError, match="pruned_heads"):
        text_config_from_transformers(dict(sd2_raw, pruned_heads={"0": [1]}))
    with pytest.raises(weights.CheckpointError, match="gelu_new"):
        text_config_from_transformers(dict(sd2_raw, hidden_act="gelu_new"))
    with pytest.raises(weights.CheckpointError, match="bert"):
        text_config_from_transformers(dict(sd2_raw, model_type="bert"))


def test_clear_errors(tmp_path):
    ref = _reference("gelu_h2")
    ref.save_pretrained(tmp_path / "ok")

    folder = tmp_path / "unknown_field"
    ref.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(raw, rotary_base=10000)))
    with pytest.raises(weights.CheckpointError, match="rotary_base"):
        weights.load_text_encoder(folder)

    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(weights.CheckpointError, match="no weights"):
        weights.load_text_encoder(folder)

    folder = tmp_path / "bad_shape"
    ref.config.save_pretrained(folder)
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    sd["encoder.layers.1.mlp.fc1.weight"] = sd["encoder.layers.1.mlp.fc1.weight"][:-1]
    safetensors_numpy.save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(weights.CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        weights.load_text_encoder(folder)

    del sd["encoder.layers.1.mlp.fc1.weight"]
    safetensors_numpy.save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(weights.CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        weights.load_text_encoder(folder)

    with pytest.raises(weights.CheckpointError, match="not found"):
        weights.load_text_encoder(tmp_path / "absent")
    te = weights.load_text_encoder(tmp_path / "ok")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        te(jnp.zeros((1, 13), jnp.int32))


def test_bfloat16_close_to_float32(tmp_path, np_rng):
    _reference("quick_h4", seed=3).save_pretrained(tmp_path)
    ids = jnp.asarray(_input_ids(CONFIGS["quick_h4"], 2, 12, np_rng))
    f32 = weights.load_text_encoder(tmp_path)(ids)
    te16 = weights.load_text_encoder(tmp_path, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(te16)
    # Params stay float32; compute (and the output) is bfloat16, also under jit.
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))
    bf16 = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    assert bf16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits: ~0.4% per rounding, a few roundings per block.
    assert_close_rel(bf16.astype(jnp.float32), np.asarray(f32), tol=3e-2, what="bf16 vs f32")


def test_sd2_parameter_count():
    abstract = nnx.eval_shape(lambda: CLIPTextEncoder(CLIPTextConfig.sd2(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    # transformers counts the same tensors (the position embedding is a parameter; the
    # position_ids buffer is not); build its model on the meta device, without memory.
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                hidden_act="gelu",
            )
        )
    assert ours == sum(p.numel() for p in ref.parameters()) == 340_387_840


# ---------------------------------------------------------------------------------------------
# Tokenizer

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "n</w>")]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _tiny_vocab():
    """A CLIP-style byte-level BPE vocabulary: ``!`` first (id 0, as in CLIP's), single
    characters with and without ``</w>``, the merges' results, then BOS and EOS."""
    tokens = ["!", ","] + list(_LETTERS) + [c + "</w>" for c in "!," + _LETTERS]
    tokens += ["".join(m) for m in _MERGES] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def _write_sd2_style_folder(folder, max_length=12):
    """The files of SD-2's ``tokenizer/``: vocab.json + merges.txt; tokenizer_config.json says
    pad ``<|endoftext|>`` but special_tokens_map.json overrides it with ``!``."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(_tiny_vocab()))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    )
    special = lambda s: {
        "content": s,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": dict(special(BOS), __type="AddedToken"),
                "do_lower_case": True,
                "eos_token": dict(special(EOS), __type="AddedToken"),
                "errors": "replace",
                "model_max_length": max_length,
                "pad_token": EOS,
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": dict(special(EOS), __type="AddedToken"),
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": special(BOS),
                "eos_token": special(EOS),
                "pad_token": "!",
                "unk_token": special(EOS),
            }
        )
    )


def _hf_tokenizer(pad_token, max_length=12):
    return transformers.CLIPTokenizer(
        vocab=_tiny_vocab(), merges=list(_MERGES), pad_token=pad_token, model_max_length=max_length
    )


PROMPTS = ["the cat", "", "The  CAT on, the cat sat on the mat with a hat!!", "Zebra?"]


@pytest.mark.parametrize("layout", ["sd2_pipeline", "saved_pad_eos"])
def test_tokenizer_matches_transformers(layout, tmp_path):
    vocab = _tiny_vocab()
    if layout == "sd2_pipeline":
        _write_sd2_style_folder(tmp_path / "tokenizer")
        pad = "!"
    else:  # transformers 5's save_pretrained (tokenizer.json), SD-1.x style: pad = EOS
        _hf_tokenizer(EOS).save_pretrained(tmp_path)
        pad = EOS
    tok = weights.load_tokenizer(tmp_path)
    assert (tok.max_length, tok.pad_token_id, tok.eos_token_id) == (12, vocab[pad], vocab[EOS])

    got = tok(PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 12)
    # diffusers' StableDiffusionPipeline.encode_prompt tokenizes exactly so.
    ref = _hf_tokenizer(pad)
    want = ref(PROMPTS, padding="max_length", max_length=ref.model_max_length, truncation=True)[
        "input_ids"
    ]
    np.testing.assert_array_equal(got, np.asarray(want))
    # Independently of transformers: BPE merges, padding, and truncation that keeps EOS.
    b, e, p = vocab[BOS], vocab[EOS], vocab[pad]
    np.testing.assert_array_equal(got[0], [b, vocab["the</w>"], vocab["cat</w>"], e] + [p] * 8)
    np.testing.assert_array_equal(got[1], [b, e] + [p] * 10)
    assert got[2, -1] == e and p not in got[2, 1:-1].tolist()
    np.testing.assert_array_equal(tok("the cat"), got[:1])
    assert tok([]).shape == (0, 12)


def test_tokenizer_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.CheckpointError, match="no tokenizer"):
        weights.load_tokenizer(tmp_path / "empty")
    with pytest.raises(weights.CheckpointError, match="not found"):
        weights.load_tokenizer(tmp_path / "absent")
    _write_sd2_style_folder(tmp_path / "no_max")
    cfg = json.loads((tmp_path / "no_max" / "tokenizer_config.json").read_text())
    del cfg["model_max_length"]
    (tmp_path / "no_max" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.CheckpointError, match="model_max_length"):
        weights.load_tokenizer(tmp_path / "no_max")
    _write_sd2_style_folder(tmp_path / "ok")
    with pytest.raises(TypeError, match="strings"):
        weights.load_tokenizer(tmp_path / "ok")([["nested"]])


def _bytes_to_unicode():
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def test_tokenizer_real_clip_vocabulary(tmp_path):
    """With the real CLIP BPE file (shipped in open_clip_torch; skipped when not installed),
    an SD-2-style folder gives the well-known CLIP ids, padded with "!" = 0."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec else None
    if bpe is None or not bpe.is_file():
        pytest.skip("open_clip_torch (CLIP's BPE vocabulary) is not installed")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    folder = tmp_path / "tokenizer"
    _write_sd2_style_folder(folder, max_length=77)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ids = weights.load_tokenizer(tmp_path)(["a photo of a cat", "word " * 100])
    np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 49407, 0])
    assert (ids[0, 8:] == 0).all() and ids.shape == (2, 77)
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and 0 not in ids[1].tolist()
