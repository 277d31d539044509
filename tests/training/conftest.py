"""Shared fixtures of the training tests."""

import pytest

from tests.training.tiny_train_config import write_init_checkpoint


@pytest.fixture(scope="session")
def init_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny test model with random weights, for ``init_from``."""
    return write_init_checkpoint(tmp_path_factory.mktemp("init") / "ckpt")
