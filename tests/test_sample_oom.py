"""``python -m segsr_jax.sample`` after a device out-of-memory: it retries with fewer tiles per
call, then a smaller tile, then one image at a time, keeps the smaller setting, and reports an
image that fails even so while the others go on.

The out-of-memory is forced: ``Restorer.restore_batch`` raises a real
``jax.errors.JaxRuntimeError`` (what XLA raises, at compile or at run time) for settings above
a limit, and runs the bundled tiny model otherwise.
"""

import ast
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from segsr_jax import images, inference, sample
from segsr_jax.inference import Restorer, SampleOptions

ROOT = Path(__file__).parents[1]
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes."


def _inputs(folder: Path) -> Path:
    """a, b, c: 32x32 (latent 32 at x4, the tiny model's factor 4); big: 40x32, which
    samples alone (another size)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, hw in (("a", (32, 32)), ("b", (32, 32)), ("c", (32, 32)), ("big", (40, 32))):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _args(inputs, out, tmp_path, *extra):
    return [
        "--checkpoint",
        str(sample.tiny_paths()[0]),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--steps",
        "2",
        "--cache-dir",
        str(tmp_path / "xla"),
        *extra,
    ]


def test_out_of_memory_retries_smaller_keeps_it_and_goes_on(tmp_path, capsys, monkeypatch):
    real = Restorer.restore_batch
    calls = []

    def limited(self, lqs, work_hw, options, seed=0, record_labels=False):
        calls.append(
            (options.tile, options.tile_overlap, options.tiles_per_call, len(lqs), work_hw)
        )
        if (
            options.tiles_per_call > 1 or options.tile > 16 or len(lqs) > 1 or work_hw == (160, 128)
        ):  # "big" never fits
            raise jax.errors.JaxRuntimeError(OOM)
        return real(self, lqs, work_hw, options, seed=seed, record_labels=record_labels)

    monkeypatch.setattr(Restorer, "restore_batch", limited)
    inputs, out = _inputs(tmp_path / "in"), tmp_path / "out"
    rc = sample.main(
        _args(
            inputs,
            out,
            tmp_path,
            "--tile",
            "24",
            "--tile-overlap",
            "8",
            "--tiles-per-call",
            "4",
            "--batch-size",
            "2",
        )
    )
    err = capsys.readouterr().err
    assert rc == 1, err

    small, big = (128, 128), (160, 128)
    assert calls == [
        (24, 8, 4, 2, small),  # latent 32, tile 24: 4 tiles, all in one call
        (24, 8, 2, 2, small),
        (24, 8, 1, 2, small),
        (16, 5, 1, 2, small),  # the overlap shrinks with the tile
        (16, 5, 1, 1, small),  # a: runs
        (16, 5, 1, 1, small),  # b: runs
        (16, 5, 1, 1, small),  # c: the reduced setting, at once
        (16, 5, 1, 1, big),  # big: nothing smaller left
    ]
    lines = [x for x in err.splitlines() if "out of memory" in x]
    assert lines == [
        "out of memory at tile 24, 4 tiles per call, 2 images per call: retrying with 2 tiles "
        "per call",
        "out of memory at tile 24, 2 tiles per call, 2 images per call: retrying with 1 tile "
        "per call",
        "out of memory at tile 24, 1 tile per call, 2 images per call: retrying with tile 16 "
        "(overlap 5)",
        "out of memory at tile 16, 1 tile per call, 2 images per call: retrying with one image "
        "at a time",
        f"error: {inputs / 'big.png'}: out of memory even at tile 16, 1 tile per call, the "
        "smallest setting; skipped",
    ]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suf}" for s in "abc" for suf in images.OUTPUT_SUFFIXES
    )
    for s in "abc":
        assert np.asarray(Image.open(out / f"{s}_sr.png")).shape == (128, 128, 3)


def test_other_runtime_errors_are_not_swallowed(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else went wrong")

    monkeypatch.setattr(Restorer, "restore_batch", broken)
    inputs = _inputs(tmp_path / "in")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        sample.main(_args(inputs, tmp_path / "out", tmp_path, "--tiles-per-call", "4"))


def test_shrink_order_and_skipped_steps():
    """Steps that would not change the program are skipped (one tile: the tiles per call;
    a latent smaller than the tile: halved from the latent's size); the overlap stays below
    the tile."""
    opts = SampleOptions(tile=96, tile_overlap=32, tiles_per_call=4)
    # Latent 48: one tile of 48, so straight to tile 24.
    got = inference.shrink_after_oom(opts, 1, (48, 48))
    assert (got[0].tile, got[0].tile_overlap, got[0].tiles_per_call, got[1], got[2]) == (
        24,
        8,
        1,
        1,
        "tile 24 (overlap 8)",
    )
    # Latent 200: 3x3 tiles; 4 per call -> 2 -> 1 -> tile 48 -> 24 -> 16 -> None.
    seen, n = [], 1
    while (got := inference.shrink_after_oom(opts, n, (200, 200))) is not None:
        opts, n, change = got
        assert 0 <= opts.tile_overlap < opts.tile
        seen.append(change)
    assert seen == [
        "2 tiles per call",
        "1 tile per call",
        "tile 48 (overlap 16)",
        "tile 24 (overlap 8)",
        "tile 16 (overlap 5)",
    ]
    assert inference.shrink_after_oom(opts, 3, (200, 200))[1:] == (1, "one image at a time")


def test_a_real_xla_out_of_memory_is_recognised(tmp_path):
    """XLA's own error for an allocation that cannot be made (the address space is limited
    in the child, so nothing is really allocated)."""
    code = (
        "import resource, jax, jax.numpy as jnp\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({6 * 2**30}, {6 * 2**30}))\n"
        "try:\n"
        "    jnp.zeros((2**38,), jnp.float32).block_until_ready()\n"
        "except jax.errors.JaxRuntimeError as e:\n"
        "    print(repr(str(e)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    message = ast.literal_eval(proc.stdout.strip())
    assert inference.is_out_of_memory(jax.errors.JaxRuntimeError(message)), message
    assert not inference.is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: no"))
    assert not inference.is_out_of_memory(ValueError(message))
