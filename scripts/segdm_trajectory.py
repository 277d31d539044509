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
    from tiny_experiment import upsample_labels

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
    lh, lw = -(-hw[0] // f), -(-hw[1] // f)

    def miou(labels) -> float:
        labels = np.asarray(labels)[:, :lh, :lw]
        conf = sum(
            metrics.confusion(upsample_labels(y, hw), t, num_classes)
            for y, t in zip(labels, truths, strict=True)
        )
        return metrics.miou(conf)[0]

    out = {
        "miou": [],
        "mean_miou": [],  # the argmax of the mean of the probabilities of steps 1..i
        "confidence": [],
        "reembed_norm": [],
        "lq_segmenter_miou": miou(lq_labels),
    }
    total = 0.0
    for i in range(len(schedule)):
        s = jax.tree.map(lambda a, i=i: a[i], schedule)
        carry, probs, conf, norm = step(restorer.state, cond, carry, s, z_hr, eps)
        total = total + np.asarray(probs)
        out["miou"].append(miou(probs.argmax(-1)))
        out["mean_miou"].append(miou(total.argmax(-1)))
        out["confidence"].append(float(conf))
        out["reembed_norm"].append(float(norm))
    return out


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
            split = r.get("test_set", {}).get("split", "test")
            bench = r["benchmark"] + (" (validation)" if split == "val" else "")
            lines.append(
                f"| {bench} | "
                + (f"{r.get('label', '')} | " if labelled else "")
                + f"{title} | {m['lq_segmenter_miou']:.3f} | "
                + " | ".join(f"{m['miou'][i]:.3f}" for i in picks)
                + f" | {max(m['miou']):.3f} | **{m['mean_miou'][-1]:.3f}** |"
            )
    return "\n".join(lines)


def render_end(results: list[dict]) -> str:
    """The end of the trajectory against its best step, for each checkpoint measured on both
    the validation and the test scenes (``default/soft``): the best step is picked on the
    validation scenes and scored on the test scenes, beside the step picked on the test
    scenes themselves (the maximum of 20 noisy values, biased upward)."""
    key = "default/soft"
    split = lambda r: r.get("test_set", {}).get("split", "test")  # noqa: E731
    val = {(r["benchmark"], r["checkpoint"]): r for r in results if split(r) == "val"}
    lines = [
        "| benchmark | SegDM trained | step picked on validation | its mIoU on test | last step "
        "| mean over steps | best step picked on test |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        v = val.get((r["benchmark"], r["checkpoint"]))
        if split(r) != "test" or v is None or key not in r["modes"]:
            continue
        m, mv = r["modes"][key], v["modes"][key]["miou"]
        pick = max(range(len(mv)), key=lambda i: (mv[i], i))  # ties: the later step
        lines.append(
            f"| {r['benchmark']} | {r.get('label', '')} | {pick + 1} | {m['miou'][pick]:.3f} | "
            f"{m['miou'][-1]:.3f} | {m['mean_miou'][-1]:.3f} | {max(m['miou']):.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Measure and write the trajectories."""
    import dataclasses

    from tiny_experiment import BENCHMARKS, TEST_SEED, VAL_SEED, make_test_set

    from segsr_jax import images
    from segsr_jax.inference import Restorer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--benchmark", default="synthetic", choices=tuple(BENCHMARKS))
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", help="a .json file")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    p.add_argument("--label", default="", help="what the checkpoint is, for the table")
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "val"),
        help="the held-out test scenes, or validation scenes (another seed) for choices",
    )
    p.add_argument(
        "--render", nargs="+", metavar="JSON", help="only print the table of these results"
    )
    args = p.parse_args(argv)
    if args.render:
        results = [json.loads(Path(f).read_text()) for f in args.render]
        print(render(results))
        if any(r.get("test_set", {}).get("split") == "val" for r in results):
            print("\n" + render_end(results))
        return 0
    if not (args.out and args.checkpoint):
        p.error("--checkpoint and --out are required (or --render)")
    variants = [tuple(v.split("/")) for v in args.variants.split(",")]
    unknown = [v for v in variants if "/".join(v) not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    runs, _, k = BENCHMARKS[args.benchmark]
    seed = TEST_SEED if args.split == "test" else VAL_SEED
    test = Path(runs) / ("testset" if args.split == "test" else "valset")
    make_test_set(test, args.count, args.size, k, args.benchmark, seed)
    names = sorted(q.stem for q in (test / "lq").glob("*.png"))
    lqs = [images.read_image(test / "lq" / f"{n}.png") for n in names]
    hrs = [images.read_image(test / "hr" / f"{n}_hr.png") for n in names]
    truths = [np.asarray(images.Image.open(test / "labels" / f"{n}_label.png")) for n in names]
    restorer = Restorer.from_checkpoint(args.checkpoint)
    base = restorer.options(sampler="ddim", steps=args.steps, guidance=1.0, prompt="")
    result = {
        "checkpoint": args.checkpoint,
        "benchmark": args.benchmark,
        "test_set": {"count": len(names), "size": args.size, "split": args.split, "seed": seed},
        "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "label": args.label,
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
        result["modes"][name] = {
            key: np.mean([r[key] for r in runs_], axis=0).tolist() for key in runs_[0]
        }
        m = result["modes"][name]
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
