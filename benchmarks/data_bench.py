"""Data pipeline throughput: LQ images per second per core from 512x512 HR crops.

    python benchmarks/data_bench.py [--scenes 24] [--records 512] [--seconds 20] [--workers 2]

Three measurements, each reported as wall-clock images/s and as images per CPU-second (the
per-core rate, which a busy shared machine does not distort the way it distorts wall time):

1. degradation alone: `degrade()` on in-memory 512x512 crops, one process, one OpenCV thread;
2. whole pipeline in one process: ArrayRecord read -> JPEG decode -> crop/flip -> degrade ->
   batch, `num_workers=0`, one read thread;
3. whole pipeline with `--workers` worker processes (start-up excluded); per worker = total / W.

The input is `--records` files cycling over `--scenes` synthetic 768x768 scenes (16 texture
classes), JPEG (q95) with label PNGs, packed by `segsr_jax.data.prepare` into ArrayRecord shards
in a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import platform
import tempfile
import time

import cv2
import numpy as np
import psutil
from PIL import Image

from segsr_jax.data import degradations, pipeline, prepare, sources, synthetic
from segsr_jax.data.transforms import CropConfig


def _write_dataset(root: pathlib.Path, scenes: int, records: int) -> pathlib.Path:
    # `records` files cycling over `scenes` distinct scenes: a realistic record count matters,
    # because grain's index shuffle costs milliseconds per element on a dataset of a few dozen.
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    cfg = synthetic.SceneConfig(height=768, width=768, num_classes=16)
    for i in range(scenes):
        image, label = synthetic.make_scene((2024, i), cfg)
        Image.fromarray(image).save(images / f"{i:05d}.jpg", quality=95)
        Image.fromarray(label).save(labels / f"{i:05d}.png")
    for i in range(scenes, records):
        for folder, ext in ((images, "jpg"), (labels, "png")):
            (folder / f"{i:05d}.{ext}").write_bytes(
                (folder / f"{i % scenes:05d}.{ext}").read_bytes()
            )
    out = root / "shards"
    prepare.prepare(str(images), str(labels), str(out), records_per_shard=128, workers=1)
    return out


def _cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_degradation(crops: list[np.ndarray], seconds: float) -> dict:
    cv2.setNumThreads(1)
    degradations.degrade(crops[0], np.random.default_rng(0))  # warm caches
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        degradations.degrade(crops[n % len(crops)], np.random.default_rng(n))
        n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"images": n, "wall_rate": n / wall, "cpu_rate": n / cpu}


def bench_pipeline(shards: pathlib.Path, workers: int, seconds: float, batch: int = 8) -> dict:
    cv2.setNumThreads(1)
    cfg = pipeline.PipelineConfig(
        global_batch_size=batch,
        crop=CropConfig(size=512),
        num_workers=workers,
        read_threads=0,
        prefetch_batches=2 if workers else 0,
        worker_buffer_size=2,
    )
    it = iter(
        pipeline.make_dataset(sources.ArrayRecordSource(shards), cfg, shard_index=0, shard_count=1)
    )
    for _ in range(max(2, workers)):  # start-up: worker spawn, imports, first batches
        next(it)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    n, wall0, cpu0 = 0, time.perf_counter(), _cpu_seconds(procs)
    while time.perf_counter() - wall0 < seconds:
        n += len(next(it)["lq"])
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds(procs) - cpu0
    return {"images": n, "wall_rate": n / wall, "cpu_rate": n / cpu, "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=24, help="distinct 768x768 scenes")
    parser.add_argument("--records", type=int, default=512, help="records (scenes repeated)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = _write_dataset(pathlib.Path(tmp), args.scenes, args.records)
        rng = np.random.default_rng(0)
        crops = []
        for i in range(min(args.scenes, 8)):
            image, _ = synthetic.make_scene(
                (2024, i), synthetic.SceneConfig(height=768, width=768, num_classes=16)
            )
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=95)
            image = np.asarray(Image.open(buf).convert("RGB"))  # the same JPEG the pipeline decodes
            top, left = rng.integers(0, 257, 2)
            crops.append(np.ascontiguousarray(image[top : top + 512, left : left + 512]))

        load = os.getloadavg()[0]
        alone = bench_degradation(crops, args.seconds)
        single = bench_pipeline(shards, 0, args.seconds)
        multi = bench_pipeline(shards, args.workers, args.seconds)

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}; load average at start {load:.2f}")
    rows = [
        ("degradation alone (1 process)", alone),
        ("whole pipeline, no workers (1 process)", single),
        (f"whole pipeline, {args.workers} workers (total)", multi),
    ]
    print(f"{'measurement':<42} {'images/s (wall)':>16} {'images/CPU-s':>13}")
    for name, r in rows:
        print(f"{name:<42} {r['wall_rate']:16.1f} {r['cpu_rate']:13.1f}")
    print(
        f"{'whole pipeline, per worker (wall / W)':<42} {multi['wall_rate'] / args.workers:16.1f}"
    )
    print(f"pipeline/degradation per core (CPU-s): {single['cpu_rate'] / alone['cpu_rate']:.2f}")


if __name__ == "__main__":
    main()
