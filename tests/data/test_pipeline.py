"""The grain pipeline: epochs over simulated processes, checkpoint/resume, worker processes,
and global arrays on the 8-device CPU mesh."""

import hashlib
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from segsr_jax.data import pipeline as P
from segsr_jax.data import synthetic as S
from segsr_jax.data.degradations import DegradationConfig
from segsr_jax.data.transforms import CropConfig, RandomCrop

SOURCE = S.SyntheticSource(12, S.SceneConfig(height=40, width=48, num_classes=6), seed=3)


def _config(**kw):
    base = dict(global_batch_size=4, seed=5, crop=CropConfig(size=32), prefetch_batches=0)
    return P.PipelineConfig(**{**base, **kw})


def _examples(batches):
    """Batches -> {index: digest of (hr, lq, label)}, asserting no index repeats."""
    out = {}
    for batch in batches:
        for i, idx in enumerate(batch["index"]):
            digest = hashlib.sha1(b"".join(batch[k][i].tobytes() for k in ("hr", "lq", "label")))
            assert int(idx) not in out, f"record {idx} seen twice in one epoch"
            out[int(idx)] = digest.hexdigest()
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_the_documented_layout():
    batch = next(iter(P.make_dataset(SOURCE, _config())))
    assert batch["hr"].shape == (4, 32, 32, 3) and batch["hr"].dtype == np.uint8
    assert batch["lq"].shape == (4, 8, 8, 3) and batch["lq"].dtype == np.uint8
    assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == np.uint8
    assert batch["index"].shape == (4,)


def test_every_record_seen_once_per_epoch_across_two_processes():
    cfg = _config(num_epochs=1, drop_remainder=False)
    single = _examples(P.make_dataset(SOURCE, cfg, shard_index=0, shard_count=1))
    assert sorted(single) == list(range(len(SOURCE)))
    shards = [_examples(P.make_dataset(SOURCE, cfg, shard_index=p, shard_count=2)) for p in (0, 1)]
    assert not shards[0].keys() & shards[1].keys()
    # The two processes split one global stream: same records, same crops, same degradations.
    assert {**shards[0], **shards[1]} == single


def test_each_epoch_is_a_new_order_and_covers_every_record():
    cfg = _config(num_epochs=2, global_batch_size=2, drop_remainder=False)
    indices = np.concatenate(
        [b["index"] for b in P.make_dataset(SOURCE, cfg, shard_index=0, shard_count=1)]
    )
    first, second = indices[:12], indices[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert list(first) != list(second)


def test_crop_keeps_image_and_label_aligned_through_flips_and_transposes():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    element = {"hr": hr, "label": hr[..., 0] // 32, "index": 0}
    crop = RandomCrop(CropConfig(size=32, rot90=True))
    outs = [crop.random_map(element, np.random.default_rng(s)) for s in range(16)]
    for out in outs:
        assert out["hr"].shape == (32, 32, 3) and out["label"].shape == (32, 32)
        np.testing.assert_array_equal(out["label"], out["hr"][..., 0] // 32)
    assert len({out["hr"].tobytes() for out in outs}) == 16  # offsets and flips vary


def test_random_resize_enlarges_small_images_and_labels_stay_categorical():
    hr = np.zeros((20, 24, 3), np.uint8)
    label = np.zeros((20, 24), np.uint8)
    label[:, 12:] = 255  # the ignore id must survive resizing (nearest, never blended)
    element = {"hr": hr, "label": label, "index": 0}
    crop = RandomCrop(CropConfig(size=32, resize_range=(0.5, 2.0), min_size=16))
    for seed in range(8):
        out = crop.random_map(element, np.random.default_rng(seed))
        assert out["hr"].shape == (32, 32, 3) and set(np.unique(out["label"])) <= {0, 255}
    with pytest.raises(ValueError, match="smaller than the crop"):
        RandomCrop(CropConfig(size=32)).random_map(element, np.random.default_rng(0))


class _UnevenSource:
    """Record 2 is too small for the crop, record 4 is corrupt (None)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 4:
            return None
        size = 16 if i == 2 else 32
        return {"hr": np.full((size, size, 3), i, np.uint8), "index": np.int64(i)}


def test_small_and_corrupt_records_are_dropped():
    cfg = _config(num_epochs=1, drop_remainder=False, global_batch_size=2)
    seen = [
        int(i)
        for b in P.make_dataset(_UnevenSource(), cfg, shard_index=0, shard_count=1)
        for i in b["index"]
    ]
    assert sorted(seen) == [0, 1, 3, 5]


def test_resume_from_saved_state_equals_uninterrupted_stream():
    cfg = _config(prefetch_batches=2)  # the thread prefetch must checkpoint too
    it = iter(P.make_dataset(SOURCE, cfg, shard_index=1, shard_count=2))
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 5)  # crosses the epoch boundary (6 records per process, 2 per batch)
    resumed = iter(P.make_dataset(SOURCE, cfg, shard_index=1, shard_count=2))
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 5), expected)


def test_worker_processes_give_the_same_examples_and_resume():
    # Worker mode batches each worker's share separately, so batches differ from the single
    # process mode, but the set of examples (and every crop and degradation) is the same.
    plain = _examples(P.make_dataset(SOURCE, _config(num_epochs=1, drop_remainder=False)))
    cfg = _config(num_epochs=1, drop_remainder=False, num_workers=2, prefetch_batches=1)
    it = iter(P.make_dataset(SOURCE, cfg))
    head = _take(it, 2)
    state = it.get_state()
    tail = list(it)
    assert _examples(head + tail) == plain
    resumed = iter(P.make_dataset(SOURCE, cfg))
    resumed.set_state(state)
    _assert_batches_equal(list(resumed), tail)


def test_global_arrays_from_host_local_batches():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    batch = next(iter(P.make_dataset(SOURCE, _config(global_batch_size=8))))
    arrays = P.to_global_arrays(batch, mesh, PartitionSpec(("data", "fsdp")))
    for key, value in arrays.items():
        assert value.shape == batch[key].shape
        assert value.sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(value), batch[key])
    # Each device holds one example: the leading dim is split 8 ways.
    assert {s.data.shape for s in arrays["hr"].addressable_shards} == {(1, 32, 32, 3)}


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of scale"):
        CropConfig(size=30, scale=4)
    with pytest.raises(ValueError, match="scale"):
        P.PipelineConfig(crop=CropConfig(size=32, scale=2), degradation=DegradationConfig(scale=4))
    with pytest.raises(ValueError, match="does not split"):
        P.make_dataset(SOURCE, _config(global_batch_size=3), shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        P.make_dataset(SOURCE, _config(), shard_index=2, shard_count=2)
