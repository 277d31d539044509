"""Training with FSDP and validation on, in-process on the 8-device mesh: the sampler takes
the FSDP-sharded EMA / frozen parameters as they lie (it used to stop the run at its first
validation with "Sharding passed to jit does not match"), a grid is written at every step,
and a resumed run continues and validates again. The run also stores its frozen weights in
bfloat16 (``train.frozen_dtype``, what the SD-2 configs use). Other FSDP widths and float32
weights in the sampler: ``tests/diffusion/test_fsdp_sampling.py``."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from segsr_jax import train
from segsr_jax.training import checkpointer
from tests.training.tiny_train_config import get_config

FSDP = 2  # data 4 x fsdp 2 on the 8-device mesh


def _events(workdir, event):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _config(init_checkpoint, fsdp: int, steps: int):
    c = get_config("joint")
    c.train.frozen_dtype = "bfloat16"
    c.init_from = str(init_checkpoint)
    c.num_steps = steps
    c.mesh.fsdp = fsdp
    c.sample.every = 1  # a validation grid after every step
    c.checkpoint.every = 1
    return c


def _grids(workdir):
    return sorted((workdir / "samples").glob("samples_step*.png"))


def test_fsdp_training_validates_every_step_and_resumes(tmp_path, init_checkpoint, capsys):
    assert train.train_and_evaluate(_config(init_checkpoint, FSDP, 1), str(tmp_path)) == 0
    assert f"'fsdp': {FSDP}}}" in capsys.readouterr().out  # the mesh really is FSDP
    assert _events(tmp_path, "compile_sampler")
    assert len(_grids(tmp_path)) == 1
    # The saved parameters are sharded over 'fsdp' in the run (the checkpoint restores into
    # the same layout); a rerun with more steps resumes at step 1 and validates again.
    assert train.train_and_evaluate(_config(init_checkpoint, FSDP, 2), str(tmp_path)) == 0
    assert [r["step"] for r in _events(tmp_path, "resume")] == [1]
    assert [r["step"] for r in _events(tmp_path, "train")] == [1, 2]
    grids = _grids(tmp_path)
    assert len(grids) == 2
    for png in grids:
        grid = np.asarray(Image.open(png))
        assert grid.shape == (8 * 32, 4 * 32, 3)
        sr = grid[:, 32:64].astype(np.float32)
        assert np.isfinite(sr).all() and sr.std() > 1.0  # an image, not a blank
    steps = checkpointer.TrainCheckpointer(
        tmp_path / "checkpoints", checkpointer.CheckpointOptions()
    ).all_steps()
    assert max(steps) == 2
    # bfloat16 storage: frozen matrices bf16, frozen vectors and all trainable params float32.
    handler = ocp.StandardCheckpointHandler
    with ocp.CheckpointManager(
        tmp_path / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"params": handler(), "ema_params": handler()},
    ) as mgr:
        meta = mgr.item_metadata(2)
    params, ema = (getattr(meta[k], "tree", meta[k]) for k in ("params", "ema_params"))
    ema_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(ema)[0]}
    dtypes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        kind = (
            "trainable" if path in ema_paths else ("matrix" if len(leaf.shape) >= 2 else "vector")
        )
        dtypes.setdefault(kind, set()).add(np.dtype(leaf.dtype).name)
    assert dtypes == {"trainable": {"float32"}, "matrix": {"bfloat16"}, "vector": {"float32"}}
    assert jax.device_count() == 8
