"""What makes SegDM's last step trail the step before it: its inputs, swapped one at a time.

Samples a benchmark's scenes (``--split``: ``scripts/tiny_experiment.py``'s sets, made if
missing) with a SegSR checkpoint on the shared seg grid (``SampleOptions.seg_grid shared``,
where the lag was seen), driving the sampler's own step from Python, and evaluates the last
step's SegDM again with one input taken from the step before (step N-1) instead::

    python scripts/segdm_last_step.py --checkpoint runs/tiny_rollout/joint/checkpoints \\
        --split check --count 256 --out docs/experiment/last_step_inputs.json

SegDM reads four things at a step: the image state ``Z_t`` with SRDM's timestep (through the
bridge's ``I_t``), its own state ``S_t``, and its seg time. Whatever input restores the step
before's mIoU carries the lag. Each row is scored against the as-sampled last step with a
paired bootstrap over the scenes (``segdm_trajectory.paired_bootstrap``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Row key -> (what the last step's SegDM is given instead, from step N-1 unless named).
ROWS = {
    "step_before": "everything: step N-1's own map",
    "image": "Z_t and SRDM's timestep (so I_t)",
    "seg_state_and_time": "S_t and the seg time",
    "seg_time": "the seg time alone (t = 0.001 -> 0.051)",
    "seg_state": "S_t alone",
    "seg_state_hard": "S_t from step N-1's hard (one-hot) estimate",
    "seg_state_fresh": "S_t re-noised with fresh noise",
    "no_i_t": "no I_t at all (none from step N-1 either)",
}


def render(result: dict) -> str:
    """The README's table (markdown) from :func:`main`'s JSON."""
    lines = [
        "| the last step's SegDM given | mIoU | minus the last step as sampled (95% CI) |",
        "| --- | --- | --- |",
        f"| nothing changed (the last step as sampled) | {result['last_step']:.3f} | – |",
    ]
    for key, title in ROWS.items():
        r = result["rows"][key]
        lines.append(
            f"| {title} | {r['miou']:.3f} | {r['minus_last']:+.3f} "
            f"({r['low']:+.3f}, {r['high']:+.3f}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Measure and write the table's JSON (or render one)."""
    from segdm_trajectory import add_scene_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scene_args(p, count=256, split="check")
    p.add_argument("--render", metavar="JSON", help="only print the table of this result")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if not (args.out and args.checkpoint):
        p.error("--checkpoint and --out are required (or --render)")

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from segdm_trajectory import load_scenes, paired_bootstrap, scene_confusions

    from segsr_jax import images
    from segsr_jax.diffusion import geometry, samplers, sampling
    from segsr_jax.inference import Restorer

    scenes = load_scenes(args.benchmark, args.split, args.count, args.size)
    lqs, truths, k = scenes["lqs"], scenes["truths"], scenes["num_classes"]
    hw = truths[0].shape
    restorer = Restorer.from_checkpoint(args.checkpoint)
    opts = restorer.options(
        sampler="ddim", steps=args.steps, guidance=1.0, prompt="", seg_grid="shared"
    )
    session, graphdef, f = restorer.session, restorer.graphdef, restorer.config.latent_factor
    batch = jnp.asarray(geometry.model_input(lqs, hw, f))
    plan = session.plan(tuple(batch.shape[1:3]), opts)
    schedule = session.schedule(opts)
    ctx = session.context(restorer.state, opts.prompt, len(lqs))

    @jax.jit
    def prepare(state, lq, c, key):
        return sampling._prepare(nnx.merge(graphdef, state), plan, lq, c, None, 1.0, key)

    @jax.jit
    def step(state, cond, carry, s):
        return sampling.reverse_step(nnx.merge(graphdef, state), plan, cond, carry, s)

    @functools.partial(jax.jit, static_argnames=("use_i_t",))
    def seg_logits(state, cond, z, s_t, t, t_seg, use_i_t=True):
        model = nnx.merge(graphdef, state)
        args_ = (cond.z_lq, cond.f_lq, cond.context, None, 1.0)
        return model.denoise(z, s_t, t, t_seg, *args_, use_bridge=(True, use_i_t))[1]

    @jax.jit
    def reembedded(state, prev_seg, s_prev, logits, key, last_seg):
        model = nnx.merge(graphdef, state)
        hard = model.segdm.embed_labels(jnp.argmax(logits, -1))
        soft = model.segdm.embed_probs(jax.nn.softmax(logits, -1))
        noise = jax.random.normal(key, soft.shape)
        return samplers.seg_step(prev_seg, s_prev, hard), last_seg.alpha * soft + (
            last_seg.sigma * noise
        )

    def confusions(logits) -> np.ndarray:  # [scenes, K, K]
        return scene_confusions(jnp.argmax(logits, -1), truths, k, f)

    per_seed = []  # [seeds, rows + 1, scenes, K, K]; the as-sampled last step last
    n = len(schedule)
    for sd in range(args.seeds):
        cond, carry, _ = prepare(restorer.state, batch, ctx, jax.random.key(sd))
        for i in range(n):
            s = jax.tree.map(lambda a, i=i: a[i], schedule)
            if i == n - 2:
                before, s_before = carry, s
            if i == n - 1:
                last, s_last = carry, s
            carry = step(restorer.state, cond, carry, s)
        st = restorer.state
        zb, zl, tb, tl = before.sr.x, last.sr.x, s_before.timestep, s_last.timestep
        sb, sl, gb, gl = before.s_t, last.s_t, s_before.seg.time, s_last.seg.time
        own_before = seg_logits(st, cond, zb, sb, tb, gb)
        hard, fresh = reembedded(
            st, s_before.seg, sb, own_before, jax.random.key(1000 + sd), s_last.seg
        )
        logits = {
            "step_before": own_before,
            "image": seg_logits(st, cond, zb, sl, tb, gl),
            "seg_state_and_time": seg_logits(st, cond, zl, sb, tl, gb),
            "seg_time": seg_logits(st, cond, zl, sl, tl, gb),
            "seg_state": seg_logits(st, cond, zl, sb, tl, gl),
            "seg_state_hard": seg_logits(st, cond, zl, hard, tl, gl),
            "seg_state_fresh": seg_logits(st, cond, zl, fresh, tl, gl),
            "no_i_t": seg_logits(st, cond, zl, sl, tl, gl, use_i_t=False),
        }
        rows = [confusions(logits[key]) for key in ROWS]
        rows.append(confusions(carry.seg_logits))  # the as-sampled last step
        per_seed.append(np.stack(rows))
    boot = paired_bootstrap(np.stack(per_seed), args.bootstrap)
    d = boot["step_minus_last"]
    result = {
        "checkpoint": args.checkpoint,
        "benchmark": args.benchmark,
        "test_set": {
            "count": len(lqs),
            "size": args.size,
            "split": args.split,
            "seed": scenes["seed"],
        },
        "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "seg_grid": "shared",
        "seg_times": {"step_before": float(gb), "last": float(gl)},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "last_step": boot["step_miou"][-1],
        "rows": {
            key: {
                "miou": boot["step_miou"][i],
                "minus_last": d["point"][i],
                "low": d["low"][i],
                "high": d["high"][i],
            }
            for i, key in enumerate(ROWS)
        },
    }
    images.write_atomic(Path(args.out), json.dumps(result, indent=1).encode())
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
