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

ARMS = {
    "sronly": "SRDM only",
    "prior": "SRDM + fixed LQ-segmenter prior",
    "joint": "SegSR (SegDM + DMB)",
}
SEG_PRIOR = {"sronly": "none", "prior": "fixed", "joint": "diffusion"}
TEST_SEED = 20_001  # training scenes use source seed 0, the demo images 10_001
SCALE = 4
# --benchmark: (runs folder, output folder, classes)
BENCHMARKS = {
    "synthetic": ("runs/tiny", "docs/experiment", 8),
    "aliased": ("runs/aliased", "docs/experiment/aliased", 4),
}


def make_test_set(
    folder: Path, count: int, size: int, num_classes: int, benchmark: str = "synthetic"
) -> None:
    """Held-out scenes: ``hr/``, ``lq/`` (the training degradation, seeded per scene) and
    ``labels/``; written once (an existing complete set is kept)."""
    from segsr_jax.data.aliased import AliasedConfig, make_aliased_scene
    from segsr_jax.data.degradations import DegradationConfig, degrade
    from segsr_jax.data.synthetic import SceneConfig, make_scene

    kind = "" if benchmark == "synthetic" else f"{benchmark} "
    stamp = f"{count} {kind}scenes of {size} px, {num_classes} classes, seed {TEST_SEED}\n"
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
        hr, label = scene((TEST_SEED, i))
        rng = np.random.default_rng((TEST_SEED, i, 1))  # a stream apart from the scene's
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
) -> tuple[list[np.ndarray], float]:
    """Sample one arm for one seed: writes ``sr/<name>_sr.png`` and
    ``seg/<name>_seg_labels.png``; returns the per-step label trajectories (upsampled to ``hw``)
    and the sampling seconds (the first call of a restorer also compiles)."""
    opts = restorer.options(
        sampler="ddim",
        steps=steps,
        guidance=1.0,
        prompt="",
        negative_prompt="",
        seg_prior=seg_prior,
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
        f"DDIM {r['steps']} steps, no CFG. Each arm was trained {len(r['train_seeds'])} "
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
    return "\n".join(lines)


def make_grid(test: Path, out: Path, names: list[str], num_classes: int) -> np.ndarray:
    """Rows: scenes; columns: LQ, bicubic, the three arms, HR, true labels, SegDM's labels."""
    from PIL import ImageDraw

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
    header = images.Image.new("RGB", (w, 16), "white")
    draw = ImageDraw.Draw(header)
    for i, c in enumerate(cols):
        draw.text((i * (cell + 4) + 2, 2), c, fill="black")
    gap = np.full((4, w, 3), 255, np.uint8)
    parts = [np.asarray(header)]
    for row in rows:
        parts += [row, gap]
    return np.concatenate(parts[:-1])


def run(args) -> dict:
    """Make the test set, sample and score every arm, write the results; returns them."""
    from segsr_jax import evaluate
    from segsr_jax.inference import Restorer

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
        return {**ev.mean, "texture_accuracy": texture_scores(pred, names, truths)[0]}

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
        refs["hr"]["texture_accuracy"] = texture_scores(test / "hr", names, truths, "_hr")[0]
        refs["vae"] = vae_roundtrip(runs / "seg" / "checkpoints", test, names, work / "vae", score)
    arms = {}
    for arm in ARMS:
        per_run, trajs, secs = [], [], []
        for ts in args.train_seeds:
            run_dir = runs / (arm if ts == 0 else f"{arm}_s{ts}")
            restorer = Restorer.from_checkpoint(run_dir / "checkpoints")
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
    results = {
        "benchmark": args.benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "machine": f"{os.cpu_count()} CPU cores",
        "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "train_seeds": list(args.train_seeds),
        "test_set": {"count": len(names), "size": int(hw[0]), "seed": TEST_SEED},
        "training_minutes": stage_minutes(runs),
        "references": refs,
        "arms": arms,
    }
    out.mkdir(parents=True, exist_ok=True)
    images.write_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    images.write_atomic(out / "results.md", (render_table(results) + "\n").encode())
    grid = make_grid(test, work, names[: args.grid_rows], args.num_classes)
    images.write_png(out / "grid.png", grid)
    return results


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
        "--train-seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 1],
        help="training runs per arm: 0 is runs/ARM, k runs/ARM_sK",
    )
    p.add_argument("--grid-rows", type=int, default=4)
    p.add_argument(
        "--render-only", action="store_true", help="print the tables of an existing results.json"
    )
    args = p.parse_args(argv)
    runs, out, k = BENCHMARKS[args.benchmark]
    args.runs, args.out = args.runs or runs, args.out or out
    args.num_classes = args.num_classes or k
    if args.render_only:
        print(render_table(json.loads((Path(args.out) / "results.json").read_text())))
        return 0
    print(render_table(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
