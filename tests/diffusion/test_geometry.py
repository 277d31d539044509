"""Image geometry of a sampling run: output and working sizes, padding, crop."""

import numpy as np
import pytest

from segsr_jax.diffusion import geometry


def test_working_size_enlarges_small_inputs_only():
    assert geometry.working_size((24, 32), 4, 128) == ((96, 128), (512, 683))
    assert geometry.working_size((200, 300), 2, 128) == ((400, 600), (400, 600))
    assert geometry.working_size((3, 3), 0.1, 0) == ((1, 1), (0, 0))


def test_pad_to_multiple_reflects_and_crop_undoes_it(np_rng):
    x = np_rng.standard_normal((2, 13, 21, 3)).astype(np.float32)
    padded = geometry.pad_to_multiple(x, 8)
    assert padded.shape == (2, 16, 24, 3)
    np.testing.assert_array_equal(geometry.crop(padded, (13, 21)), x)
    # Reflect padding: the row after the last mirrors the one before it.
    np.testing.assert_array_equal(padded[:, 13, :21], x[:, 11])
    assert geometry.pad_to_multiple(x[:, :8, :16], 8).shape == (2, 8, 16, 3)
    # Padding larger than the image: the edge is repeated (reflect needs more pixels).
    tiny = x[:, :2, :2]
    np.testing.assert_array_equal(geometry.pad_to_multiple(tiny, 8)[:, 7, 0], tiny[:, 1, 0])
    with pytest.raises(ValueError, match="larger"):
        geometry.crop(x, (14, 21))


def test_model_input_is_resized_unit_range_and_padded():
    lq = np.full((5, 7, 3), 255, np.uint8)
    batch = geometry.model_input([lq, lq], (10, 14), 4)
    assert batch.shape == (2, 12, 16, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, 1.0)
