"""Image folder (+ label folder) -> ArrayRecord shards for `ArrayRecordSource`.

    python -m segsr_jax.data.prepare --images DIR [--labels DIR] --output DIR \
        [--records-per-shard 1000] [--workers N]

Shards are written in parallel (one process per shard at a time) and atomically: a shard is
written under a temporary name, renamed, and then its `.json` summary is written; a shard
whose summary exists is finished and skipped when the command runs again, so an interrupted
run resumes where it stopped. `plan.json` pins the file list and shard size of the first run;
a later run over a different folder or shard size is refused rather than mixing the two.

Every record is decoded once here; corrupt images or labels are left out, listed in their
shard's summary and in `manifest.json`, and counted in the final report.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import sys

from array_record.python.array_record_module import ArrayRecordWriter

from segsr_jax import images as image_io
from segsr_jax.data.sources import (
    SHARD_SUFFIX,
    CorruptRecordError,
    ImageFolderSource,
    decode_example,
    encode_record,
)

log = logging.getLogger(__name__)


def shard_name(shard: int, num_shards: int) -> str:
    """File stem of one shard, e.g. `data-00003-of-00012`."""
    return f"data-{shard:05d}-of-{num_shards:05d}"


def _write_json(path: pathlib.Path, payload: dict) -> None:
    image_io.write_atomic(path, json.dumps(payload, indent=1).encode())


def _write_shard(files: list[tuple[str, str, str | None]], output: str, name: str) -> dict:
    """Writes one shard from (stem, image path, label path or None) triples; returns its
    summary {"records": n, "corrupt": [[stem, reason], ...]}."""
    out = pathlib.Path(output)
    final = out / f"{name}{SHARD_SUFFIX}"
    tmp = out / f"{name}{SHARD_SUFFIX}.tmp"
    corrupt = []
    records = 0
    writer = ArrayRecordWriter(str(tmp), "group_size:1")  # group size 1: fast random access
    try:
        for stem, image_path, label_path in files:
            try:
                label = None if label_path is None else pathlib.Path(label_path).read_bytes()
                record = encode_record(stem, pathlib.Path(image_path).read_bytes(), label)
                decode_example(record, 0)  # refuse now what training would have to skip
            except (CorruptRecordError, OSError) as e:
                corrupt.append([stem, str(e)])
                continue
            writer.write(record)
            records += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    summary = {"records": records, "corrupt": corrupt}
    _write_json(out / f"{name}.json", summary)
    return summary


def _log_shard(shard: int, summary: dict) -> None:
    log.info("shard %d: %d records, %d corrupt", shard, summary["records"], len(summary["corrupt"]))


def _plan(source: ImageFolderSource, per_shard: int, has_labels: bool) -> dict:
    digest = hashlib.sha256("\n".join(source.stems).encode()).hexdigest()
    num_shards = max(1, -(-len(source) // per_shard))
    return {"images": len(source), "stems_sha256": digest, "records_per_shard": per_shard,
            "num_shards": num_shards, "labels": has_labels}  # fmt: skip


def prepare(
    images: str, labels: str | None, output: str, *, records_per_shard: int = 1000, workers: int = 0
) -> dict:
    """Writes (or finishes writing) the shards of `images` into `output`; returns the manifest.

    Args:
      images: image folder (searched recursively).
      labels: label PNG folder with the same relative stems, or None.
      output: shard folder (created).
      records_per_shard: images per shard (before corrupt ones are left out).
      workers: parallel processes (0: one per CPU; 1: in this process).
    Returns:
      the manifest dict that is also written to `output/manifest.json`.
    """
    source = ImageFolderSource(images, labels)
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(source, records_per_shard, labels is not None)
    plan_path = out / "plan.json"
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            raise ValueError(
                f"{output} holds shards of another plan ({previous}); this run's plan is {plan}. "
                "Use a fresh output folder."
            )
    else:
        _write_json(plan_path, plan)

    num_shards = plan["num_shards"]
    todo = [
        s for s in range(num_shards) if not (out / f"{shard_name(s, num_shards)}.json").exists()
    ]
    log.info("%d of %d shards to write (%d images)", len(todo), num_shards, len(source))
    jobs = {}
    for s in todo:
        lo, hi = s * records_per_shard, min((s + 1) * records_per_shard, len(source))
        files = [
            (source.stems[i], str(source.image_paths[i]),
             None if source.label_paths is None else str(source.label_paths[i]))
            for i in range(lo, hi)
        ]  # fmt: skip
        jobs[s] = (files, output, shard_name(s, num_shards))
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    if workers == 1:  # no pool to start for one process
        for s, job in jobs.items():
            _log_shard(s, _write_shard(*job))
    else:
        # spawn: the parent may hold threads (grain, JAX) that a fork would copy broken.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_write_shard, *job): s for s, job in jobs.items()}
            for future in concurrent.futures.as_completed(futures):
                # A failed shard fails the run (its summary is never written); rerun to resume.
                _log_shard(futures[future], future.result())

    shards, corrupt, records = [], [], 0
    for s in range(num_shards):
        name = shard_name(s, num_shards)
        summary = json.loads((out / f"{name}.json").read_text())
        shards.append(f"{name}{SHARD_SUFFIX}")
        records += summary["records"]
        corrupt += summary["corrupt"]
    manifest = {**plan, "records": records, "shards": shards, "corrupt": corrupt}
    _write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="image folder (searched recursively)")
    parser.add_argument("--labels", help="label PNG folder with the same relative stems")
    parser.add_argument("--output", required=True, help="shard folder")
    parser.add_argument("--records-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    manifest = prepare(
        args.images, args.labels, args.output,
        records_per_shard=args.records_per_shard, workers=args.workers,
    )  # fmt: skip
    for stem, reason in manifest["corrupt"]:
        print(f"skipped corrupt {stem}: {reason}", file=sys.stderr)
    print(
        f"{manifest['records']} records in {len(manifest['shards'])} shards under {args.output}; "
        f"{len(manifest['corrupt'])} corrupt files skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
