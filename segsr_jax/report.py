"""A self-contained comparison page, ``index.html``: sliders, segmentation overlays, metrics.

Written by ``python -m segsr_jax.sample --report`` (bicubic vs SegSR for every input) and
``python -m segsr_jax.evaluate --html`` (also Real-ESRGAN and the ground truth where known, and
the metrics of every method). Per image: before/after sliders (drag to uncover the left image),
the segmentation drawn over the SR image with a legend of the classes it contains, and a table
of the image's metrics. Everything is inside the one file: images as ``data:`` URIs (PNG, or
JPEG where the PNG would be over 2 MB), CSS and JS inline, and a Content-Security-Policy that
lets the browser load nothing else. Written atomically.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segsr_jax import images

PNG_LIMIT = 2 << 20  # bytes; a larger PNG is sent as JPEG (photos compress ~5x better)
JPEG_QUALITY = 92
OVERLAY_ALPHA = 0.5  # weight of the class colour over the SR image
# Nothing but this page's own inline code and data: images may load.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;
color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin:1.6em 0 .4em}
table{border-collapse:collapse;margin:.4em 0}td,th{padding:.15em .6em;text-align:right;
border-bottom:1px solid #ddd}td:first-child,th:first-child{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.cmp{position:relative;margin:0;display:inline-block;line-height:0;user-select:none}
.cmp img{display:block;width:var(--w);max-width:100%;height:auto;image-rendering:auto}
.cmp img.before{position:absolute;left:0;top:0;clip-path:inset(0 50% 0 0)}
.cmp .bar{position:absolute;top:0;bottom:0;left:50%;width:2px;background:#fff;
box-shadow:0 0 2px #000;pointer-events:none}
.cmp input{position:absolute;left:0;top:0;width:100%;height:100%;margin:0;opacity:0;
cursor:ew-resize}
.cmp .tag{position:absolute;top:4px;font:12px/1.6 sans-serif;background:#000a;color:#fff;
padding:0 .4em;pointer-events:none}.cmp .l{left:4px}.cmp .r{right:4px}
figcaption{line-height:1.4;font-size:12px;color:#555;margin-top:2px}
.legend{list-style:none;padding:0;margin:.3em 0;font-size:12px}
.legend li{display:flex;align-items:center;gap:.4em}
.sw{width:12px;height:12px;border:1px solid #0004;display:inline-block}
.note{color:#666;font-size:12px}
"""

# Each slider shows its `before` image over the `after` one, clipped at the slider's value.
_JS = """
for (const fig of document.querySelectorAll('figure.cmp')) {
  const input = fig.querySelector('input'), before = fig.querySelector('img.before'),
        bar = fig.querySelector('.bar');
  const show = () => {
    before.style.clipPath = 'inset(0 ' + (100 - input.value) + '% 0 0)';
    bar.style.left = input.value + '%';
  };
  input.addEventListener('input', show);
  show();
}
"""


@dataclasses.dataclass
class ReportImage:
    """One image of the page.

    Attributes:
      name: the image's stem.
      views: ``{label: uint8 [H, W, 3]}``, all of one size (e.g. bicubic, SegSR, ground truth).
      sliders: ``(before, after)`` pairs of ``views`` labels, one slider each.
      labels: uint8 ``[H, W]`` class ids of the segmentation (None: no overlay).
      overlay_on: the ``views`` label the segmentation is drawn over.
      metrics: ``{method: {column: value}}`` (empty: no table).
    """

    name: str
    views: dict[str, np.ndarray]
    sliders: list[tuple[str, str]]
    labels: np.ndarray | None = None
    overlay_on: str | None = None
    metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def data_uri(image: np.ndarray) -> str:
    """A uint8 image as a ``data:`` URI: PNG, or JPEG when the PNG is over :data:`PNG_LIMIT`."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    mime = "image/png"
    if buf.tell() > PNG_LIMIT:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).convert("RGB").save(
            buf, format="JPEG", quality=JPEG_QUALITY
        )
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``labels``' class colours (:func:`segsr_jax.images.colorize`) blended over ``image``
    (uint8 ``[H, W, 3]``); out-of-range labels (e.g. 255, ignore) leave the image as it is."""
    colour = images.colorize(labels, num_classes).astype(np.float32)
    known = ((labels < num_classes)[..., None]).astype(np.float32) * OVERLAY_ALPHA
    out = image.astype(np.float32) * (1 - known) + colour * known
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else _e(value)


def _metrics_table(metrics: dict[str, dict], columns: Sequence[str], headers: dict) -> str:
    if not metrics or not columns:
        return ""
    head = "".join(f"<th>{_e(headers.get(c, c))}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{_e(method)}</td>"
        + "".join(f"<td>{_format(row.get(c))}</td>" for c in columns)
        + "</tr>"
        for method, row in metrics.items()
    )
    return f"<table><tr><th>method</th>{head}</tr>{body}</table>"


def _slider(before: str, after: str, uris: dict[str, str], width: int, name: str) -> str:
    return (
        f'<figure class="cmp" style="--w:{width}px">'
        f'<img class="after" src="{uris[after]}" alt="{_e(after)}">'
        f'<img class="before" src="{uris[before]}" alt="{_e(before)}">'
        '<div class="bar"></div>'
        f'<input type="range" min="0" max="100" value="50" '
        f'aria-label="{_e(name)}: {_e(before)} | {_e(after)}">'
        f'<span class="tag l">{_e(before)}</span><span class="tag r">{_e(after)}</span>'
        "</figure>"
    )


def _legend(labels: np.ndarray, class_names: Sequence[str], num_classes: int) -> str:
    ids, counts = np.unique(labels, return_counts=True)
    palette = images.palette(num_classes)
    items = []
    for k, n in sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: -t[1]):
        if k >= num_classes:
            continue
        r, g, b = palette[k].tolist()
        name = class_names[k] if k < len(class_names) else f"class {k}"
        items.append(
            f'<li><span class="sw" style="background:rgb({r},{g},{b})"></span>'
            f"{_e(name)} ({100 * n / labels.size:.1f}%)</li>"
        )
    return f'<ul class="legend">{"".join(items)}</ul>'


def _section(
    item: ReportImage, class_names: Sequence[str], columns: Sequence[str], headers: dict
) -> str:
    uris = {label: data_uri(view) for label, view in item.views.items()}
    h, w = next(iter(item.views.values())).shape[:2]
    # Small images (the bundled demo is 192 px) shown at least 384 px wide, never shrunk.
    width = w if w >= 384 else 384
    parts = [f'<section id="{_e(item.name)}"><h2>{_e(item.name)}</h2><div class="row">']
    for before, after in item.sliders:
        parts.append(_slider(before, after, uris, width, item.name))
    if item.labels is not None and item.overlay_on is not None:
        num_classes = max(len(class_names), int(item.labels[item.labels != 255].max(initial=0)) + 1)
        seg = overlay(item.views[item.overlay_on], item.labels, num_classes)
        parts.append(
            f'<figure class="seg" style="margin:0"><img src="{data_uri(seg)}" '
            f'style="width:{width}px;max-width:100%" alt="segmentation of {_e(item.name)}">'
            f"<figcaption>segmentation over {_e(item.overlay_on)}</figcaption>"
            f"{_legend(item.labels, class_names, num_classes)}</figure>"
        )
    parts.append("</div>")
    parts.append(_metrics_table(item.metrics, columns, headers))
    parts.append(f'<p class="note">{w}x{h} px</p></section>')
    return "".join(parts)


def render_html(
    items: Iterable[ReportImage],
    *,
    title: str,
    class_names: Sequence[str] = (),
    columns: Sequence[str] = (),
    headers: dict | None = None,
    summary: dict[str, dict] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The page: a title, the mean metrics of each method (``summary``: ``{method: {column:
    value}}``), ``notes``, then one section per item (encoded one at a time)."""
    headers = headers or {}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
    ]
    if summary:
        parts.append("<h2>Means</h2>" + _metrics_table(summary, columns, headers))
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    parts += [_section(item, class_names, columns, headers) for item in items]
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)


def write_report(path: str | os.PathLike, items: Iterable[ReportImage], **kwargs) -> Path:
    """:func:`render_html` (``kwargs``) written atomically to ``path``; returns ``path``."""
    path = Path(path)
    images.write_atomic(path, render_html(items, **kwargs).encode("utf-8"))
    return path


def class_names_of_checkpoint(path: str | os.PathLike) -> tuple[str, ...]:
    """The class names a segsr_jax checkpoint's config records (``model.class_names``, else its
    SegFormer's ``id2label``; empty when neither is there)."""
    from segsr_jax import checkpoint

    model = checkpoint.read_checkpoint_config(path).get("model", {})
    names = model.get("class_names") or model.get("segformer", {}).get("id2label") or ()
    return tuple(str(n) for n in names)


def sample_items(inputs: dict[str, Path], out_dir: Path) -> Iterable[ReportImage]:
    """The items of a sampler output folder: for each ``{output name: input file}`` whose
    ``NAME_sr.png`` exists, a bicubic | SegSR slider and the ``NAME_seg_labels.png`` overlay."""
    for name, lq_path in inputs.items():
        sr_path, labels_path = out_dir / f"{name}_sr.png", out_dir / f"{name}_seg_labels.png"
        if not sr_path.is_file():
            continue
        sr = images.read_image(sr_path)
        bicubic = images.resize(images.read_image(lq_path), sr.shape[:2])
        labels = np.asarray(Image.open(labels_path)) if labels_path.is_file() else None
        yield ReportImage(
            name,
            {"bicubic": bicubic, "SegSR": sr},
            [("bicubic", "SegSR")],
            labels=labels,
            overlay_on="SegSR",
        )


def write_sample_report(input_path: str, out_dir: str, checkpoint_path: str) -> Path:
    """``<out_dir>/index.html`` for a ``python -m segsr_jax.sample`` run over ``input_path``
    (file or folder), with the class names of ``checkpoint_path``."""
    from segsr_jax.sample import output_names

    out = Path(out_dir)
    names = output_names(images.list_images(input_path))
    return write_report(
        out / "index.html",
        sample_items({name: path for path, name in names.items()}, out),
        title=f"SegSR: {Path(input_path).name}",
        class_names=class_names_of_checkpoint(checkpoint_path),
        notes=[f"checkpoint {checkpoint_path}; drag a slider to compare"],
    )


def evaluation_items(
    evaluations: Sequence,
    pairs: Sequence,
    *,
    lq: dict[str, Path],
    baseline_dirs: dict[str, Path],
    seg_labels: dict[str, Path],
) -> Iterable[ReportImage]:
    """The items of an evaluation (:mod:`segsr_jax.evaluation`): for each scored pair
    (:class:`~segsr_jax.evaluation.pairing.Pair`), sliders bicubic (from ``lq``) | prediction,
    each baseline | prediction, prediction | ground truth; the overlay of ``seg_labels[stem]``
    on the prediction; the image's row of every evaluation (the predictions' first)."""
    main = evaluations[0].name
    rows = {ev.name: {r["name"]: r for r in ev.rows} for ev in evaluations}
    for pair in pairs:
        sr = images.read_image(pair.pred)
        views, sliders = {}, []
        if pair.stem in lq:
            views["bicubic"] = images.resize(images.read_image(lq[pair.stem]), sr.shape[:2])
            sliders.append(("bicubic", main))
        for name, folder in baseline_dirs.items():
            if name not in views:
                views[name] = images.read_image(folder / f"{pair.stem}_sr.png")
                sliders.append((name, main))
        views[main] = sr
        views["ground truth"] = images.read_image(pair.gt)
        sliders.append((main, "ground truth"))
        labels = seg_labels.get(pair.stem)
        yield ReportImage(
            pair.stem,
            views,
            sliders,
            labels=None if labels is None else np.asarray(Image.open(labels)),
            overlay_on=main,
            metrics={name: by[pair.stem] for name, by in rows.items() if pair.stem in by},
        )
