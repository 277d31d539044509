"""launch/colab/segsr_jax.ipynb executed end to end on the CPU (nbclient), demo cells only.

The cells tagged `install` (pip), `upload` and `drive` (Colab's widgets and Google Drive) are
dropped; the demo runs on a tiny random checkpoint and one 24x32 image given through the
environment variables the notebook honours, so the test does not need the bundled asset.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import nbformat
import numpy as np
import pytest
from flax import nnx
from nbclient import NotebookClient
from PIL import Image

from tests.launch.conftest import REPO
from tests.tiny_segsr import save_checkpoint, tiny_model

NOTEBOOK = REPO / "launch" / "colab" / "segsr_jax.ipynb"
SKIPPED = {"install", "upload", "drive"}


def tags(cell) -> set[str]:
    return set(cell.metadata.get("tags", []))


def random_tiny_model(seed: int = 0):
    """`tiny_model` with random weights drawn in numpy: initialising it op by op in JAX takes
    about a minute on a busy 2-core machine, tracing it (eval_shape) a few seconds."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tiny_model(seed)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-2] if str(path[-1]) == ".value" else path[-1])
        if "scale" in name or "var" in name:  # norms' scales, batch-norm variances
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name or "mean" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return rng.normal(0.0, fan_in**-0.5, leaf.shape).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map_with_path(draw, state))


@pytest.fixture(scope="module")
def notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_structure(notebook):
    cells = notebook.cells
    assert all(not c.get("outputs") for c in cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    for cell in cells:
        src = cell.source
        if "google.colab" in src:
            assert tags(cell) & {"upload", "drive"}, src[:80]
        if "pip" in src and "install" in src and cell.cell_type == "code":
            assert "install" in tags(cell), src[:80]
    install = [c for c in cells if "install" in tags(c)]
    assert len(install) == 1 and "segsr_jax @ git+" in install[0].source
    assert any("convert.main" in c.source for c in cells if "drive" in tags(c))


def run_install_cell(source: str, monkeypatch) -> list[list[str]]:
    """Execute the install cell's code here, with subprocess.run recording the commands
    instead of running them (no pip, no network); returns them."""
    calls = []

    def record(cmd, *args, **kwargs):
        calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 1)  # nvidia-smi: "no GPU"

    monkeypatch.setattr(subprocess, "run", record)
    exec(compile(source, "install-cell", "exec"), {"__name__": "__main__"})
    return calls


def install_source(notebook) -> str:
    [cell] = [c for c in notebook.cells if "install" in tags(c)]
    return cell.source


def test_install_cell_refuses_the_placeholder_repository(notebook, monkeypatch):
    source = install_source(notebook)
    assert source.startswith("# The segsr_jax repository"), "the setting opens the cell"
    with pytest.raises(ValueError) as err:
        run_install_cell(source, monkeypatch)
    message = str(err.value)
    assert "REPO_URL is still the placeholder 'https://github.com/OWNER/segsr_jax'" in message
    assert "set REPO_URL at the top of this cell" in message


def test_install_cell_installs_from_the_repository_set(notebook, monkeypatch):
    source = install_source(notebook)
    setting = '\nREPO_URL = "https://github.com/OWNER/segsr_jax"'
    assert source.count(setting) == 1
    source = source.replace(setting, '\nREPO_URL = "https://example.org/me/segsr_jax"')
    calls = run_install_cell(source, monkeypatch)
    assert calls[-1] == [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "segsr_jax @ git+https://example.org/me/segsr_jax@main",
        "jax",
    ]


def test_runs_end_to_end_on_cpu(notebook, tmp_path, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "ckpt", random_tiny_model(), {"sampler": "ddim"})
    demo = tmp_path / "demo"
    demo.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(demo / "pic.png")
    monkeypatch.setenv("SEGSR_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("SEGSR_DEMO_INPUT", str(demo))
    monkeypatch.setenv(
        "SEGSR_SAMPLE_FLAGS", f"--steps 2 --upscale 1 --cache-dir={tmp_path / 'xla'}"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    )
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    nb = nbformat.from_dict(notebook)
    nb.cells = [c for c in nb.cells if not tags(c) & SKIPPED]
    work = tmp_path / "work"
    work.mkdir()
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    ).execute()

    out = work / "outputs" / "demo"
    assert sorted(p.name for p in out.iterdir()) == [
        "pic_seg.png",
        "pic_seg_labels.png",
        "pic_sheet.png",
        "pic_sr.png",
    ]
    sr = np.asarray(Image.open(out / "pic_sr.png"))
    assert sr.shape == (24, 32, 3)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "cpu device(s)" in text and "python -m segsr_jax.sample --checkpoint" in text
    assert "invalid value" not in text  # no NaN reached the written images
    # The side-by-side sheet was displayed as an image, under its caption.
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1
    assert any("pic.png" in o.get("data", {}).get("text/markdown", "") for o in outputs)
