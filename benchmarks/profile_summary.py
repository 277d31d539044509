"""Where a jitted program's time goes: a per-op table from a ``jax.profiler`` trace.

::

    python benchmarks/profile_summary.py TRACE_DIR_OR_XPLANE_PB [--hlo PROGRAM.txt.gz] [--top 30]

or, in a script, ``with jax.profiler.trace(d): ...`` then ``summarise(d)``. The device's
op events are read with ``jax.profiler.ProfileData`` (no TensorBoard needed): on a GPU the
``/device:GPU:N`` plane's "XLA Ops" line when it has one (else every stream line), on a CPU
the host threads' events that carry an ``hlo_op``. Ops are grouped by HLO op name and by a
rough category (convolution, matmul, attention, the rest) from the op and kernel names.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

CATEGORIES = (  # first match wins; matched against "op name | kernel name", lower case
    ("attention", r"fmha|flash|attention|dot_product_attention|sdpa"),
    ("convolution", r"conv(?!ert)|implicit_gemm|wgrad|dgrad|fprop"),
    ("matmul", r"gemm|dot|matmul|cublas|cutlass|sm90_xmma|nvjet|triton_gemm"),
    ("copy/transpose", r"copy|transpose|bitcast"),
    ("reduce/norm", r"reduce|norm"),
)


def xplane_file(path: str | Path) -> Path:
    """The newest ``*.xplane.pb`` under ``path`` (or ``path`` itself)."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {path}")
    return found[-1]


def _stats(event) -> dict:
    try:
        return dict(event.stats)
    except Exception:  # noqa: BLE001 -- stats are optional in some planes
        return {}


def op_events(path: str | Path) -> tuple[str, list[tuple[str, str, float]]]:
    """``(plane name, [(hlo op, event name, duration ms), ...])`` of the device's op events."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(xplane_file(path)))
    planes = list(data.planes)
    gpus = [p for p in planes if p.name.startswith("/device:GPU")]
    events = []
    if gpus:
        plane = gpus[0]
        lines = list(plane.lines)
        ops_lines = [ln for ln in lines if ln.name == "XLA Ops"]
        chosen = ops_lines or [ln for ln in lines if ln.name.startswith("Stream")] or lines
        for line in chosen:
            for e in line.events:
                s = _stats(e)
                events.append((str(s.get("hlo_op", e.name)), e.name, e.duration_ns / 1e6))
        return plane.name, events
    plane = next(p for p in planes if p.name == "/host:CPU")
    for line in plane.lines:
        for e in line.events:
            s = _stats(e)
            if "hlo_op" in s:
                events.append((str(s["hlo_op"]), e.name, e.duration_ns / 1e6))
    return plane.name, events


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\s([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^%?([\w.\-]+) \(.*\{\s*$|^ENTRY %?([\w.\-]+) ")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """``{instruction name: category}`` from a compiled module's text
    (``compiled.as_text()``): what a fusion or custom call does, by the ops inside it."""
    comps, instrs, cur = collections.defaultdict(list), {}, None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1) or m.group(2)
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            name, opcode, rest = m.groups()
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
            info = (opcode, target.group(1) if target else "", called, rest)
            comps[cur].append(info)
            instrs[name] = info

    def kinds(info, depth=0) -> set[str]:
        opcode, target, called, rest = info
        found = set()
        if opcode == "custom-call":
            t = target.lower()
            found.add(
                "attention"
                if "fmha" in t or "attention" in t
                else "convolution"
                if "conv" in t
                else "matmul"
                if re.search(r"gemm|cublas|matmul", t)
                else "other"
            )
        elif opcode == "convolution":
            found.add("convolution")
        elif opcode == "dot":
            found.add("matmul")
        elif opcode in ("copy", "transpose"):
            found.add("copy/transpose")
        elif opcode in ("reduce", "reduce-window"):
            found.add("reduce/norm")
        if "__triton_gemm" in rest:
            found.add("matmul")
        if depth < 8 and (opcode in ("fusion", "call", "custom-call") or opcode.endswith("-start")):
            for c in called:
                for sub in comps.get(c, []):
                    found |= kinds(sub, depth + 1)
        return found

    order = ("attention", "convolution", "matmul", "reduce/norm", "copy/transpose")
    out = {}
    for name, info in instrs.items():
        found = kinds(info)
        out[name] = next((k for k in order if k in found), "elementwise/other")
    return out


def category(op: str, kernel: str, hlo: dict[str, str] | None = None) -> str:
    if hlo and op in hlo:
        return hlo[op]
    text = f"{op} | {kernel}".lower()
    for name, pattern in CATEGORIES:
        if re.search(pattern, text):
            return name
    return "elementwise/other"


def summarise(path: str | Path, top: int = 30, calls: int = 1, hlo_text: str | None = None) -> dict:
    """Per-op and per-category device time (ms per call when the trace holds ``calls``
    calls of the program), largest first. With the program's compiled text, ops are put in
    categories by what they contain; without, by their names."""
    plane, events = op_events(path)
    hlo = hlo_categories(hlo_text) if hlo_text else None
    by_op = collections.defaultdict(lambda: [0.0, 0, ""])
    by_cat = collections.Counter()
    for op, kernel, ms in events:
        row = by_op[op]
        row[0] += ms / calls
        row[1] += 1
        row[2] = row[2] or kernel
        by_cat[category(op, kernel, hlo)] += ms / calls
    total = sum(by_cat.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])
    return {
        "plane": plane,
        "events": len(events),
        "device_ms_per_call": total,
        "categories_ms": dict(by_cat.most_common()),
        "top_ops": [
            {"op": op, "ms": ms, "count": n / calls, "kernel": kernel[:120]}
            for op, (ms, n, kernel) in ops[:top]
        ],
    }


def format_summary(s: dict) -> str:
    lines = [
        f"{s['plane']}: {s['device_ms_per_call']:.2f} ms of op time per call ({s['events']} events)"
    ]
    lines += [
        f"  {k:18s} {v:8.2f} ms ({100 * v / max(s['device_ms_per_call'], 1e-9):4.1f}%)"
        for k, v in s["categories_ms"].items()
    ]
    lines += [
        f"  {r['ms']:8.3f} ms  x{r['count']:<5g} {r['op'][:60]}  [{r['kernel'][:50]}]"
        for r in s["top_ops"]
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--calls", type=int, default=1, help="calls of the program in the trace")
    p.add_argument(
        "--hlo",
        type=Path,
        help="the program's compiled text (.txt or .txt.gz, as gpu_all.py saves "
        "it): categories by what each op contains, not by its name",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    hlo = None
    if args.hlo:
        import gzip

        opener = gzip.open if args.hlo.suffix == ".gz" else open
        with opener(args.hlo, "rt") as fh:
            hlo = fh.read()
    s = summarise(args.trace, args.top, args.calls, hlo_text=hlo)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))


if __name__ == "__main__":
    main()
