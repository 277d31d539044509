"""Test set-up: every test sees a real 8-device CPU mesh.

XLA reads the flag when the backend starts, so it is set here, before anything imports JAX.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests must never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"expected 8 CPU devices, got {jax.devices()}"


@pytest.fixture
def np_rng():
    """A fresh, seeded numpy generator per test."""
    return np.random.default_rng(0)
