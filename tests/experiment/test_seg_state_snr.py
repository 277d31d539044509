"""scripts/seg_state_snr.py: the class signal left in SegDM's noisy state at each time."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from segsr_jax.diffusion.schedules import seg_alpha_sigma

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("snr", ROOT / "scripts" / "seg_state_snr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_snr_of_the_closest_classes():
    table = np.array([[0.01, 0.0], [0.0, 0.0], [-0.01, 0.01]])  # closest pair: 0.01 apart
    r = _script().snr_table(table, times=(0.01, 0.5), region=100)
    assert r["min_class_distance"] == 0.01
    alpha, sigma = (float(v) for v in seg_alpha_sigma(np.float64(0.5)))
    assert np.isclose(r["rows"][1]["pixel"], (alpha * 0.005) ** 2 / sigma**2)
    assert np.isclose(r["rows"][1]["region"], 100 * r["rows"][1]["pixel"])
    assert r["rows"][0]["pixel"] > r["rows"][1]["pixel"]  # less noise, more signal
    assert r["snr_above_1_up_to_t"] == {"pixel": None, "region": 0.01}
    # Ten times larger embeddings: a hundred times the SNR.
    big = _script().snr_table(table * 10, times=(0.5,), region=100)
    assert np.isclose(big["rows"][0]["pixel"], 100 * r["rows"][1]["pixel"])


def test_committed_table_says_what_the_readme_says():
    r = json.loads((ROOT / "docs/experiment/aliased/seg_state_snr.json").read_text())
    assert r["embedding_max_abs"] <= 0.01  # SegDM's bit_scale
    assert r["snr_above_1_up_to_t"]["region"] == 0.02
    assert (
        "S_t holds class signal above its noise only for t <= 0.02"
        in (ROOT / "README.md").read_text()
    )


def test_bridge_input_response():
    from tests.tiny_segsr import tiny_model

    model = tiny_model(0)
    before = _script().bridge_input(model)
    assert before["between_class_rms"] > 0
    k = model.bridge.seg_in.kernel
    k[...] = k[...] * 5.0  # a conv grown 5x answers 5x louder
    after = _script().bridge_input(model)
    assert np.isclose(after["seg_in_norm"], 5 * before["seg_in_norm"], rtol=1e-5)
    assert np.isclose(after["between_class_rms"], 5 * before["between_class_rms"], rtol=1e-5)
