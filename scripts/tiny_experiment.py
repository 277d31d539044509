"""The miniature SegSR experiment: three arms of the tiny model on a held-out synthetic test set.

After the training commands of ``configs/tiny.py`` (stages vae, sr, seg, then the arms sronly,
prior, joint -- each a second time with ``--config.seed=1 --config.data.seed=1`` into
``runs/tiny/ARM_s1`` -- and the evaluation segmenter)::

    python scripts/tiny_experiment.py                    # sample, score, write docs/experiment/
    python scripts/tiny_experiment.py --render-only      # print the README table from results.json

Arms (same start checkpoint ``seg``, same steps, batch and learning rate):

- ``sronly``: SRDM alone (``seg_prior="none"``: C_t = 0);
- ``prior``:  SRDM + the fixed segmentation prior, SegFormer's map of the LQ image
  (``seg_prior="fixed"``);
- ``joint``:  full SegSR, SegDM refined jointly with the image through the bridge.

Every training run of every arm samples the same LQ images with the same sampling seeds (DDIM,
``--steps`` steps, no CFG, the checkpoint's colour fix, the arm's ``seg_prior``). Scores
(:mod:`segsr_jax.evaluate`): PSNR and SSIM on Y with a 4-pixel border crop; semantic mIoU, the
HR-trained evaluation segmenter's map of each output against the true labels; the arm's own
segmentation mIoU (SegDM's for ``joint``, the fixed LQ segmenter's for ``prior``); and the
segmentation's mIoU after every step. Each training run's scores are averaged over the sampling
seeds; the tables give the mean and standard deviation over training runs. Bicubic upsampling
and the HR images themselves are scored as references. Outputs: ``results.json``,
``results.md`` and ``grid.png`` (first training run, first sampling seed) in ``--out``.

``--benchmark aliased`` runs the same experiment on the controlled benchmark
(``configs/aliased.py``, :mod:`segsr_jax.data.aliased`: textures the x4 degradation averages
away, told apart in the LQ only by a weak colour cue), into ``docs/experiment/aliased/``, and
adds the texture accuracy of every output (:mod:`segsr_jax.evaluation.texture`: which period-4
texture each 8 x 8 window shows, by its Fourier energy, no learned segmenter) and the HR
images through the VAE as the autoencoder's ceiling::

    python scripts/tiny_experiment.py --benchmark aliased
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segsr_jax import images  # noqa: E402
from segsr_jax.diffusion.options import SEG_GRIDS, SampleOptions  # noqa: E402
from segsr_jax.evaluation.tables import cpu_model  # noqa: E402

ARMS = {
    "sronly": "SRDM only",
    "prior": "SRDM + fixed LQ-segmenter prior",
    "joint": "SegSR (SegDM + DMB)",
}
SEG_PRIOR = {"sronly": "none", "prior": "fixed", "joint": "diffusion"}
TEST_SEED = 20_001  # training scenes use source seed 0, the demo images 10_001
# Validation scenes: for choices made on results (a sampling option's default), never TEST_SEED.
VAL_SEED = 30_001
# Confirmation scenes: a larger set, measured once, for a claim a 32-scene set is too noisy for
# (SegDM's last step against its best: scripts/segdm_trajectory.py --split check).
CHECK_SEED = 40_001
SCALE = 4
# --benchmark: (runs folder, output folder, classes)
BENCHMARKS = {
    "synthetic": ("runs/tiny", "docs/experiment", 8),
    "aliased": ("runs/aliased", "docs/experiment/aliased", 4),
}


def make_test_set(
    folder: Path,
    count: int,
    size: int,
    num_classes: int,
    benchmark: str = "synthetic",
    seed: int = TEST_SEED,
) -> None:
    """Held-out scenes: ``hr/``, ``lq/`` (the training degradation, seeded per scene) and
    ``labels/``; written once (an existing complete set is kept). ``seed``: TEST_SEED, or
    VAL_SEED for a validation set."""
    from segsr_jax.data.aliased import AliasedConfig, make_aliased_scene
    from segsr_jax.data.degradations import DegradationConfig, degrade
    from segsr_jax.data.synthetic import SceneConfig, make_scene

    kind = "" if benchmark == "synthetic" else f"{benchmark} "
    stamp = f"{count} {kind}scenes of {size} px, {num_classes} classes, seed {seed}\n"
    if (folder / "done").exists():
        if (folder / "done").read_text() != stamp:
            raise SystemExit(
                f"{folder} holds another test set ({(folder / 'done').read_text()!r}"
                f"); remove it or pass the same --count/--size/--num-classes"
            )
        return
    if benchmark == "aliased":
        scene = lambda seed: make_aliased_scene(seed, AliasedConfig(size, size))  # noqa: E731
    else:
        cfg = SceneConfig(height=size, width=size, num_classes=num_classes)
        scene = lambda seed: make_scene(seed, cfg)  # noqa: E731
    for i in range(count):
        hr, label = scene((seed, i))
        rng = np.random.default_rng((seed, i, 1))  # a stream apart from the scene's
        lq = degrade(hr, rng, DegradationConfig(scale=SCALE))
        images.write_png(folder / "hr" / f"test{i:03d}_hr.png", hr)
        images.write_png(folder / "lq" / f"test{i:03d}.png", lq)
        images.write_png(folder / "labels" / f"test{i:03d}_label.png", label)
    (folder / "done").write_text(stamp)


def upsample_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour label map to ``hw`` (latent -> image resolution)."""
    return images.resize(np.asarray(labels, np.uint8), hw, resample=images.Image.NEAREST)


def sample_arm(
    restorer,
    seg_prior: str,
    lqs: list[np.ndarray],
    names: list[str],
    out: Path,
    seed: int,
    steps: int,
    hw: tuple[int, int],
    **overrides,
) -> tuple[list[np.ndarray], float]:
    """Sample one arm for one seed: writes ``sr/<name>_sr.png`` and
    ``seg/<name>_seg_labels.png``; returns the per-step label trajectories (upsampled to ``hw``)
    and the sampling seconds (the first call of a restorer also compiles). ``overrides``:
    other sampling options (the sampler, a class scale, the prompt mode)."""
    opts = restorer.options(
        **{
            "sampler": "ddim",
            "steps": steps,
            "guidance": 1.0,
            "prompt": "",
            "negative_prompt": "",
            "seg_prior": seg_prior,
            **overrides,
        }
    )
    t0 = time.perf_counter()
    results, _ = restorer.restore_batch(lqs, hw, opts, seed=seed, record_labels=True)
    seconds = time.perf_counter() - t0
    trajectories = []
    for name, (sr, labels, traj) in zip(names, results, strict=True):
        images.write_png(out / "sr" / f"{name}_sr.png", sr)
        images.write_png(out / "seg" / f"{name}_seg_labels.png", upsample_labels(labels, hw))
        trajectories.append(np.stack([upsample_labels(t, hw) for t in traj]))
    return trajectories, seconds


def trajectory_miou(
    trajectories: list[np.ndarray], truths: list[np.ndarray], num_classes: int
) -> list[float]:
    """Dataset mIoU of the segmentation after each step."""
    from segsr_jax import metrics

    steps = trajectories[0].shape[0]
    out = []
    for s in range(steps):
        conf = sum(
            metrics.confusion(t[s], y, num_classes)
            for t, y in zip(trajectories, truths, strict=True)
        )
        out.append(metrics.miou(conf)[0])
    return out


def texture_scores(
    pred: Path, names: list[str], truths: list[np.ndarray], suffix: str = "_sr"
) -> tuple[float, list[float], list[list[int]]]:
    """``(texture accuracy, per-class accuracy, confusion)`` of the images
    ``pred/<name><suffix>.png`` against the true labels (aliased benchmark)."""
    from segsr_jax.evaluation.texture import texture_accuracy, texture_confusion

    conf = sum(
        texture_confusion(images.read_image(pred / f"{n}{suffix}.png"), y)
        for n, y in zip(names, truths, strict=True)
    )
    acc, per_class = texture_accuracy(conf)
    return acc, per_class.tolist(), conf.tolist()


def load_restorer(checkpoint: Path, seg_grid: str):
    """A :class:`Restorer` of ``checkpoint`` sampling SegDM on ``seg_grid``
    (``SampleOptions.seg_grid``; the results recorded before 2026-12-04 used ``shared``)."""
    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(checkpoint)
    restorer.defaults["seg_grid"] = seg_grid
    return restorer


def vae_roundtrip(checkpoint: Path, test: Path, names: list[str], out: Path, score) -> dict:
    """The HR test images through a checkpoint's VAE (encode, decode): the autoencoder's
    ceiling on every score; written to ``out`` and scored with ``score``."""
    import jax
    from flax import nnx

    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(checkpoint)
    model = nnx.merge(restorer.graphdef, restorer.state)
    roundtrip = jax.jit(lambda x: model.vae.decode_latent(model.vae.encode_latent(x)))
    for n in names:
        hr = images.read_image(test / "hr" / f"{n}_hr.png")
        x = images.to_unit_range(hr[None])
        images.write_png(out / f"{n}_sr.png", images.from_unit_range(roundtrip(x))[0])
    return score(out)


# The quality-against-steps sweep: (sampler, steps) of the samplers we ship.
SWEEP = (
    ("ddpm", 50),
    ("ddim", 4),
    ("ddim", 8),
    ("ddim", 20),
    ("dpmpp_2m", 4),
    ("dpmpp_2m", 8),
    ("dpmpp_2m", 20),
)
# The per-class control's settings: (label, class scale), on the aliased benchmark.
CLASS_SCALES = (
    ("as trained", ()),
    ("horizontal stripes x0", (("horizontal stripes", 0.0),)),
    ("horizontal stripes x2", (("horizontal stripes", 2.0),)),
)


def steps_sweep(restorer, lqs, names, truths, hw, work: Path, score, seed: int = 0) -> dict:
    """Every (sampler, steps) of :data:`SWEEP` on one checkpoint, sampling seed ``seed``:
    the scores, SegDM's mIoU and the sampling seconds (compile excluded: a warm-up run)."""
    out = {}
    k = restorer.num_classes
    for sampler, steps in SWEEP:
        d = work / f"{sampler}_{steps}"
        sample_arm(restorer, "diffusion", lqs, names, d, seed, steps, hw, sampler=sampler)
        traj, seconds = sample_arm(
            restorer, "diffusion", lqs, names, d, seed, steps, hw, sampler=sampler
        )
        row = score(d / "sr", d / "seg")
        row["seconds"] = seconds
        row["segdm_last_step_miou"] = trajectory_miou(traj, truths, k)[-1]
        out[f"{sampler} {steps}"] = row
        print(f"sweep {sampler} {steps}: " + ", ".join(f"{a} {b:.4f}" for a, b in row.items()))
    return out


def fastest_within(sweep: dict, reference: str = "ddpm 50") -> str:
    """The fastest setting within 0.2 dB PSNR and 0.01 semantic and SegDM mIoU of
    ``reference`` (ties: fewer steps first, as listed)."""
    ref = sweep[reference]
    ok = [
        name
        for name, row in sweep.items()
        if row["psnr"] >= ref["psnr"] - 0.2
        and row.get("semantic_miou", 0) >= ref.get("semantic_miou", 0) - 0.01
        and row["seg_miou"] >= ref["seg_miou"] - 0.01
    ]
    return min(ok, key=lambda name: sweep[name]["seconds"])


def class_scale_effect(restorer, lqs, names, truths, hw, work: Path, score, seeds: int) -> dict:
    """The per-class control on the joint arm: for each of :data:`CLASS_SCALES`, the scores,
    and the mean absolute change of the output's luma against the unscaled output of the same
    seed inside the scaled class's true regions and outside them, next to the change between
    two sampling seeds of the unscaled output (the noise floor)."""
    from segsr_jax.metrics import rgb_to_y

    def luma(folder, n):
        return rgb_to_y(images.read_image(folder / f"{n}_sr.png")).astype(np.float64)

    def change(a: Path, b: Path) -> tuple[float, float]:
        inside, outside = [], []
        for n, y in zip(names, truths, strict=True):
            d = np.abs(luma(a, n) - luma(b, n))
            inside.append(d[y == 0])
            outside.append(d[y != 0])
        return float(np.concatenate(inside).mean()), float(np.concatenate(outside).mean())

    out = {}
    for label, scale in CLASS_SCALES:
        per_seed = []
        for seed in range(seeds):
            d = work / label.replace(" ", "_") / f"seed{seed}"
            sample_arm(restorer, "diffusion", lqs, names, d, seed, 20, hw, class_scale=scale)
            row = score(d / "sr", d / "seg")
            if scale:
                plain = work / CLASS_SCALES[0][0].replace(" ", "_") / f"seed{seed}" / "sr"
                row["change_in_class"], row["change_elsewhere"] = change(d / "sr", plain)
            per_seed.append(row)
        out[label] = {k: statistics.fmean(r[k] for r in per_seed) for k in per_seed[0]}
        out[label]["class_scale"] = [list(x) for x in scale]
    plain = [work / CLASS_SCALES[0][0].replace(" ", "_") / f"seed{s}" / "sr" for s in (0, 1)]
    inside, outside = change(*plain)
    out["seed noise"] = {"change_in_class": inside, "change_elsewhere": outside}
    return out


def prompt_modes(restorer, lqs, names, hw, work: Path, score, seeds: int) -> dict:
    """The joint arm sampled with seg-tag prompts (its default) and with the fixed empty
    prompt: scores averaged over the sampling seeds."""
    out = {}
    for mode in ("tags", "fixed"):
        rows = []
        for seed in range(seeds):
            d = work / mode / f"seed{seed}"
            sample_arm(restorer, "diffusion", lqs, names, d, seed, 20, hw, prompt_mode=mode)
            rows.append(score(d / "sr", d / "seg"))
        out[mode] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    return out


# The arms whose checkpoints have a bridge, and the S_t it was trained on.
BRIDGE_PRIOR = {"prior": "fixed", "joint": "diffusion"}
BRIDGE_SCENES = 16  # test scenes the bridge's C_t is measured on


def measure_bridge(run_dir: Path, test: Path, names: list[str], prior: str) -> dict:
    """The RMS of C_t at t = 900, 500, 100 and of the LQ latent
    (:mod:`segsr_jax.evaluation.bridge_strength`) of a run's checkpoint, on the first
    :data:`BRIDGE_SCENES` test scenes."""
    from flax import nnx

    from segsr_jax.evaluation.bridge_strength import bridge_strength
    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(run_dir / "checkpoints")
    picked = names[:BRIDGE_SCENES]
    hr = np.stack([images.read_image(test / "hr" / f"{n}_hr.png") for n in picked])
    lq = np.stack([images.read_image(test / "lq" / f"{n}.png") for n in picked])
    labels = np.stack(
        [np.asarray(images.Image.open(test / "labels" / f"{n}_label.png")) for n in picked]
    )
    got = bridge_strength(nnx.merge(restorer.graphdef, restorer.state), hr, lq, labels, prior=prior)
    return {
        "lq_latent_rms": got["lq_latent_rms"],
        "c_t_rms": {str(t): v for t, v in got["c_t_rms"].items()},
    }


# What a design variant's row keeps of each arm.
VARIANT_KEYS = (
    "psnr",
    "ssim",
    "semantic_miou",
    "seg_miou",
    "texture_accuracy",
    "bridge",
    "without_c_t",
)


def record_variant(main: Path, results: dict, out: Path) -> dict:
    """Add (or replace, by name) the design variant ``results`` to the ``variants`` list of the
    benchmark's main ``results.json`` and re-render its ``results.md``; returns the main
    results."""
    if not results.get("variant"):
        raise ValueError("--record-in needs --variant: the row's name")
    r = json.loads(main.read_text())
    entry = {
        "variant": results["variant"],
        "results": str(out),
        "date": results["date"],
        "command": results["command"],
        "train_seeds": results["train_seeds"],
        "training_minutes": {a: results["training_minutes"].get(a) for a in ARMS},
        "arms": {
            a: {k: v for k, v in results["arms"][a].items() if k in VARIANT_KEYS} for a in ARMS
        },
    }
    r["variants"] = [v for v in r.get("variants", []) if v["variant"] != entry["variant"]]
    r["variants"].append(entry)
    images.write_atomic(main, json.dumps(r, indent=1).encode())
    images.write_atomic(main.with_name("results.md"), (render_table(r) + "\n").encode())
    return r


def render_variants(r: dict) -> list[str]:
    """The design variants' table: texture accuracy of each arm, the fixed prior's and SegSR's
    lead over SRDM only against twice the spread over training seeds (the main table's, or the
    variant's own when it has more than one run and that is larger), and the bridge's C_t."""
    spread = max(r["arms"][a]["texture_accuracy"]["std"] for a in ARMS)
    lines = [
        "",
        "Design variants (each a separate set of training runs, scored on the same test set "
        "with the same sampling; texture accuracy, mean over training runs and sampling "
        "seeds; SegSR with C_t zeroed at sampling is its first run with `seg_prior none`; "
        "C_t's RMS at t = 900 / 500 / 100 on "
        f"{BRIDGE_SCENES} test scenes, against the LQ latent's). A lead over SRDM only "
        f"counts when it is more than twice the spread over training seeds: the main table's "
        f"({2 * spread:.3f}), or the variant's own if it has more runs and a larger one:",
        "",
        "| variant | runs | SRDM only | fixed prior | SegSR | fixed prior - SRDM only | "
        "SegSR - SRDM only | bar | SegSR, C_t zeroed | semantic mIoU, SegSR | "
        "C_t RMS, fixed prior | C_t RMS, SegSR | LQ latent RMS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def rms(arm):
        b = arm.get("bridge")
        return " / ".join(f"{v:.3f}" for v in b["c_t_rms"].values()) if b else "–"

    for v in r.get("variants", []):
        a = v["arms"]
        tex = {k: a[k]["texture_accuracy"]["mean"] for k in ARMS}
        bar = 2 * spread
        if len(v["train_seeds"]) > 1:
            bar = max(bar, *(2 * a[k]["texture_accuracy"]["std"] for k in ARMS))

        runs = len(v["train_seeds"])
        lq = a["joint"].get("bridge", {}).get("lq_latent_rms")
        off = a["joint"].get("without_c_t", {}).get("texture_accuracy")
        lines.append(
            f"| {v['variant']} | {len(v['train_seeds'])} | {tex['sronly']:.3f} | "
            f"{tex['prior']:.3f} | {tex['joint']:.3f} | {_lead(tex, 'prior', bar, runs)} | "
            f"{_lead(tex, 'joint', bar, runs)} | "
            f"{bar:.3f} | {'–' if off is None else f'{off:.3f}'} | "
            f"{a['joint']['semantic_miou']['mean']:.3f} | {rms(a['prior'])} | "
            f"{rms(a['joint'])} | {'–' if lq is None else f'{lq:.3f}'} |"
        )
    return lines


def _lead(tex: dict, arm: str, bar: float, runs: int) -> str:
    """``arm``'s texture lead over SRDM only and whether it clears ``bar``."""
    d = tex[arm] - tex["sronly"]
    verdict = "no"
    if d > bar:  # one training run has no spread of its own: not yet a result
        verdict = "**yes**" if runs > 1 else "above the bar, 1 run only"
    return f"{d:+.3f} ({verdict})"


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation and the values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def stage_minutes(runs: Path) -> dict:
    """Wall-clock minutes of each training run, from its metrics.jsonl (first to last event)."""
    out = {}
    for name in (
        "vae",
        "sr",
        "seg",
        "sronly",
        "prior",
        "joint",
        "segmenter",
        "sronly_s1",
        "prior_s1",
        "joint_s1",
    ):
        log = runs / name / "metrics.jsonl"
        if log.is_file():
            times = [json.loads(line)["time"] for line in log.read_text().splitlines() if line]
            out[name] = round((max(times) - min(times)) / 60, 1)
    return out


def render_table(r: dict) -> str:
    """The README's tables (markdown) from ``results.json``."""

    def pm(d, f):  # "mean ± std" over training runs
        return f"{d['mean']:{f}} ± {d['std']:{f}}"

    minutes = r["training_minutes"]
    shared = sum(minutes.get(k, 0) for k in ("vae", "sr", "seg"))
    arm_min = ", ".join(f"{a} {minutes[a]:.1f}" for a in ARMS if a in minutes)
    texture = "texture_accuracy" in r["references"]["bicubic"]
    tex_head, tex_rule = (" texture accuracy |", " --- |") if texture else ("", "")

    def tex(row, f=None):  # the texture column of a row (empty without the benchmark)
        if not texture:
            return ""
        v = row["texture_accuracy"]
        return f" {pm(v, '.3f') if f else format(v, '.3f')} |"

    lines = [
        f"Held-out test set: {r['test_set']['count']} "
        f"{r.get('benchmark', 'synthetic')} scenes, "
        f"{r['test_set']['size']} px HR, x{SCALE} LQ through the training degradation; "
        f"DDIM {r['steps']} steps, no CFG"
        + (f", seg grid {r['seg_grid']}" if "seg_grid" in r else "")
        + f". Each arm was trained {len(r['train_seeds'])} "
        f"times (training seeds {r['train_seeds']}); each run's scores are means over "
        f"sampling seeds {r['seeds']}; the table gives mean ± std over the training runs. "
        f"Training minutes on {r['machine']}: shared stages {shared:.1f} (vae, sr, seg), "
        f"per arm run {arm_min}, evaluation segmenter {minutes.get('segmenter', 0):.1f}.",
        "",
        "| arm | PSNR (Y) | SSIM (Y) | semantic mIoU | own segmentation mIoU |" + tex_head,
        "| --- | --- | --- | --- | --- |" + tex_rule,
    ]
    for ref in ("bicubic", "vae", "hr"):
        if ref not in r["references"]:
            continue
        row = r["references"][ref]
        psnr = "∞" if ref == "hr" else f"{row['psnr']:.2f}"
        ssim = "1" if ref == "hr" else f"{row['ssim']:.4f}"
        label = {
            "bicubic": "bicubic upsampling (reference)",
            "vae": "HR through the VAE (the autoencoder's ceiling)",
            "hr": "HR ground truth (segmenter's ceiling)",
        }[ref]
        lines.append(f"| {label} | {psnr} | {ssim} | {row['semantic_miou']:.3f} | – |" + tex(row))
    for arm, title in ARMS.items():
        a = r["arms"][arm]
        own = {
            "joint": f"SegDM {pm(a['seg_miou'], '.3f')}",
            "prior": f"LQ segmenter {pm(a['seg_miou'], '.3f')}",
        }.get(arm, "–")
        lines.append(
            f"| {title} | {pm(a['psnr'], '.2f')} | {pm(a['ssim'], '.4f')} | "
            f"{pm(a['semantic_miou'], '.3f')} | {own} |" + tex(a, True)
        )
    if r.get("variant"):
        lines[:0] = [f"Design variant: {r['variant']}.", ""]
    traj = r["arms"]["joint"]["trajectory_miou"]["mean"]
    picks = sorted({0, len(traj) // 4, len(traj) // 2, 3 * len(traj) // 4, len(traj) - 1})
    lines += [
        "",
        "SegDM's mIoU after each reverse step (joint arm, mean over all runs and "
        "sampling seeds; the fixed LQ segmenter scores "
        f"{r['arms']['prior']['seg_miou']['mean']:.3f}):",
        "",
        "| step | " + " | ".join(str(i + 1) for i in picks) + " |",
        "| --- |" + " --- |" * len(picks),
        "| mIoU | " + " | ".join(f"{traj[i]:.3f}" for i in picks) + " |",
    ]
    if texture:
        lines += render_aliased_extras(r)
    return "\n".join(lines)


def render_sweep(sweep: dict, fastest: str, count: int, machine: str = "") -> list[str]:
    """The quality-against-steps table (columns the sweep has)."""
    cols = [
        ("psnr", "PSNR (Y)", ".2f"),
        ("ssim", "SSIM (Y)", ".4f"),
        ("semantic_miou", "semantic mIoU", ".3f"),
        ("seg_miou", "SegDM mIoU", ".3f"),
        ("texture_accuracy", "texture accuracy", ".3f"),
        ("seconds", "seconds", ".1f"),
    ]
    cols = [c for c in cols if c[0] in next(iter(sweep.values()))]
    lines = [
        "",
        f"Quality against steps (SegSR, sampling seed 0; seconds for the {count} scenes as one "
        f"batch, compiled{', on ' + machine if machine else ''}):",
        "",
        "| sampler, steps | " + " | ".join(c[1] for c in cols) + " |",
        "| --- |" + " --- |" * len(cols),
    ]
    for name, row in sweep.items():
        lines.append(f"| {name} | " + " | ".join(format(row[k], f) for k, _, f in cols) + " |")
    return lines + ["", f"Fastest within 0.2 dB PSNR and 0.01 mIoU of DDPM 50: **{fastest}**."]


def render_aliased_extras(r: dict) -> list[str]:
    """The aliased benchmark's further tables: texture accuracy per class, prompt modes, the
    per-class control and quality against steps (each when ``results.json`` has it)."""
    from segsr_jax.data.aliased import CLASS_NAMES

    def pm(d):
        return f"{d['mean']:.3f} ± {d['std']:.3f}"

    lines = [
        "",
        "Texture accuracy per class (share of 8 x 8 windows inside a region of that class "
        "showing its texture):",
        "",
        "| | " + " | ".join(CLASS_NAMES) + " |",
        "| --- |" + " --- |" * len(CLASS_NAMES),
    ]
    rows = [(k, r["references"][k], False) for k in ("bicubic", "vae", "hr")]
    rows += [(ARMS[a], r["arms"][a], True) for a in ARMS]
    for title, row, spread in rows:
        if f"texture_class{0}" not in row:
            continue
        cells = [
            pm(row[f"texture_class{i}"]) if spread else f"{row[f'texture_class{i}']:.3f}"
            for i in range(len(CLASS_NAMES))
        ]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if "prompt_modes" in r:
        lines += [
            "",
            "Prompts at sampling (SegSR, first training run, mean over sampling seeds):",
            "",
            "| prompt | PSNR (Y) | SSIM (Y) | semantic mIoU | SegDM mIoU | texture accuracy |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for mode, row in r["prompt_modes"].items():
            title = {"tags": "seg tags (the default)", "fixed": "fixed, empty"}[mode]
            lines.append(
                f"| {title} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                f"{row['semantic_miou']:.3f} | {row['seg_miou']:.3f} | "
                f"{row['texture_accuracy']:.3f} |"
            )
    if "class_scale" in r:
        cs = r["class_scale"]
        lines += [
            "",
            "Per-class control (`--class-scale`, SegSR, first training run, mean over sampling "
            "seeds): mean absolute change of the output's luma against the unscaled output, "
            "inside the horizontal-stripe regions and elsewhere, and the texture accuracy of "
            "that class and of the others:",
            "",
            "| setting | change in class | change elsewhere | stripes accuracy | "
            "others' accuracy | PSNR (Y) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, _ in CLASS_SCALES:
            row = cs[label]
            others = np.mean([row[f"texture_class{i}"] for i in (1, 2, 3)])
            ch = (
                f"{row['change_in_class']:.2f} | {row['change_elsewhere']:.2f}"
                if "change_in_class" in row
                else "– | –"
            )
            lines.append(
                f"| {label} | {ch} | {row['texture_class0']:.3f} | {others:.3f} | "
                f"{row['psnr']:.2f} |"
            )
        noise = cs["seed noise"]
        lines.append(
            f"| another sampling seed, unscaled (the noise floor) | "
            f"{noise['change_in_class']:.2f} | {noise['change_elsewhere']:.2f} | – | – | – |"
        )
    if r.get("variants"):
        lines += render_variants(r)
    if "steps_sweep" in r:
        lines += render_sweep(
            r["steps_sweep"], r["fastest_within"], r["test_set"]["count"], r.get("machine", "")
        )
    return lines


# Line colours of the steps plot, per sampler (DDPM is one point at 50 steps).
PLOT_COLOURS = {"ddpm": (0, 0, 0), "ddim": (31, 119, 180), "dpmpp_2m": (214, 39, 40)}


def sweep_plot(sweep: dict, panel: tuple[int, int] = (260, 190)) -> np.ndarray:
    """Quality against steps as a picture: one panel per score the sweep has (PSNR, SSIM,
    semantic mIoU, SegDM mIoU), steps on a log axis, a line per sampler."""
    from PIL import ImageDraw

    cols = [
        (k, t)
        for k, t in (
            ("psnr", "PSNR (Y), dB"),
            ("ssim", "SSIM (Y)"),
            ("semantic_miou", "semantic mIoU"),
            ("seg_miou", "SegDM mIoU"),
            ("texture_accuracy", "texture accuracy"),
        )
        if k in next(iter(sweep.values()))
    ]
    points: dict[str, list[tuple[int, dict]]] = {}
    for name, row in sweep.items():
        sampler, steps = name.split()
        points.setdefault(sampler, []).append((int(steps), row))
    all_steps = [n for pts in points.values() for n, _ in pts]
    lo, hi = np.log(min(all_steps)), np.log(max(all_steps))
    pw, ph = panel
    left, right, top, bottom = 44, 10, 22, 26
    canvas = images.Image.new("RGB", (pw * len(cols), ph + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (key, title) in enumerate(cols):
        x0 = j * pw
        values = [row[key] for pts in points.values() for _, row in pts]
        vmin, vmax = min(values), max(values)
        pad = (vmax - vmin) * 0.1 or abs(vmax) * 0.01 or 0.01
        vmin, vmax = vmin - pad, vmax + pad

        def xy(n, v, x0=x0, vmin=vmin, vmax=vmax):
            x = x0 + left + (np.log(n) - lo) / (hi - lo or 1) * (pw - left - right)
            y = top + (vmax - v) / (vmax - vmin) * (ph - top - bottom)
            return x, y

        draw.text((x0 + left, 4), title, fill="black")
        draw.rectangle((x0 + left, top, x0 + pw - right, ph - bottom), outline=(160, 160, 160))
        for v in (vmin + pad, vmax - pad):
            draw.text((x0 + 2, xy(1, v)[1] - 5), f"{v:.3g}", fill="black")
        for n in sorted(set(all_steps)):
            x, _ = xy(n, vmin)
            draw.text((x - 6, ph - bottom + 4), str(n), fill="black")
        for sampler, pts in points.items():
            colour = PLOT_COLOURS.get(sampler, (0, 128, 0))
            line = [xy(n, row[key]) for n, row in sorted(pts, key=lambda p: p[0])]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for x, y in line:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    x = 4
    for sampler in points:
        colour = PLOT_COLOURS.get(sampler, (0, 128, 0))
        draw.rectangle((x, ph + 3, x + 10, ph + 13), fill=colour)
        draw.text((x + 14, ph + 2), f"{sampler} (steps on a log axis)", fill="black")
        x += 190
    return np.asarray(canvas)


def make_grid(test: Path, out: Path, names: list[str], num_classes: int) -> np.ndarray:
    """Rows: scenes; columns: LQ, bicubic, the three arms, HR, true labels, SegDM's labels."""

    cols = ["LQ", "bicubic", "SRDM only", "fixed prior", "SegSR", "HR", "labels", "SegDM"]
    rows = []
    for name in names:
        hr = images.read_image(test / "hr" / f"{name}_hr.png")
        hw = hr.shape[:2]
        lq = images.read_image(test / "lq" / f"{name}.png")
        label = np.asarray(images.Image.open(test / "labels" / f"{name}_label.png"))
        seg = np.asarray(
            images.Image.open(out / "joint" / "seed0" / "seg" / f"{name}_seg_labels.png")
        )
        arms = [images.read_image(out / a / "seed0" / "sr" / f"{name}_sr.png") for a in ARMS]
        rows.append(
            images.side_by_side(
                images.resize(lq, hw, resample=images.Image.NEAREST),
                images.resize(lq, hw),
                *arms,
                hr,
                images.colorize(label, num_classes),
                images.colorize(seg, num_classes),
                gap=4,
            )
        )
    w, cell = rows[0].shape[1], rows[0].shape[0]
    gap = np.full((4, w, 3), 255, np.uint8)
    parts = [header_row(cols, w, cell + 4)]
    for row in rows:
        parts += [row, gap]
    return np.concatenate(parts[:-1])


def header_row(titles: list[str], width: int, pitch: int) -> np.ndarray:
    """A white 16 px strip with a title every ``pitch`` pixels (the columns of a picture)."""
    from PIL import ImageDraw

    header = images.Image.new("RGB", (width, 16), "white")
    draw = ImageDraw.Draw(header)
    for i, c in enumerate(titles):
        draw.text((i * pitch + 2, 2), c, fill="black")
    return np.asarray(header)


def run(args) -> dict:
    """Make the test set, sample and score every arm, write the results; returns them."""
    from segsr_jax import evaluate

    runs, out = Path(args.runs), Path(args.out)
    test = runs / "testset"
    make_test_set(test, args.count, args.size, args.num_classes, args.benchmark)
    names = sorted(p.stem for p in (test / "lq").glob("*.png"))
    lqs = [images.read_image(test / "lq" / f"{n}.png") for n in names]
    truths = [np.asarray(images.Image.open(test / "labels" / f"{n}_label.png")) for n in names]
    hw = truths[0].shape
    segmenter = evaluate.load_segmenter(runs / "segmenter" / "checkpoints")
    work = runs / "experiment"

    def score(pred: Path, seg_pred: Path | None = None) -> dict:
        ev = evaluate.evaluate_folders(
            pred,
            test / "hr",
            labels=test / "labels",
            segmenter=segmenter,
            seg_pred=seg_pred,
            crop_border=4,
            use_pyiqa=False,
            progress=False,
        )
        if args.benchmark != "aliased":
            return ev.mean
        acc, per_class, _ = texture_scores(pred, names, truths)
        return {
            **ev.mean,
            "texture_accuracy": acc,
            **{f"texture_class{i}": v for i, v in enumerate(per_class)},
        }

    refs = {}
    for n, lq in zip(names, lqs, strict=True):
        images.write_png(work / "bicubic" / f"{n}_sr.png", images.resize(lq, hw))
    refs["bicubic"] = score(work / "bicubic")
    from segsr_jax import metrics

    conf = sum(
        metrics.confusion(
            evaluate.semantic_labels(segmenter, images.read_image(test / "hr" / f"{n}_hr.png")),
            y,
            args.num_classes,
        )
        for n, y in zip(names, truths, strict=True)
    )
    refs["hr"] = {"semantic_miou": metrics.miou(conf)[0]}
    if args.benchmark == "aliased":
        acc, per_class, _ = texture_scores(test / "hr", names, truths, "_hr")
        refs["hr"]["texture_accuracy"] = acc
        refs["hr"].update({f"texture_class{i}": v for i, v in enumerate(per_class)})
        refs["vae"] = vae_roundtrip(runs / "seg" / "checkpoints", test, names, work / "vae", score)
    arms = {}
    for arm in ARMS:
        per_run, trajs, secs = [], [], []
        for ts in args.train_seeds:
            run_dir = runs / (arm if ts == 0 else f"{arm}_s{ts}")
            restorer = load_restorer(run_dir / "checkpoints", args.seg_grid)
            per_seed = []
            for seed in range(args.seeds):
                d = work / (arm if ts == 0 else f"{arm}_s{ts}") / f"seed{seed}"
                traj, s = sample_arm(restorer, SEG_PRIOR[arm], lqs, names, d, seed, args.steps, hw)
                per_seed.append(score(d / "sr", d / "seg"))
                trajs.append(trajectory_miou(traj, truths, args.num_classes))
                secs.append(s)
                print(
                    f"{arm} training seed {ts} sampling seed {seed}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in per_seed[-1].items()),
                    flush=True,
                )
            per_run.append({k: statistics.fmean(m[k] for m in per_seed) for k in per_seed[0]})
        arms[arm] = {k: mean_std([m[k] for m in per_run]) for k in per_run[0]}
        arms[arm]["seg_prior"] = SEG_PRIOR[arm]
        arms[arm]["trajectory_miou"] = {
            "mean": np.mean(trajs, 0).tolist(),
            "per_run_and_seed": trajs,
        }
        arms[arm]["sampling_seconds"] = secs
        if arm in BRIDGE_PRIOR:
            arms[arm]["bridge"] = measure_bridge(runs / arm, test, names, BRIDGE_PRIOR[arm])
    if args.benchmark == "aliased":  # does SRDM read C_t? The first joint run sampled without
        joint = load_restorer(runs / "joint" / "checkpoints", args.seg_grid)
        per_seed = []
        for seed in range(args.seeds):
            d = work / "joint_without_c_t" / f"seed{seed}"
            sample_arm(joint, "none", lqs, names, d, seed, args.steps, hw)
            per_seed.append(score(d / "sr"))
        arms["joint"]["without_c_t"] = {
            k: statistics.fmean(m[k] for m in per_seed) for k in per_seed[0]
        }
    results = {
        "benchmark": args.benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "machine": f"{os.cpu_count()} CPU cores, {cpu_model()}",
        "steps": args.steps,
        "seg_grid": args.seg_grid,
        "seeds": list(range(args.seeds)),
        "train_seeds": list(args.train_seeds),
        "test_set": {"count": len(names), "size": int(hw[0]), "seed": TEST_SEED},
        "training_minutes": stage_minutes(runs),
        "references": refs,
        "arms": arms,
    }
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        results["variant"] = args.variant
    if args.benchmark == "aliased" and not args.arms_only:  # issue 15's options, joint arm
        joint = load_restorer(runs / "joint" / "checkpoints", args.seg_grid)
        extra = work / "extras"
        results["prompt_modes"] = prompt_modes(
            joint, lqs, names, hw, extra / "prompt", score, args.seeds
        )
        results["class_scale"] = class_scale_effect(
            joint, lqs, names, truths, hw, extra / "class_scale", score, args.seeds
        )
        results["steps_sweep"] = steps_sweep(joint, lqs, names, truths, hw, extra / "sweep", score)
        results["fastest_within"] = fastest_within(results["steps_sweep"])
        images.write_png(out / "steps_sweep.png", sweep_plot(results["steps_sweep"]))
        images.write_png(out / "class_scale.png", class_scale_picture(test, extra, names[0]))
    images.write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    images.write_atomic(out / "results.md", (render_table(results) + "\n").encode())
    if args.record_in:
        record_variant(Path(args.record_in), results, out)
    grid = make_grid(test, work, names[: args.grid_rows], args.num_classes)
    images.write_png(out / "grid.png", grid)
    return results


def run_sweep_only(args) -> list[str]:
    """``--sweep-only``: the steps sweep of one checkpoint, written and rendered."""
    from segsr_jax import evaluate

    runs, out = Path(args.runs), Path(args.out)
    test = runs / "testset"
    make_test_set(test, args.count, args.size, args.num_classes, args.benchmark)
    names = sorted(q.stem for q in (test / "lq").glob("*.png"))
    lqs = [images.read_image(test / "lq" / f"{n}.png") for n in names]
    truths = [np.asarray(images.Image.open(test / "labels" / f"{n}_label.png")) for n in names]

    seg_dir = runs / "segmenter" / "checkpoints"  # the semantic mIoU column, when trained
    segmenter = evaluate.load_segmenter(seg_dir) if seg_dir.is_dir() else None

    def score(pred: Path, seg_pred: Path | None = None) -> dict:
        ev = evaluate.evaluate_folders(
            pred, test / "hr", labels=test / "labels", segmenter=segmenter, seg_pred=seg_pred,
            crop_border=4, use_pyiqa=False, progress=False,
        )  # fmt: skip
        return dict(ev.mean)

    restorer = load_restorer(args.sweep_only, args.seg_grid)
    hw = truths[0].shape
    sweep = steps_sweep(restorer, lqs, names, truths, hw, runs / "sweep", score)
    result = {
        "checkpoint": args.sweep_only,
        "benchmark": args.benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{os.cpu_count()} CPU cores, {cpu_model()}",
        "test_set": {"count": len(names), "size": int(hw[0]), "seed": TEST_SEED},
        "seg_grid": args.seg_grid,
        "steps_sweep": sweep,
        "fastest_within": fastest_within(sweep),
    }
    out.mkdir(parents=True, exist_ok=True)
    images.write_atomic(out / "steps_sweep.json", json.dumps(result, indent=1).encode())
    images.write_png(out / "steps_sweep.png", sweep_plot(sweep))
    return render_sweep(sweep, result["fastest_within"], len(names), result["machine"])


def class_scale_picture(test: Path, extra: Path, name: str) -> np.ndarray:
    """One scene: LQ, the joint arm as trained, horizontal stripes x0 and x2, HR, labels."""
    hr = images.read_image(test / "hr" / f"{name}_hr.png")
    lq = images.read_image(test / "lq" / f"{name}.png")
    label = np.asarray(images.Image.open(test / "labels" / f"{name}_label.png"))
    folders = [extra / "class_scale" / lab.replace(" ", "_") for lab, _ in CLASS_SCALES]
    outs = [images.read_image(f / "seed0" / "sr" / f"{name}_sr.png") for f in folders]
    row = images.side_by_side(
        images.resize(lq, hr.shape[:2], resample=images.Image.NEAREST),
        *outs,
        hr,
        images.colorize(label, 4),
        gap=4,
    )
    row = images.resize(row, (row.shape[0] * 2, row.shape[1] * 2), resample=images.Image.NEAREST)
    titles = ["LQ", *(lab for lab, _ in CLASS_SCALES), "HR", "true labels"]
    return np.concatenate([header_row(titles, row.shape[1], 2 * (hr.shape[1] + 4)), row])


def main(argv=None) -> int:
    """Run the experiment (or only render its tables)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="synthetic", choices=tuple(BENCHMARKS))
    p.add_argument("--runs", default=None, help="the training runs' parent folder")
    p.add_argument("--out", default=None, help="results.json, results.md, grid.png")
    p.add_argument("--count", type=int, default=32, help="test scenes")
    p.add_argument("--size", type=int, default=96, help="HR side of the test scenes")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3, help="sampling seeds per training run")
    p.add_argument(
        "--seg-grid",
        default=SampleOptions.seg_grid,
        choices=SEG_GRIDS,
        help="the times SegDM is evaluated at (SampleOptions.seg_grid); the results recorded "
        "before 2026-12-04 used shared",
    )
    p.add_argument(
        "--train-seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 1],
        help="training runs per arm: 0 is runs/ARM, k runs/ARM_sK",
    )
    p.add_argument("--grid-rows", type=int, default=4)
    p.add_argument(
        "--arms-only",
        action="store_true",
        help="only the arms and references (a design variant): no prompt, per-class or steps "
        "measurements",
    )
    p.add_argument("--variant", default="", help="what this run changed (kept in results.json)")
    p.add_argument(
        "--record-in",
        metavar="RESULTS_JSON",
        default=None,
        help="also add this --variant's arms as a row of that (main) results.json's variants",
    )
    p.add_argument(
        "--render-only", action="store_true", help="print the tables of an existing results.json"
    )
    p.add_argument(
        "--sweep-only",
        metavar="CHECKPOINT",
        default=None,
        help="only the quality-against-steps sweep of CHECKPOINT on the benchmark's test set "
        "(semantic mIoU when RUNS/segmenter holds the evaluation segmenter), into "
        "OUT/steps_sweep.json",
    )
    args = p.parse_args(argv)
    runs, out, k = BENCHMARKS[args.benchmark]
    args.runs, args.out = args.runs or runs, args.out or out
    args.num_classes = args.num_classes or k
    if args.sweep_only:
        print("\n".join(run_sweep_only(args)))
        return 0
    if args.render_only:
        print(render_table(json.loads((Path(args.out) / "results.json").read_text())))
        return 0
    print(render_table(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
