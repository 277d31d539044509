"""Test set-up: every test sees a real 8-device CPU mesh, compiles fast, and shares one
persistent compilation cache with every other test and subprocess of the session.

XLA reads the flags when the backend starts, so they are set here, before anything imports
JAX; subprocesses inherit them through the environment.
"""

import atexit
import os
import shutil
import tempfile

# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation
# passes cost more than they save (about halves compile times). Numerics are unchanged up to
# float32 reduction order; the parity tests keep their tolerances.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, fresh each time: the training and sampling commands
# the tests start as subprocesses (SEGSR_JAX_CACHE is their --cache_dir default) compile the
# same tiny programs again and again; in-process tests reuse programs other tests compiled.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="segsr_jax_test_xla_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("SEGSR_JAX_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
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
