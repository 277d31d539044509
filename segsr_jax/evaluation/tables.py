"""The results of an evaluation: the table on stdout, ``metrics.csv`` and ``metrics.json``.

Several evaluations with the same columns (the predictions and the baselines computed from the
same LQ inputs) share one table and one CSV: a ``method`` column names the row's evaluation.
Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path

from segsr_jax import images
from segsr_jax.evaluation.measures import header
from segsr_jax.evaluation.scoring import Evaluation
from segsr_jax.evaluation.segmentation import finite_or_none


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the machine line of every measured figure:
    the same run differs by host."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def format_table(evaluations: list[Evaluation], per_image: bool = False) -> str:
    """The table printed on stdout: for each evaluation its per-image rows (optional), then its
    mean row; then the notes (each once)."""
    columns = evaluations[0].columns
    heads = ["image"] + [header(c) for c in columns]
    lines = []
    for ev in evaluations:
        if per_image:
            tag = f" [{ev.name}]" if len(evaluations) > 1 else ""
            lines += [
                [r["name"] + tag] + [f"{r.get(c, float('nan')):.4f}" for c in columns]
                for r in ev.rows
            ]
        lines.append(
            [f"mean ({ev.name}, {len(ev.rows)})"]
            + [f"{ev.mean.get(c, float('nan')):.4f}" for c in columns]
        )
    widths = [max(len(x[i]) for x in [heads, *lines]) for i in range(len(heads))]

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    notes = list(dict.fromkeys(n for ev in evaluations for n in ev.notes))
    return "\n".join([fmt(heads)] + [fmt(x) for x in lines] + [f"note: {n}" for n in notes])


def _doc(ev: Evaluation) -> dict:
    return {
        "name": ev.name,
        "mean": {c: finite_or_none(v) for c, v in ev.mean.items()},
        "per_image": [
            {k: (v if k == "name" else finite_or_none(v)) for k, v in r.items()} for r in ev.rows
        ],
        "per_class_iou": ev.per_class_iou,
        "settings": ev.settings,
        "counts": ev.counts,
        "notes": ev.notes,
    }


def write_results(evaluations: list[Evaluation], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``<out_dir>/metrics.csv`` (``method, name, columns...``: per image, then ``mean``, for
    each evaluation) and ``metrics.json`` (the first evaluation's document, the others under
    ``"baselines"`` by name)."""
    out = Path(out_dir)
    columns = evaluations[0].columns
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "name", *columns])
    for ev in evaluations:
        for row in [*ev.rows, {"name": "mean", **ev.mean}]:
            writer.writerow(
                [ev.name, row["name"], *(repr(float(row.get(c, float("nan")))) for c in columns)]
            )
    doc = _doc(evaluations[0])
    doc["baselines"] = {ev.name: _doc(ev) for ev in evaluations[1:]}
    csv_path, json_path = out / "metrics.csv", out / "metrics.json"
    images.write_atomic(csv_path, buf.getvalue().encode("utf-8"))
    images.write_atomic(
        json_path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")
    )
    return csv_path, json_path
