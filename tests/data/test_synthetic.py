"""Synthetic labelled scenes: deterministic by seed, labels say which texture is where."""

import numpy as np
import pytest

from segsr_jax.data import synthetic as S

SMALL = S.SceneConfig(height=96, width=128, num_classes=16, regions=(3, 6))


def test_same_seed_same_scene_different_seed_different_scene():
    a_img, a_lab = S.make_scene((3, 1), SMALL)
    b_img, b_lab = S.make_scene((3, 1), SMALL)
    c_img, _ = S.make_scene((3, 2), SMALL)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)


def test_shapes_dtypes_and_label_range():
    cfg = S.SceneConfig(height=40, width=56, num_classes=5)
    for seed in range(10):
        image, label = S.make_scene(seed, cfg)
        assert image.shape == (40, 56, 3) and image.dtype == np.uint8
        assert label.shape == (40, 56) and label.dtype == np.uint8
        assert label.max() < 5


def test_scenes_have_several_regions_of_connected_classes():
    counts = [len(np.unique(S.make_scene(seed, SMALL)[1])) for seed in range(12)]
    assert min(counts) >= 1 and np.mean(counts) >= 2.5
    # Warped Voronoi cells are blobs, not salt and pepper: label changes are rare.
    _, label = S.make_scene(0, SMALL)
    changes = (label[1:] != label[:-1]).mean() + (label[:, 1:] != label[:, :-1]).mean()
    assert changes < 0.1


def test_classes_are_distinct_textures():
    names = S.class_names(16)
    assert len(set(names)) == 16 and names[:3] == ("brick", "grass", "gravel")
    # Per-class signature: mean colour and gradient energy. No two classes may share one.
    sigs = []
    for name in names:
        tex = S._texture(name).astype(np.float32)
        grad = np.abs(np.diff(tex, axis=0)).mean() + np.abs(np.diff(tex, axis=1)).mean()
        sigs.append(np.concatenate([tex.reshape(-1, 3).mean(0), [grad * 4]]))
    sigs = np.array(sigs)
    dist = np.linalg.norm(sigs[:, None] - sigs[None], axis=-1) + np.eye(16) * 1e9
    assert dist.min() > 8


def test_region_pixels_come_from_their_class_texture():
    image, label = S.make_scene(5, SMALL)
    for c in np.unique(label):
        mask = label == c
        tex = S._texture(S.CLASS_NAMES[c]).reshape(-1, 3)
        # Every pixel of region c is a colour that occurs in texture c.
        palette = {tuple(p) for p in np.unique(tex, axis=0)}
        sample = image[mask][:: max(1, mask.sum() // 200)]
        assert all(tuple(p) in palette for p in sample), S.CLASS_NAMES[c]


def test_source_feeds_examples_like_the_file_sources():
    source = S.SyntheticSource(4, S.SceneConfig(height=32, width=32, num_classes=3), seed=7)
    assert len(source) == 4 and source.class_names == ("brick", "grass", "gravel")
    ex = source[2]
    assert set(ex) == {"hr", "label", "index"} and ex["index"] == 2
    np.testing.assert_array_equal(ex["hr"], S.make_scene((7, 2), source.config)[0])


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_classes"):
        S.SceneConfig(num_classes=17)
    with pytest.raises(ValueError, match="regions"):
        S.SceneConfig(regions=(4, 2))
