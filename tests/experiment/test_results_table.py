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


def _block(name: str) -> str:
    readme = (ROOT / "README.md").read_text()
    begin, end = f"<!-- {name}:begin -->\n", f"\n<!-- {name}:end -->"
    return readme[readme.index(begin) + len(begin) : readme.index(end)]


def test_readme_aliased_benchmark_tables_match_their_results():
    """The controlled benchmark's tables (arms, texture per class, prompts, per-class control,
    steps) are what the script renders from the committed results, which hold every arm's
    training runs and the issue's measurements."""
    ex = _script()
    results = json.loads((ROOT / "docs/experiment/aliased/results.json").read_text())
    assert _block("aliased") == ex.render_table(results)
    assert (ROOT / "docs/experiment/aliased/grid.png").is_file()
    assert (ROOT / "docs/experiment/aliased/class_scale.png").is_file()
    for arm in ("sronly", "prior", "joint"):
        assert len(results["arms"][arm]["texture_accuracy"]["values"]) >= 2
    assert set(results["prompt_modes"]) == {"tags", "fixed"}
    assert {f"{s} {n}" for s, n in ex.SWEEP} == set(results["steps_sweep"])
    assert results["fastest_within"] == ex.fastest_within(results["steps_sweep"])


def test_readme_steps_and_trajectory_tables_match_their_results():
    ex = _script()
    sweep = json.loads((ROOT / "docs/experiment/steps_sweep.json").read_text())
    rendered = "\n".join(
        ex.render_sweep(
            sweep["steps_sweep"],
            sweep["fastest_within"],
            sweep["test_set"]["count"],
            sweep["machine"],
        )
    )
    assert _block("sweep") == rendered.strip()
    spec = importlib.util.spec_from_file_location(
        "segdm_trajectory", ROOT / "scripts" / "segdm_trajectory.py"
    )
    traj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(traj)
    files = [
        "docs/experiment/segdm_trajectory.json",
        "docs/experiment/aliased/segdm_trajectory.json",
    ]
    assert _block("trajectory") == traj.render([json.loads((ROOT / f).read_text()) for f in files])
    fix = sorted((ROOT / "docs/experiment/trajectory_fix").glob("*.json"))
    assert len(fix) >= 4
    results = [json.loads(f.read_text()) for f in fix]
    assert _block("trajectory-fix") == traj.render(results)
    assert _block("trajectory-end") == traj.render_end(results)
    for r in results:  # every step of every variant measured
        assert all(len(m["miou"]) == r["steps"] for m in r["modes"].values())
    check = [json.loads(f.read_text()) for f in sorted(
        (ROOT / "docs/experiment/trajectory_check").glob("*.json")
    )]  # fmt: skip
    assert check and all(r["test_set"]["split"] == "check" for r in check)
    assert all(r["test_set"]["count"] >= 256 for r in check)
    assert _block("trajectory-check") == traj.render_check(check + results)
    # Each checkpoint on both seg grids: the files made before the option read as "shared".
    grids = {}
    for r in check:
        grids.setdefault(r["checkpoint"], set()).add(traj._grid(r))
    assert all(g == {"shared", "ddp"} for g in grids.values()), grids
    assert "seg_grid" not in json.loads(
        (ROOT / "docs/experiment/trajectory_check/synthetic_rollout.json").read_text()
    )
    spec = importlib.util.spec_from_file_location(
        "segdm_last_step", ROOT / "scripts" / "segdm_last_step.py"
    )
    last_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(last_step)
    inputs = json.loads((ROOT / "docs/experiment/last_step_inputs.json").read_text())
    assert set(inputs["rows"]) == set(last_step.ROWS)
    assert inputs["test_set"]["split"] == "check" and inputs["seg_grid"] == "shared"
    assert _block("last-step-inputs") == last_step.render(inputs)


def test_paired_bootstrap_finds_a_worse_last_step_and_only_then():
    """The interval of each step against the last one: a last step that gets a share of the
    scenes' pixels wrong is below every other step; identical steps are not."""
    spec = importlib.util.spec_from_file_location(
        "segdm_trajectory", ROOT / "scripts" / "segdm_trajectory.py"
    )
    traj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(traj)
    rng = np.random.default_rng(0)
    k, scenes, steps = 3, 64, 4
    conf = np.zeros((1, steps, scenes, k, k), np.int64)
    for i in range(scenes):
        right = rng.integers(50, 100, k)
        conf[0, :, i] = np.diag(right)
        conf[0, :, i, 0, 1] = rng.integers(0, 10)
    same = traj.paired_bootstrap(conf, draws=200)
    assert same["better_steps"] == []
    assert same["best_minus_last"]["point"] == 0.0
    noisy = conf.copy()  # steps 1 and 4 make errors of the same size in different scenes
    for step in (0, 3):
        noisy[0, step, :, 0, 2] += rng.integers(0, 20, scenes)
    got = traj.paired_bootstrap(noisy, draws=200)
    assert got["step_minus_last"]["low"][0] < 0 < got["step_minus_last"]["high"][0]
    assert 1 not in got["better_steps"]
    assert got["better_steps"] == [2, 3]  # error-free: above the noisy last step
    worse = conf.copy()
    worse[0, -1, :, 0, 2] += 30  # the last step mislabels class 0 as 2 in every scene
    got = traj.paired_bootstrap(worse, draws=200)
    assert got["better_steps"] == [1, 2, 3]
    assert got["best_minus_last"]["low"] > 0
    want = traj.batched_miou(worse[0].sum(1))
    np.testing.assert_allclose(got["step_miou"], want)
    from segsr_jax import metrics

    np.testing.assert_allclose(want[-1], metrics.miou(worse[0, -1].sum(0))[0])


def test_validation_scenes_are_not_the_test_scenes(tmp_path):
    ex = _script()
    assert ex.VAL_SEED != ex.TEST_SEED
    ex.make_test_set(tmp_path / "test", 2, 32, 4, "aliased")
    ex.make_test_set(tmp_path / "val", 2, 32, 4, "aliased", ex.VAL_SEED)
    for i in range(2):
        a = (tmp_path / "test" / "hr" / f"test{i:03d}_hr.png").read_bytes()
        b = (tmp_path / "val" / "hr" / f"test{i:03d}_hr.png").read_bytes()
        assert a != b
    assert str(ex.VAL_SEED) in (tmp_path / "val" / "done").read_text()


def test_fastest_within_keeps_the_tolerances():
    ex = _script()
    sweep = {
        "ddpm 50": {"psnr": 20.0, "semantic_miou": 0.5, "seg_miou": 0.6, "seconds": 50.0},
        "ddim 4": {"psnr": 19.7, "semantic_miou": 0.5, "seg_miou": 0.6, "seconds": 4.0},
        "ddim 8": {"psnr": 19.9, "semantic_miou": 0.495, "seg_miou": 0.6, "seconds": 8.0},
        "ddim 20": {"psnr": 20.1, "semantic_miou": 0.5, "seg_miou": 0.55, "seconds": 6.0},
    }
    assert ex.fastest_within(sweep) == "ddim 8"  # 4 is 0.3 dB off; 20 loses 0.05 SegDM mIoU


def test_sweep_plot_draws_a_panel_per_score_and_a_line_per_sampler():
    ex = _script()
    sweep = {
        "ddpm 50": {"psnr": 20.0, "seg_miou": 0.6, "seconds": 50.0},
        "ddim 4": {"psnr": 19.7, "seg_miou": 0.62, "seconds": 4.0},
        "ddim 8": {"psnr": 19.9, "seg_miou": 0.61, "seconds": 8.0},
        "dpmpp_2m 4": {"psnr": 19.0, "seg_miou": 0.5, "seconds": 5.0},
    }
    pic = ex.sweep_plot(sweep, panel=(200, 150))
    assert pic.shape == (150 + 16, 2 * 200, 3)  # PSNR and SegDM mIoU: seconds is not plotted
    for sampler, colour in ex.PLOT_COLOURS.items():
        hits = (pic == colour).all(-1)
        # every sampler is drawn inside both panels' frames (titles, ticks and legend are not)
        assert hits[23:123, 45:189].any() and hits[23:123, 245:389].any(), sampler
    assert (ROOT / "docs/experiment/steps_sweep.png").is_file()


def _arm(tex: float, std: float = 0.001, bridge: dict | None = None) -> dict:
    row = {
        k: {"mean": v, "std": std, "values": [v, v]}
        for k, v in (("psnr", 15.0), ("ssim", 0.04), ("semantic_miou", 0.25), ("seg_miou", 0.7))
    }
    row["texture_accuracy"] = {"mean": tex, "std": std, "values": [tex - std, tex + std]}
    if bridge:
        row["bridge"] = bridge
    return row


def test_record_variant_adds_replaces_and_renders_the_verdict(tmp_path):
    """A design variant's arms become a row of the main results' variants table, replaced when
    rerun under the same name; SegSR's lead counts only beyond twice the seeds' spread."""
    ex = _script()
    main = json.loads((ROOT / "docs/experiment/aliased/results.json").read_text())
    main.pop("variants", None)
    for a in ex.ARMS:  # spread 0.01 over training seeds: the bar is 0.02
        main["arms"][a]["texture_accuracy"] = {"mean": 0.25, "std": 0.01, "values": [0.24, 0.26]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(main))
    bridge = {"lq_latent_rms": 0.148, "c_t_rms": {"900": 0.8, "500": 0.2, "100": 0.1}}

    def variant(name, joint_tex):
        return {
            "variant": name,
            "date": "2026-12-04",
            "command": "x",
            "train_seeds": [0],
            "training_minutes": {"sronly": 9.0, "prior": 9.5, "joint": 9.8},
            "arms": {
                "sronly": _arm(0.25),
                "prior": _arm(0.26, bridge=bridge),
                "joint": {
                    **_arm(joint_tex, bridge=bridge),
                    "trajectory_miou": [0.7],
                    "without_c_t": {"texture_accuracy": 0.251},
                },
            },
        }

    ex.record_variant(path, variant("small lead", 0.265), tmp_path / "a")
    got = ex.record_variant(path, variant("big lead", 0.30), tmp_path / "b")
    assert [v["variant"] for v in got["variants"]] == ["small lead", "big lead"]
    assert "trajectory_miou" not in got["variants"][1]["arms"]["joint"]
    got = ex.record_variant(path, variant("small lead", 0.262), tmp_path / "a")  # rerun
    assert [v["variant"] for v in got["variants"]] == ["big lead", "small lead"]
    table = ex.render_table(json.loads(path.read_text()))
    assert (tmp_path / "results.md").read_text() == table + "\n"
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if " lead | " in line}
    assert "| fixed prior - SRDM only | SegSR - SRDM only | bar |" in table
    assert set(rows) == {"small lead", "big lead"}
    assert "| +0.010 (no) | +0.012 (no) | 0.020 | 0.251 |" in rows["small lead"]
    assert "| +0.050 (above the bar, 1 run only) | 0.020 |" in rows["big lead"]
    two = variant("two runs", 0.30)
    two["train_seeds"] = [0, 1]
    two["arms"]["prior"] = _arm(0.29, bridge=bridge)  # the fixed prior's lead is judged too
    table = ex.render_table(ex.record_variant(path, two, tmp_path / "d"))
    assert "| two runs | 2 |" in table
    assert "| +0.040 (**yes**) | +0.050 (**yes**) | 0.020 |" in table
    # two runs whose own spread is wider than the main table's: that is the bar
    noisy = variant("noisy runs", 0.30)
    noisy["train_seeds"] = [0, 1]
    noisy["arms"]["joint"]["texture_accuracy"]["std"] = 0.03
    table = ex.render_table(ex.record_variant(path, noisy, tmp_path / "e"))
    assert "| noisy runs | 2 |" in table and "| +0.050 (no) | 0.060 |" in table
    assert "0.800 / 0.200 / 0.100" in rows["big lead"] and "| 0.148 |" in rows["big lead"]
    unnamed = variant("", 0.3)
    try:
        ex.record_variant(path, unnamed, tmp_path / "c")
    except ValueError as e:
        assert "--variant" in str(e)
    else:
        raise AssertionError("a variant without a name was recorded")
