"""How much class signal SegDM's noisy state ``S_t`` holds at each time: why SRDM cannot learn
to use a bridge that reads ``S_t`` (issue 15).

``S_t = alpha(t) S_0 + sigma(t) noise`` with ``S_0`` the checkpoint's analog label embedding
(SegDM's ``bit_scale`` keeps it within +-0.01). Two classes are told apart in ``S_t`` by the
distance of their embeddings; the signal-to-noise ratio of that difference, per latent pixel,
is ``(alpha d / 2)^2 / sigma^2`` (``d`` the smallest distance between two classes'
embeddings), and averaging a region of ``n`` latent pixels multiplies it by ``n``. Prints and
writes the SNR per seg time (SR timestep / 1000, as the joint stage and the sampler couple
them) and the time below which it exceeds 1. ``--bridge-input RUN ...`` adds, per checkpoint,
how loud a clean class map is where it enters the bridge: the norm of the segmentation
stream's input conv and the RMS between classes of its response to a uniform region of each
class's embedding (what the stream gets to tell classes apart)::

    python scripts/seg_state_snr.py --checkpoint runs/aliased/joint/checkpoints \\
        --bridge-input runs/aliased/seg runs/aliased_levels/prior runs/aliased_levels/joint \\
        --out docs/experiment/aliased/seg_state_snr.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
REGION = 100  # latent pixels: a region of a 96 px aliased scene (24 x 24 latent, 3-8 regions)


def snr_table(table: np.ndarray, times=TIMES, region: int = REGION) -> dict:
    """The SNR of the closest two classes' difference in ``S_t`` at each time, per pixel and
    over ``region`` pixels; ``table`` is ``[K, E]`` (the class embeddings)."""
    from segsr_jax.diffusion.schedules import seg_alpha_sigma

    d = min(
        float(np.linalg.norm(table[i] - table[j]))
        for i, j in itertools.combinations(range(len(table)), 2)
    )
    rows = []
    for t in times:
        alpha, sigma = (float(v) for v in seg_alpha_sigma(np.float64(t)))
        pixel = (alpha * d / 2) ** 2 / sigma**2
        rows.append(
            {"t": t, "alpha": alpha, "sigma": sigma, "pixel": pixel, "region": region * pixel}
        )

    def last_above_one(key):
        good = [r["t"] for r in rows if r[key] >= 1.0]
        return max(good) if good else None

    return {
        "min_class_distance": d,
        "embedding_max_abs": float(np.abs(table).max()),
        "region_pixels": region,
        "rows": rows,
        "snr_above_1_up_to_t": {
            "pixel": last_above_one("pixel"),
            "region": last_above_one("region"),
        },
    }


def bridge_input(model) -> dict:
    """The segmentation stream's input conv of ``model``'s bridge: its norm and the RMS
    between classes of its response to a uniform region of each class's embedding."""
    k = model.config.segdm.num_classes
    table = np.asarray(model.segdm.embedding_table())[:k]
    w = np.asarray(model.bridge.seg_in.kernel[...])
    resp = table @ w.sum((0, 1))  # a uniform region: every 3x3 tap sees the same embedding
    return {
        "seg_in_norm": float(np.linalg.norm(w)),
        "between_class_rms": float(np.sqrt(np.mean((resp - resp.mean(0)) ** 2))),
    }


def _model(checkpoint: str):
    from flax import nnx

    from segsr_jax.inference import Restorer

    restorer = Restorer.from_checkpoint(checkpoint)
    return nnx.merge(restorer.graphdef, restorer.state)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a SegSR checkpoint folder")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument(
        "--bridge-input", nargs="*", default=[], help="training runs whose bridge input to measure"
    )
    args = p.parse_args(argv)
    model = _model(args.checkpoint)
    k = model.config.segdm.num_classes
    table = np.asarray(model.segdm.embedding_table())[:k]
    result = {"checkpoint": args.checkpoint, **snr_table(table)}
    print(f"smallest distance between two classes' embeddings: {result['min_class_distance']:.4f}")
    print("t      alpha  sigma  SNR/pixel  SNR/region")
    for r in result["rows"]:
        print(
            f"{r['t']:<6} {r['alpha']:.3f}  {r['sigma']:.3f}  {r['pixel']:.2e}   {r['region']:.2e}"
        )
    print("SNR >= 1 up to t =", result["snr_above_1_up_to_t"])
    result["bridge_input"] = {}
    for run in args.bridge_input:
        m = bridge_input(_model(f"{run}/checkpoints"))
        result["bridge_input"][run] = m
        print(
            f"{run}: |seg_in| {m['seg_in_norm']:.2f}, "
            f"between-class RMS {m['between_class_rms']:.4f}"
        )
    if args.out:
        from segsr_jax import images

        images.write_atomic(Path(args.out), json.dumps(result, indent=1).encode())
    return result


if __name__ == "__main__":
    main()
