"""Scoring super-resolved images against their ground truth (the library behind
``python -m segsr_jax.evaluate``).

* :mod:`~segsr_jax.evaluation.pairing`: which prediction, ground truth, label map and LQ
  input belong together.
* :mod:`~segsr_jax.evaluation.measures`: the per-image metric columns (PSNR, SSIM, NIQE,
  LPIPS-VGG, pyiqa's).
* :mod:`~segsr_jax.evaluation.segmentation`: semantic fidelity (a SegFormer's labels, mIoU).
* :mod:`~segsr_jax.evaluation.scoring`: a folder's rows and means.
* :mod:`~segsr_jax.evaluation.baselines`: bicubic and Real-ESRGAN from the same LQ inputs.
* :mod:`~segsr_jax.evaluation.tables`: the table, ``metrics.csv`` and ``metrics.json``.
"""

from segsr_jax.evaluation.baselines import BASELINES, make_upscaler, write_baseline
from segsr_jax.evaluation.measures import (
    LPIPS_COLUMN,
    build_measures,
    header,
    load_lpips_if_fetched,
    load_niqe_params,
    make_lpips_distance,
)
from segsr_jax.evaluation.pairing import (
    EvaluationError,
    find_predictions,
    index_folder,
    pair_folders,
    split_suffix,
)
from segsr_jax.evaluation.scoring import Evaluation, evaluate_folders
from segsr_jax.evaluation.segmentation import load_segmenter, semantic_labels
from segsr_jax.evaluation.tables import format_table, write_results

__all__ = [
    "BASELINES",
    "LPIPS_COLUMN",
    "Evaluation",
    "EvaluationError",
    "build_measures",
    "evaluate_folders",
    "find_predictions",
    "format_table",
    "header",
    "index_folder",
    "load_lpips_if_fetched",
    "load_niqe_params",
    "load_segmenter",
    "make_lpips_distance",
    "make_upscaler",
    "pair_folders",
    "semantic_labels",
    "split_suffix",
    "write_baseline",
    "write_results",
]
