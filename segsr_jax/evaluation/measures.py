"""The per-image metric columns of an evaluation, decided once before the first image.

PSNR and SSIM (:mod:`segsr_jax.metrics`; float Y channel unless RGB is asked for, after
cropping ``crop_border`` pixels per side), NIQE when a pristine model is given, LPIPS (VGG,
:mod:`segsr_jax.lpips`, our JAX port) when its weights are fetched, and pyiqa's lpips (AlexNet),
dists, musiq, maniqa and clipiqa when pyiqa is installed. A metric that cannot be built is left
out with a note saying why; the others still run.
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segsr_jax import images, metrics
from segsr_jax.evaluation.pairing import EvaluationError

PYIQA_METRICS = ("lpips", "dists", "musiq", "maniqa", "clipiqa")
FULL_REFERENCE = ("lpips", "dists")  # pyiqa metrics that also take the ground truth
LPIPS_COLUMN = "lpips_vgg"  # ours; pyiqa's "lpips" is the AlexNet variant, another metric
HEADERS = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "niqe": "NIQE",
    LPIPS_COLUMN: "LPIPS-VGG",
    "semantic_miou": "sem mIoU",
    "seg_miou": "seg mIoU",
}


@dataclasses.dataclass(frozen=True)
class Scored:
    """One prediction and its ground truth, as the metrics see them."""

    sr: np.ndarray  # uint8 [H, W, 3]
    hr: np.ndarray  # uint8 [H, W, 3]
    sr_path: Path
    gt_path: Path


@dataclasses.dataclass(frozen=True)
class Measure:
    """One metric column: ``score`` maps a :class:`Scored` pair to a float.

    ``fallible`` metrics (pyiqa's: missing weights, CUDA, odd sizes) may fail on one image; the
    evaluation records NaN there and a note instead of stopping. Ours raise (bad input)."""

    name: str
    score: Callable[[Scored], float]
    fallible: bool = False


def header(column: str) -> str:
    """The table heading of ``column``."""
    return HEADERS.get(column, column.upper())


def build_measures(
    *,
    crop_border: int,
    y_channel: bool,
    niqe_params: dict | None,
    lpips_model=None,
    pyiqa_metrics: dict | None = None,
) -> list[Measure]:
    """The metric columns, in table order: psnr, ssim, then niqe, lpips_vgg and the pyiqa
    metrics for those given (``lpips_model``: a :class:`segsr_jax.lpips.LPIPS`;
    ``pyiqa_metrics``: :func:`make_pyiqa_metrics`)."""
    out = [
        Measure("psnr", lambda p: metrics.psnr(p.sr, p.hr, crop_border, y_channel)),
        Measure("ssim", lambda p: metrics.ssim(p.sr, p.hr, crop_border, y_channel)),
    ]
    if niqe_params is not None:
        mu, cov = niqe_params["mu_prisparam"], niqe_params["cov_prisparam"]
        out.append(Measure("niqe", lambda p: metrics.niqe(p.sr, mu, cov, crop_border)))
    if lpips_model is not None:
        distance = make_lpips_distance(lpips_model)
        out.append(Measure(LPIPS_COLUMN, lambda p: distance(p.sr, p.hr)))
    for name, metric in (pyiqa_metrics or {}).items():
        out.append(Measure(name, _pyiqa_score(name, metric), fallible=True))
    return out


def _pyiqa_score(name: str, metric) -> Callable[[Scored], float]:
    if name in FULL_REFERENCE:
        return lambda p: float(metric(str(p.sr_path), str(p.gt_path)))
    return lambda p: float(metric(str(p.sr_path)))


# --- LPIPS (ours) ----------------------------------------------------------------------------


@functools.cache
def make_lpips_fn(graphdef):
    """Jitted ``(state, x, y [B, H, W, 3] in [-1, 1]) -> [B]`` LPIPS distances; compiles once
    per image shape."""
    import jax
    from flax import nnx

    def lpips_fn(state, x, y):
        return nnx.merge(graphdef, state)(x, y)

    return jax.jit(lpips_fn)


def make_lpips_distance(model) -> Callable[[np.ndarray, np.ndarray], float]:
    """``(sr, hr uint8 [H, W, 3]) -> float``: ``model``'s LPIPS of the pair, both mapped to
    ``[-1, 1]`` as LPIPS expects."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = make_lpips_fn(graphdef)

    def distance(sr: np.ndarray, hr: np.ndarray) -> float:
        x, y = (images.to_unit_range(np.asarray(a, np.uint8))[None] for a in (sr, hr))
        return float(jax.device_get(fn(state, x, y))[0])

    return distance


def load_lpips_if_fetched(notes: list[str], path: str | None = None):
    """Our LPIPS-VGG with the fetched weights (or those in ``path``), or None with a one-line
    note in ``notes`` saying how to fetch them."""
    from segsr_jax.lpips import load_lpips
    from segsr_jax.weights.checkpoint_files import CheckpointError
    from segsr_jax.weights.fetch import model_dir

    folder = Path(path) if path else model_dir("lpips")
    if not (folder / "model.safetensors").is_file():
        notes.append(
            f"LPIPS omitted: no weights in {folder} (fetch them once with "
            "`python -m segsr_jax.weights.fetch lpips`)"
        )
        return None
    try:
        return load_lpips(folder)
    except CheckpointError as e:  # a damaged cache must not stop PSNR / SSIM; said why
        notes.append(f"LPIPS omitted: {e}")
        return None


# --- pyiqa -----------------------------------------------------------------------------------


def make_pyiqa_metrics(notes: list[str]) -> dict:
    """``{name: pyiqa metric}`` for those of :data:`PYIQA_METRICS` that pyiqa can build; each
    one that cannot (no pyiqa, weights not downloadable, ...) is explained in ``notes``."""
    try:
        import pyiqa
    except ImportError:
        notes.append("pyiqa metrics omitted: pyiqa is not installed")
        return {}
    built = {}
    for name in PYIQA_METRICS:
        try:
            built[name] = pyiqa.create_metric(name)
        # pyiqa fails in many ways (missing weights, no network, CUDA); one metric's failure
        # must not stop the others, and each is reported.
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name} omitted: pyiqa.create_metric failed ({type(e).__name__}: {e})")
    return built


# --- NIQE ------------------------------------------------------------------------------------


def load_niqe_params(path) -> dict:
    """``{"mu_prisparam" [36], "cov_prisparam" [36, 36]}`` from an ``.npz`` or a MATLAB
    ``.mat`` (BasicSR's ``mu_pris_param`` / ``cov_pris_param`` spelling is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--niqe-params {path}: not found")
    if path.suffix == ".mat":
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        try:
            data = loadmat(path)
        # scipy's errors for a file that is not a MATLAB file, or a damaged one.
        except (MatReadError, OSError, ValueError, TypeError) as e:
            raise EvaluationError(
                f"--niqe-params {path}: not a readable MATLAB .mat file ({type(e).__name__}: {e})"
            ) from e
    else:
        try:
            loaded = np.load(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # numpy: not an npz
            raise EvaluationError(
                f"--niqe-params {path}: not a readable .npz file ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise EvaluationError(
                f"--niqe-params {path}: a single array, not an .npz with "
                "mu_prisparam and cov_prisparam"
            )
        with loaded as npz:
            data = dict(npz)
    out = {}
    for key in ("mu_prisparam", "cov_prisparam"):
        alt = key.replace("pris", "pris_")
        if key not in data and alt not in data:
            raise EvaluationError(f"{path} has no {key!r} (it holds {sorted(data)})")
        out[key] = np.asarray(data[key] if key in data else data[alt], np.float64)
    out["mu_prisparam"] = out["mu_prisparam"].ravel()
    n = out["mu_prisparam"].size
    if out["cov_prisparam"].shape != (n, n) or n != 36:
        raise EvaluationError(
            f"{path}: expected mu [36] and cov [36, 36], got "
            f"{out['mu_prisparam'].shape} and {out['cov_prisparam'].shape}"
        )
    return out
