"""The README's experiment tables are exactly what the experiment script renders from the
committed results, and the script's pieces compute what they claim."""

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "tiny_experiment", ROOT / "scripts" / "tiny_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_results_json():
    results = json.loads((ROOT / "docs" / "experiment" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- results:begin -->\n", "\n<!-- results:end -->"
    block = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert block == _script().render_table(results)
    assert (ROOT / "docs" / "experiment" / "grid.png").is_file()
    # The results hold every arm: one score per training run, a trajectory per run and seed.
    runs = len(results["train_seeds"])
    for arm in ("sronly", "prior", "joint"):
        a = results["arms"][arm]
        assert len(a["psnr"]["values"]) == runs >= 2
        assert len(a["trajectory_miou"]["per_run_and_seed"]) == runs * len(results["seeds"])
        assert len(a["trajectory_miou"]["mean"]) == results["steps"]


def test_trajectory_miou_and_label_upsampling():
    ex = _script()
    truth = np.array([[0, 0], [1, 1]], np.uint8)
    right = np.array([[0, 0], [1, 1]], np.uint8)
    half = np.array([[0, 0], [0, 0]], np.uint8)  # class 0: IoU 2/4, class 1: 0/2
    traj = [np.stack([half, right])]
    np.testing.assert_allclose(ex.trajectory_miou(traj, [truth], 2), [0.25, 1.0])
    up = ex.upsample_labels(np.array([[0, 1], [2, 3]]), (4, 4))
    np.testing.assert_array_equal(up, np.kron([[0, 1], [2, 3]], np.ones((2, 2), int)))
