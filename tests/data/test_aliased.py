"""The controlled benchmark's scenes (segsr_jax/data/aliased.py) and the texture statistic
that scores it (segsr_jax/evaluation/texture.py)."""

import numpy as np
import pytest

from segsr_jax import images
from segsr_jax.data.aliased import CLASS_NAMES, CUES, AliasedSource, make_aliased_scene, pattern
from segsr_jax.data.degradations import DegradationConfig, degrade
from segsr_jax.evaluation.texture import (
    FLAT,
    texture_accuracy,
    texture_confusion,
    window_classes,
    window_labels,
)


def _confusions(n=12):
    hr_conf, lq_conf, cue = 0, 0, {c: [] for c in range(4)}
    for i in range(n):
        hr, label = make_aliased_scene((3, i))
        lq = degrade(hr, np.random.default_rng(i), DegradationConfig(scale=4))
        up = images.resize(lq, hr.shape[:2])
        hr_conf = hr_conf + texture_confusion(hr, label)
        lq_conf = lq_conf + texture_confusion(up, label)
        for c in range(4):
            if (label == c).sum() > 200:
                px = up[label == c].astype(np.float64)
                cue[c].append(px.mean(0) - px.mean())  # chroma: colour minus grey level
    return hr_conf, lq_conf, cue


def test_scenes_are_deterministic_and_the_source_serves_them():
    a, la = make_aliased_scene((0, 5))
    b, lb = make_aliased_scene((0, 5))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    ex = AliasedSource(4, seed=0)[1]
    assert ex["hr"].shape == (96, 96, 3) and ex["label"].max() < len(CLASS_NAMES)
    assert AliasedSource(4).class_names == CLASS_NAMES
    with pytest.raises(ValueError, match="class 4"):
        pattern(4, np.random.default_rng(0), 8, 8)


def test_the_degradation_removes_the_texture_but_keeps_the_colour_cue():
    """HR windows show their class's texture; bicubic of the x4 LQ shows none (flat); and the
    LQ region's chroma points the way of its class's cue."""
    hr_conf, lq_conf, cue = _confusions()
    assert texture_accuracy(hr_conf)[0] > 0.9
    assert texture_accuracy(lq_conf)[0] < 0.05
    assert lq_conf[:, -1].sum() > 0.9 * lq_conf.sum()  # the last column counts flat windows
    for c, shifts in cue.items():
        mean = np.mean(shifts, 0)
        cos = mean @ CUES[c] / (np.linalg.norm(mean) * np.linalg.norm(CUES[c]))
        assert cos > 0.8, (c, mean)


def test_window_classes_on_pure_patterns():
    rng = np.random.default_rng(0)
    for c in range(4):
        img = np.repeat((128 + 50 * pattern(c, rng, 32, 32))[..., None], 3, -1).astype(np.uint8)
        assert (window_classes(img) == c).all(), c
        if c in (0, 1):  # transposing swaps horizontal and vertical stripes
            assert (window_classes(img.transpose(1, 0, 2)) == 1 - c).all()
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert (window_classes(flat) == FLAT).all()


def test_only_windows_inside_one_region_are_scored():
    label = np.zeros((16, 24), np.uint8)
    label[:, 12:] = 1  # the middle window straddles the border
    np.testing.assert_array_equal(window_labels(label), [[0, 255, 1], [0, 255, 1]])
    img = np.repeat((128 + 50 * pattern(1, np.random.default_rng(0), 16, 24))[..., None], 3, -1)
    conf = texture_confusion(img.astype(np.uint8), label)
    assert conf.sum() == 4 and conf[1, 1] == 2 and conf[0, 1] == 2
    acc, per_class = texture_accuracy(conf)
    assert acc == 0.5 and per_class.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_the_aliased_config_trains_on_these_scenes():
    from configs import aliased
    from segsr_jax.training.run_setup import make_source

    c = aliased.get_config("joint")
    src = make_source(c.data, len(CLASS_NAMES))
    assert isinstance(src, AliasedSource) and len(src) == c.data.num_examples
    assert tuple(c.model["class_names"]) == CLASS_NAMES
    assert c.init_from == "runs/aliased/seg/checkpoints" and c.num_steps == aliased.STEPS["joint"]
