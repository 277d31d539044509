"""``python -m segsr_jax.sample --fsdp N`` / ``Restorer.from_checkpoint(fsdp=N)``: the weights
are restored straight into FSDP shards and images come out as with replicated weights."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec
from skimage import data

from segsr_jax import parallel, sample
from segsr_jax.inference import Restorer
from tests.test_sample_cli import ckpt  # noqa: F401  (the module's tiny checkpoint fixture)

# The tiny model's kernels are below FSDP_RULES.min_size: shard them all for the test.
RULES = parallel.ShardingRules(
    param_axes=parallel.FSDP_RULES.param_axes,
    logical_rules=parallel.FSDP_RULES.logical_rules,
    min_size=0,
)


def test_fsdp_restorer_shards_the_weights_and_restores_like_replicated(ckpt):  # noqa: F811
    lq = data.astronaut()[::16, ::16][:24]
    plain = Restorer.from_checkpoint(ckpt)
    sharded = Restorer.from_checkpoint(ckpt, fsdp=4, rules=RULES)
    assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 4}
    import jax

    specs = [x.sharding.spec for x in jax.tree.leaves(sharded.state)]
    assert sum("fsdp" in str(s) for s in specs) >= 20
    opts = plain.options(steps=2)
    for n in (1, 2):  # 1: replicated over the data axis; 2: split over it
        want, _ = plain.restore_batch([lq] * n, (48, 64), opts, seed=3)
        got, _ = sharded.restore_batch([lq] * n, (48, 64), opts, seed=3)
        for (sr_w, lab_w), (sr_g, lab_g) in zip(want, got, strict=True):
            assert np.abs(sr_w.astype(int) - sr_g.astype(int)).max() <= 1
            assert (lab_w == lab_g).mean() > 0.99
    assert all(s != PartitionSpec() for s in specs if "fsdp" in str(s))


def test_fsdp_flag_must_divide_the_devices(ckpt, tmp_path, capsys):  # noqa: F811
    img = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(data.astronaut()[::16, ::16][:24]).save(img)
    rc = sample.main(
        [
            "--checkpoint",
            str(ckpt),
            "--input",
            str(img),
            "--output",
            str(tmp_path / "out"),
            "--fsdp",
            "3",
            "--cache-dir",
            "",
        ]
    )
    assert rc == 2
    assert "--fsdp 3 does not divide the 8 devices" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_fsdp_flag_below_one_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--fsdp", value])
    assert "--fsdp must be >= 1" in capsys.readouterr().err
