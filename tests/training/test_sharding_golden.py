"""Golden PartitionSpecs of the ``segsr_sd2`` train state on the 8-device mesh.

Built with ``jax.eval_shape`` (no weights) from ``configs/segsr_sd2.py``; a change of the
sharding rules, the model layout or the optimizer state shows up here as a diff. After a
deliberate change, regenerate with ``SEGSR_UPDATE_GOLDEN=1 pytest tests/training/
test_sharding_golden.py`` and review the JSON diff.
"""

import importlib.util
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from segsr_jax import parallel, train
from segsr_jax.models.segsr import SegSRConfig
from segsr_jax.training import state as state_lib

ROOT = Path(__file__).parents[2]
GOLDEN = Path(__file__).with_name("golden_segsr_sd2_joint_specs.json")


def _config():
    spec = importlib.util.spec_from_file_location("segsr_sd2", ROOT / "configs" / "segsr_sd2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("joint")


def _layout() -> dict:
    config = _config()
    model_cfg = SegSRConfig.from_dict(config.model.to_dict())
    abstract = state_lib.abstract_model(model_cfg, jnp.bfloat16)
    _, params, frozen = state_lib.split_model(abstract, "joint")
    optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(**config.optim))
    abs_state = jax.eval_shape(lambda p: state_lib.init_train_state(p, optimizer, 0), params)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = train.sharding_rules(config.sharding)
    trees = {"state": abs_state, "frozen": frozen}
    shardings = {k: parallel.tree_shardings(v, mesh, rules) for k, v in trees.items()}
    flat = jax.tree_util.tree_flatten_with_path(trees)[0]
    specs = jax.tree.leaves(shardings)
    sharded, replicated, per_device, total = {}, 0, 0, 0
    for (path, leaf), sharding in zip(flat, specs, strict=True):
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        shard = sharding.shard_shape(leaf.shape)
        per_device += math.prod(shard) * leaf.dtype.itemsize
        total += nbytes
        if sharding.spec == jax.sharding.PartitionSpec():
            replicated += 1
        else:
            sharded[parallel.path_str(path)] = [
                list(a) if isinstance(a, tuple) else a for a in sharding.spec
            ]
    return {
        "mesh": dict(mesh.shape),
        "num_sharded": len(sharded),
        "num_replicated": replicated,
        "total_bytes": total,
        "bytes_per_device": per_device,
        "sharded": sharded,
    }


@pytest.fixture(scope="module")
def layout():
    return _layout()


def test_segsr_sd2_partition_specs_match_golden(layout):
    if os.environ.get("SEGSR_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(layout, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert layout["mesh"] == golden["mesh"] == {"data": 2, "fsdp": 4}
    missing = sorted(set(golden["sharded"]) - set(layout["sharded"]))
    extra = sorted(set(layout["sharded"]) - set(golden["sharded"]))
    changed = [
        (k, golden["sharded"][k], layout["sharded"][k])
        for k in sorted(set(golden["sharded"]) & set(layout["sharded"]))
        if golden["sharded"][k] != layout["sharded"][k]
    ]
    assert not (missing or extra or changed), (
        f"sharding changed: {len(missing)} no longer sharded (e.g. {missing[:3]}), "
        f"{len(extra)} newly sharded (e.g. {extra[:3]}), {len(changed)} with other specs "
        f"(e.g. {changed[:3]})"
    )
    assert layout == golden


def test_fsdp_covers_the_big_kernels(layout):
    sharded = layout["sharded"]
    # The UNet and ControlNet kernels, their EMA and both Adam moments split over 'fsdp'.
    for prefix in (
        "frozen/unet/",
        "state/params/controlnet/",
        "state/ema_params/controlnet/",
        "state/opt_state/1/0/mu/controlnet/",
        "state/opt_state/1/0/nu/controlnet/",
    ):
        assert any(k.startswith(prefix) for k in sharded), prefix
    key = "frozen/unet/down_blocks/0/resnets/0/conv1/kernel"
    assert sharded[key] == [None, None, None, "fsdp"]
    # Nothing trainable or frozen outside the rules' modules is sharded.
    assert not [k for k in sharded if "/segdm/" in k or "/vae/" in k or "segformer/" in k]
    # FSDP over 4 cuts per-device bytes well below the replicated total.
    assert layout["bytes_per_device"] < 0.45 * layout["total_bytes"]


def test_segsr_sd2_architecture_is_what_convert_writes():
    """`python -m segsr_jax.convert` composes the model from the pipeline's parts with the
    default SegDM and bridge; the SD-2 config must describe the same architecture, or its
    first stage cannot restore the converted checkpoint (found by scripts/sd2_smoke.py)."""
    import dataclasses

    from segsr_jax.models.seg_encoder import SegFormerConfig
    from segsr_jax.models.text_encoder import CLIPTextConfig
    from segsr_jax.models.unet import UNetConfig
    from segsr_jax.models.vae import VAEConfig

    converted = SegSRConfig.compose(
        vae=VAEConfig.sd2(),
        text=CLIPTextConfig.sd2(),
        unet=UNetConfig.sd2_base(),
        segformer=SegFormerConfig.b5(150),
    )
    configured = SegSRConfig.from_dict(_config().model.to_dict())
    assert dataclasses.replace(configured, class_names=()) == dataclasses.replace(
        converted, class_names=()
    )
