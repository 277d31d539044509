"""SegDM's segmentation step by step: why its mIoU fell over the reverse process, and the fix.

Samples a benchmark's held-out test set (``scripts/tiny_experiment.py``'s, made if missing)
with a SegSR checkpoint, driving the sampler's own step (``sampling.reverse_step``) from
Python so that every step's state can be measured, once per way of re-embedding SegDM's
prediction (``SampleOptions.seg_reembed``)::

    python scripts/segdm_trajectory.py --checkpoint segsr_jax/assets/tiny_checkpoint \\
        --benchmark synthetic --out docs/experiment/segdm_trajectory.json

Per step: the mIoU of SegDM's predicted map against the true labels (upsampled to the image),
its mean top-class probability, and the size of the re-embedded estimate ``||S0_hat||``
relative to the one-hot embeddings SegDM saw in training (1 = a training-like state). The LQ
segmenter's mIoU is the reference the refinement should beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def trajectory(restorer, lqs, hrs, truths, hw, options, num_classes: int, variant: str) -> dict:
    """Per-step measurements of one sampling run over the whole test set (one batch).

    ``variant``: ``default`` (the sampler's own step, ``sampling.reverse_step``); ``no_i_t``
    (SegDM gets no image-to-segmentation message ``I_t``; SRDM runs as usual); ``oracle_z``
    (SegDM's ``I_t`` comes from the HR latent noised to the step's time, as in training,
    while SRDM runs as usual).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from segsr_jax import metrics
    from segsr_jax.diffusion import geometry, samplers, sampling
    from segsr_jax.diffusion.schedules import NoiseConfig, alphas_cumprod

    session = restorer.session
    f = restorer.config.latent_factor
    batch = jnp.asarray(geometry.model_input(lqs, hw, f))
    hr = jnp.asarray(geometry.model_input(hrs, hw, f))
    plan = session.plan(tuple(batch.shape[1:3]), options)
    assert len(plan.tiles) == 1, "the analysis drives an untiled plan"
    schedule = session.schedule(options)
    if options.prompt_mode == "tags":
        prompts = session.tag_prompts(restorer.state, batch, plan, options, None)
        ctx = session.prompt_contexts(restorer.state, prompts)
    else:
        ctx = session.context(restorer.state, options.prompt, len(lqs))
    graphdef = restorer.graphdef
    ac = jnp.asarray(alphas_cumprod(NoiseConfig(prediction_type=restorer.config.prediction_type)))

    @jax.jit
    def prepare(state, lq, c, key):
        return sampling._prepare(nnx.merge(graphdef, state), plan, lq, c, None, 1.0, key)

    @jax.jit
    def step(state, cond, carry, s, z_hr, eps):
        model = nnx.merge(graphdef, state)
        if variant == "default":
            new = sampling.reverse_step(model, plan, cond, carry, s)
        else:
            args = (s.timestep, s.seg.time, cond.z_lq, cond.f_lq, cond.context, None, 1.0)
            both = (True, variant != "no_i_t")
            model_out, seg_logits = model.denoise(carry.sr.x, carry.s_t, *args, use_bridge=both)
            if variant == "oracle_z":
                a = ac[jnp.maximum(s.timestep, 0)]
                z_or = jnp.sqrt(a) * z_hr + jnp.sqrt(1 - a) * eps
                _, seg_logits = model.denoise(z_or, carry.s_t, *args, use_bridge=(True, True))
            sr = samplers.sr_step(s.sr, carry.sr, model_out, jnp.zeros_like(carry.sr.x))
            if plan.seg_reembed == "hard":
                s0 = model.segdm.embed_labels(jnp.argmax(seg_logits, -1))
            else:
                s0 = model.segdm.embed_probs(jax.nn.softmax(seg_logits, -1))
            new = sampling.Carry(
                sr=sr, s_t=samplers.seg_step(s.seg, carry.s_t, s0), key=carry.key,
                seg_logits=seg_logits, seg_probs=carry.seg_probs,
            )  # fmt: skip
        probs = jax.nn.softmax(new.seg_logits, axis=-1)
        soft = model.segdm.embed_probs(probs)
        hard = model.segdm.embed_labels(jnp.argmax(new.seg_logits, -1))
        norm = jnp.mean(jnp.linalg.norm(soft, axis=-1)) / jnp.mean(jnp.linalg.norm(hard, axis=-1))
        return new, probs, jnp.mean(probs.max(-1)), norm

    cond, carry, lq_labels = prepare(restorer.state, batch, ctx, jax.random.key(options.seed))
    model = nnx.merge(graphdef, restorer.state)
    z_hr = jax.jit(lambda x: model.vae.encode_latent(x))(hr)
    eps = jax.random.normal(jax.random.key(options.seed + 100), z_hr.shape)

    def confusions(labels) -> np.ndarray:  # [scenes, K, K]
        return scene_confusions(labels, truths, num_classes, f)

    def miou(labels) -> float:
        return metrics.miou(confusions(labels).sum(0))[0]

    out = {
        "miou": [],
        "mean_miou": [],  # the argmax of the mean of the probabilities of steps 1..i
        "confidence": [],
        "reembed_norm": [],
        "lq_segmenter_miou": miou(lq_labels),
    }
    per_scene = []  # [steps, scenes, K, K]: for the paired bootstrap (not written to JSON)
    total = 0.0
    for i in range(len(schedule)):
        s = jax.tree.map(lambda a, i=i: a[i], schedule)
        carry, probs, conf, norm = step(restorer.state, cond, carry, s, z_hr, eps)
        total = total + np.asarray(probs)
        per_scene.append(confusions(probs.argmax(-1)))
        out["miou"].append(metrics.miou(per_scene[-1].sum(0))[0])
        out["mean_miou"].append(miou(total.argmax(-1)))
        out["confidence"].append(float(conf))
        out["reembed_norm"].append(float(norm))
    out["confusions"] = np.stack(per_scene)
    return out


def batched_miou(conf: np.ndarray) -> np.ndarray:
    """:func:`segsr_jax.metrics.miou` over the leading axes of ``conf [..., K, K]``."""
    conf = np.asarray(conf, np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-2) + conf.sum(-1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return np.nanmean(iou, axis=-1)


def paired_bootstrap(confusions: np.ndarray, draws: int = 2000, seed: int = 0) -> dict:
    """The last step against every other step, resampling the scenes (paired: one resample
    serves every step and sampling seed).

    ``confusions``: ``[seeds, steps, scenes, K, K]`` per-scene confusion matrices. A step's
    mIoU is that of the confusion summed over the scenes, averaged over the seeds (the
    trajectory's own statistic). Returns, with 95% percentile intervals over ``draws``
    resamples: ``step_minus_last`` (``[steps]`` point estimates, lows, highs),
    ``best_minus_last`` (the best step of each resample against its last step: selection
    included, so it is biased upward) and ``better_steps``, the 1-based steps whose whole
    interval lies above the last step.
    """
    confusions = np.asarray(confusions)
    n = confusions.shape[2]
    point = batched_miou(confusions.sum(2)).mean(0)  # [steps]
    rng = np.random.default_rng(seed)
    diffs, bests = [], []
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        m = batched_miou(confusions[:, :, idx].sum(2)).mean(0)
        diffs.append(m - m[-1])
        bests.append(m.max() - m[-1])
    lo, hi = np.percentile(np.stack(diffs), [2.5, 97.5], axis=0)
    b_lo, b_hi = np.percentile(bests, [2.5, 97.5])
    return {
        "draws": draws,
        "scenes": n,
        "step_miou": point.tolist(),
        "step_minus_last": {
            "point": (point - point[-1]).tolist(),
            "low": lo.tolist(),
            "high": hi.tolist(),
        },
        "best_minus_last": {
            "point": float(point.max() - point[-1]),
            "low": float(b_lo),
            "high": float(b_hi),
        },
        "better_steps": [i + 1 for i in range(len(point)) if lo[i] > 0],
    }


SPLITS = {"test": "testset", "val": "valset", "check": "checkset"}  # folder in the runs dir


def add_scene_args(p: argparse.ArgumentParser, *, count: int, split: str) -> None:
    """The arguments every trajectory measurement takes: the checkpoint, which scenes and how
    many, the sampler's steps and seeds, the bootstrap and the output file."""
    from tiny_experiment import BENCHMARKS

    p.add_argument("--checkpoint")
    p.add_argument("--benchmark", default="synthetic", choices=tuple(BENCHMARKS))
    p.add_argument("--count", type=int, default=count)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", help="a .json file")
    p.add_argument(
        "--split",
        default=split,
        choices=tuple(SPLITS),
        help="the held-out test scenes, validation scenes (another seed) for choices, or "
        "confirmation scenes (a third seed; use a larger --count) for the last step against "
        "the best, with a paired bootstrap over the scenes",
    )
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="resamples for --split check's intervals"
    )


def load_scenes(benchmark: str, split: str, count: int, size: int) -> dict:
    """A split's scenes (``tiny_experiment.make_test_set``'s, made if missing): ``seed``,
    ``num_classes``, ``names``, ``lqs``, ``hrs`` and ``truths`` (label maps)."""
    from tiny_experiment import BENCHMARKS, CHECK_SEED, TEST_SEED, VAL_SEED, make_test_set

    from segsr_jax import images

    runs, _, k = BENCHMARKS[benchmark]
    seed = {"test": TEST_SEED, "val": VAL_SEED, "check": CHECK_SEED}[split]
    folder = Path(runs) / SPLITS[split]
    make_test_set(folder, count, size, k, benchmark, seed)
    names = sorted(q.stem for q in (folder / "lq").glob("*.png"))
    return {
        "seed": seed,
        "num_classes": k,
        "names": names,
        "lqs": [images.read_image(folder / "lq" / f"{n}.png") for n in names],
        "hrs": [images.read_image(folder / "hr" / f"{n}_hr.png") for n in names],
        "truths": [
            np.asarray(images.Image.open(folder / "labels" / f"{n}_label.png")) for n in names
        ],
    }


def scene_confusions(labels, truths: list, num_classes: int, factor: int) -> np.ndarray:
    """``[scenes, K, K]`` confusion matrices of latent-resolution ``labels [B, h, w]`` (the
    sampler's padded batch) upsampled to each true label map."""
    from tiny_experiment import upsample_labels

    from segsr_jax import metrics

    hw = truths[0].shape
    lh, lw = -(-hw[0] // factor), -(-hw[1] // factor)
    labels = np.asarray(labels)[:, :lh, :lw]
    return np.stack(
        [
            metrics.confusion(upsample_labels(y, hw), t, num_classes)
            for y, t in zip(labels, truths, strict=True)
        ]
    )


VARIANTS = {
    "default/soft": "as sampled (soft re-embedding)",
    "default/hard": "hard re-embedding (`seg_reembed hard`)",
    "no_i_t/soft": "SegDM without the bridge's message I_t",
    "oracle_z/soft": "I_t from the noised HR latent (what training showed SegDM)",
}


def render(results: list[dict]) -> str:
    """The README's table (markdown) from one or more trajectory JSON files (a column for how
    SegDM was trained when any of them carries a ``label``)."""
    steps = results[0]["steps"]
    picks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, max(steps - 2, 0), steps - 1})
    labelled = any(r.get("label") for r in results)
    lines = [
        "| benchmark | "
        + ("SegDM trained | " if labelled else "")
        + "variant | LQ segmenter | "
        + " | ".join(f"step {i + 1}" for i in picks)
        + " | best step | mean over steps |",
        "| --- | --- | --- |" + " --- |" * (len(picks) + 2 + labelled),
    ]
    for r in results:
        for key, title in VARIANTS.items():
            if key not in r["modes"]:
                continue
            m = r["modes"][key]
            bench = r["benchmark"] + (" (validation)" if _split(r) == "val" else "")
            lines.append(
                f"| {bench} | "
                + (f"{r.get('label', '')} | " if labelled else "")
                + f"{title} | {m['lq_segmenter_miou']:.3f} | "
                + " | ".join(f"{m['miou'][i]:.3f}" for i in picks)
                + f" | {max(m['miou']):.3f} | **{m['mean_miou'][-1]:.3f}** |"
            )
    return "\n".join(lines)


def _split(result: dict) -> str:
    """``test``, ``val`` or ``check``: which scenes a trajectory file measured."""
    return result.get("test_set", {}).get("split", "test")


def _grid(result: dict) -> str:
    """The seg grid a trajectory file was sampled on (``SampleOptions.seg_grid``; files made
    before the option existed used ``shared``)."""
    return result.get("seg_grid", "shared")


def _validation_files(results: list[dict]) -> dict:
    """``(benchmark, checkpoint, seg grid) -> result`` of the validation-scene files among
    ``results``."""
    return {_key(r): r for r in results if _split(r) == "val"}


def _key(result: dict) -> tuple[str, str, str]:
    return result["benchmark"], result["checkpoint"], _grid(result)


def _best_step(curve: list[float]) -> int:
    """The 0-based step of the highest mIoU (ties: the later step)."""
    return max(range(len(curve)), key=lambda i: (curve[i], i))


def render_end(results: list[dict]) -> str:
    """The end of the trajectory against its best step, for each checkpoint measured on both
    the validation and the test scenes (``default/soft``): the best step is picked on the
    validation scenes and scored on the test scenes, beside the step picked on the test
    scenes themselves (the maximum of 20 noisy values, biased upward)."""
    key = "default/soft"
    val = _validation_files(results)
    lines = [
        "| benchmark | SegDM trained | step picked on validation | its mIoU on test | last step "
        "| mean over steps | best step picked on test |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        v = val.get(_key(r))
        if _split(r) != "test" or v is None or key not in r["modes"]:
            continue
        m, mv = r["modes"][key], v["modes"][key]["miou"]
        pick = _best_step(mv)
        lines.append(
            f"| {r['benchmark']} | {r.get('label', '')} | {pick + 1} | {m['miou'][pick]:.3f} | "
            f"{m['miou'][-1]:.3f} | {m['mean_miou'][-1]:.3f} | {max(m['miou']):.3f} |"
        )
    return "\n".join(lines)


def render_check(results: list[dict]) -> str:
    """The last step against every other step on the confirmation scenes (``--split check``),
    for each checkpoint measured there (``default/soft``): the best step of the curve and its
    paired-bootstrap interval against the last, the steps whose whole interval lies above the
    last step, and, where a validation file of the same checkpoint and seg grid is among
    ``results``, the step picked on validation scenes scored here."""
    key = "default/soft"
    val = _validation_files(results)
    lines = [
        "| benchmark | SegDM trained | seg grid | scenes | last step | best step "
        "| best minus last (95% CI) | steps above the last (95%) | step picked on validation "
        "| mean over steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    check = [r for r in results if _split(r) == "check" and key in r["modes"]]
    # One checkpoint's grids side by side, the shared grid (the older results) first.
    for r in sorted(
        check, key=lambda r: (r["benchmark"], r.get("label", ""), _grid(r) != "shared")
    ):
        m = r["modes"][key]
        miou, b = m["miou"], m["paired"]["best_minus_last"]
        best = _best_step(miou)
        v = val.get(_key(r))
        picked = "–"
        if v is not None and key in v["modes"]:
            pick = _best_step(v["modes"][key]["miou"])
            picked = f"{pick + 1}: {miou[pick]:.3f}"
        above = ", ".join(str(i) for i in m["paired"]["better_steps"]) or "none"
        lines.append(
            f"| {r['benchmark']} | {r.get('label', '')} | {_grid(r)} | {m['paired']['scenes']} | "
            f"{miou[-1]:.3f} | {best + 1}: {miou[best]:.3f} | "
            f"{b['point']:+.3f} ({b['low']:+.3f}, {b['high']:+.3f}) | {above} | {picked} | "
            f"{m['mean_miou'][-1]:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Measure and write the trajectories."""
    import dataclasses

    from segsr_jax import images
    from segsr_jax.diffusion.options import SEG_GRIDS, SampleOptions
    from segsr_jax.inference import Restorer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scene_args(p, count=32, split="test")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    p.add_argument("--label", default="", help="what the checkpoint is, for the table")
    p.add_argument(
        "--seg-grid",
        default=SampleOptions.seg_grid,
        choices=SEG_GRIDS,
        help="the times SegDM is evaluated at (SampleOptions.seg_grid; the results recorded "
        "before 2026-12-04 used shared)",
    )
    p.add_argument(
        "--render", nargs="+", metavar="JSON", help="only print the table of these results"
    )
    args = p.parse_args(argv)
    if args.render:
        results = [json.loads(Path(f).read_text()) for f in args.render]
        splits = {_split(r) for r in results}
        if "check" in splits:
            print(render_check(results))
            return 0
        print(render(results))
        if "val" in splits:
            print("\n" + render_end(results))
        return 0
    if not (args.out and args.checkpoint):
        p.error("--checkpoint and --out are required (or --render)")
    variants = [tuple(v.split("/")) for v in args.variants.split(",")]
    unknown = [v for v in variants if "/".join(v) not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    scenes = load_scenes(args.benchmark, args.split, args.count, args.size)
    seed, k, names = scenes["seed"], scenes["num_classes"], scenes["names"]
    lqs, hrs, truths = scenes["lqs"], scenes["hrs"], scenes["truths"]
    restorer = Restorer.from_checkpoint(args.checkpoint)
    base = restorer.options(
        sampler="ddim", steps=args.steps, guidance=1.0, prompt="", seg_grid=args.seg_grid
    )
    result = {
        "checkpoint": args.checkpoint,
        "benchmark": args.benchmark,
        "test_set": {"count": len(names), "size": args.size, "split": args.split, "seed": seed},
        "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "label": args.label,
        "seg_grid": args.seg_grid,
        "modes": {},
    }
    for variant, mode in variants:
        runs_ = [
            trajectory(
                restorer,
                lqs,
                hrs,
                truths,
                truths[0].shape,
                dataclasses.replace(base, seg_reembed=mode, seed=seed),
                k,
                variant,
            )
            for seed in range(args.seeds)
        ]
        name = f"{variant}/{mode}"
        confusions = np.stack([r.pop("confusions") for r in runs_])
        result["modes"][name] = {
            key: np.mean([r[key] for r in runs_], axis=0).tolist() for key in runs_[0]
        }
        m = result["modes"][name]
        if args.split == "check":
            m["paired"] = paired_bootstrap(confusions, args.bootstrap)
            b = m["paired"]["best_minus_last"]
            print(
                f"{name}: best step minus last {b['point']:+.4f} "
                f"[{b['low']:+.4f}, {b['high']:+.4f}]; steps better than the last: "
                f"{m['paired']['better_steps'] or 'none'}",
                flush=True,
            )
        print(
            f"{name}: LQ segmenter {m['lq_segmenter_miou']:.3f}; mIoU by step "
            + " ".join(f"{v:.3f}" for v in m["miou"])
            + "; step-mean map "
            + " ".join(f"{v:.3f}" for v in m["mean_miou"])
            + "; confidence "
            + " ".join(f"{v:.2f}" for v in m["confidence"][:: max(1, args.steps // 5)]),
            flush=True,
        )
    images.write_atomic(Path(args.out), json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
