"""Real Orbax round trips of model checkpoints, and the errors for mismatched ones."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from segsr_jax import checkpoint
from segsr_jax.models.segdm import SegDM, SegDMConfig

CFG = SegDMConfig(
    num_classes=3,
    embed_dim=4,
    feat_channels=2,
    cond_channels=2,
    hidden_channels=8,
    num_blocks=1,
    attention_blocks=(),
    num_heads=2,
    norm_groups=4,
)


def _build(cfg_dict):
    return SegDM(
        SegDMConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict["segdm"].items()}
        ),
        rngs=nnx.Rngs(0),
    )


def _leaves(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))


def test_round_trip_is_bitwise(tmp_path):
    model = SegDM(CFG, rngs=nnx.Rngs(7))  # different init from _build's Rngs(0)
    checkpoint.save_model(tmp_path / "ck", model, {"segdm": dataclasses.asdict(CFG)})
    restored, cfg = checkpoint.restore_model(tmp_path / "ck", _build)
    assert cfg["format"] == checkpoint.FORMAT
    for a, b in zip(_leaves(model), _leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_latest_step_is_restored(tmp_path):
    m1, m2 = SegDM(CFG, rngs=nnx.Rngs(1)), SegDM(CFG, rngs=nnx.Rngs(2))
    checkpoint.save_model(tmp_path, m1, {"segdm": dataclasses.asdict(CFG)}, step=1)
    checkpoint.save_model(tmp_path, m2, {"segdm": dataclasses.asdict(CFG)}, step=5)
    restored, _ = checkpoint.restore_model(tmp_path, _build)
    np.testing.assert_array_equal(_leaves(restored)[0], _leaves(m2)[0])
    restored1, _ = checkpoint.restore_model(tmp_path, _build, step=1)
    np.testing.assert_array_equal(_leaves(restored1)[0], _leaves(m1)[0])


def test_config_that_does_not_match_params_is_refused(tmp_path):
    checkpoint.save_model(
        tmp_path, SegDM(CFG, rngs=nnx.Rngs(1)), {"segdm": dataclasses.asdict(CFG)}
    )
    wider = lambda cfg: _build({"segdm": dict(cfg["segdm"], hidden_channels=16)})
    want = r"blocks/0/conv1/kernel: saved \(3, 3, 8, 8\), model \(3, 3, 16, 16\)"
    with pytest.raises(checkpoint.CheckpointMismatchError, match=want):
        checkpoint.restore_model(tmp_path, wider)


def test_missing_and_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint.read_checkpoint_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        checkpoint.read_checkpoint_config(tmp_path)
    # A finished Orbax step whose config is not ours.
    checkpoint.save_model(tmp_path, SegDM(CFG, rngs=nnx.Rngs(1)), {})
    meta = tmp_path / "0" / "config" / "metadata"
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="not a segsr_jax checkpoint"):
        checkpoint.read_checkpoint_config(tmp_path)
