"""The known-distribution benchmark's artifacts: every path its stages read and write, and how to load them.

Paths are relative to the pipeline directory (experiments/known-distribution), the working directory DVC
runs its stages in; its dvc.yaml declares the same paths. One entry of `truths` per file set, named after it.
Also here, because both stages need them: the ground truth a `truths` entry describes, and the geometry a
registry denoiser is built with for its points.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmat.checkpoint import load_checkpoint
from dmat.core import known_distribution
from dmat.core.denoisers import build_denoiser
from dmat.core.edm import Precond
from dmat.errors import CheckpointError, DataError
from dmat.files import atomic_path
from dmat.known_distribution_config import TruthConfig

TRAIN_STAGE, EVALUATE_STAGE = "train", "evaluate"  # the `dmat known-distribution` stage names
MODEL_FORMAT = "dmat-known-distribution-denoiser-1"
TRAINING_SET_ARRAYS = ("points", "labels", "corrupted", "outlier")


def model_file(truth: str) -> Path:
    """The trained denoiser (train): weights, the architecture, the truth and training config."""
    return Path("models") / truth / "denoiser.pt"


def training_set_file(truth: str) -> Path:
    """The training set as the model saw it (train): points, labels, which were corrupted or are outliers."""
    return Path("data") / truth / "train.npz"


def samples_file(truth: str) -> Path:
    """The evaluation's samples (evaluate): from the model and from the exact denoiser, with their classes."""
    return Path("data") / truth / "samples.npz"


def metrics_file(stage: str, truth: str) -> Path:
    """Headline numbers of a stage for one truth (`dvc metrics`, committed with dvc.lock)."""
    return Path("metrics") / f"{stage}_{truth}.json"


def error_curve_file(truth: str) -> Path:
    """Denoiser error against the Bayes-optimal denoiser per noise level (`dvc plots`): sigma, error, optimal_mse."""
    return Path("plots") / truth / "denoiser_error.csv"


def samples_picture(truth: str) -> Path:
    """The samples drawn over the true density's contours (2-D), or as a grid of images."""
    return Path("plots") / truth / "samples.png"


def error_curve_picture(truth: str) -> Path:
    return Path("plots") / truth / "denoiser_error.png"


def truth_of(cfg: TruthConfig) -> known_distribution.GaussianMixture:
    """The Gaussian mixture a `truths` entry describes."""
    if cfg.distribution == "ring":
        return known_distribution.ring(cfg.modes, cfg.scale, cfg.std, cfg.classes)
    if cfg.distribution == "grid":
        return known_distribution.grid(cfg.modes, cfg.scale, cfg.std, cfg.classes)
    return known_distribution.patterns(cfg.side, cfg.modes, cfg.scale, cfg.std, cfg.classes)


def truth_key(name: str) -> int:
    """A stable integer for a truth's name, part of every random stream's key: truths draw unrelated data."""
    return zlib.crc32(name.encode())


def denoiser_geometry(shape: tuple[int, ...]) -> dict[str, int]:
    """Registry arguments for points of `shape`: (C, H, W) images as they are, flat (D,) points as D channels."""
    if len(shape) == 3:
        return {"in_channels": shape[0], "img_resolution": shape[1]}
    return {"in_channels": shape[0], "img_resolution": 1}


@dataclass(frozen=True)
class TrainingSet:
    points: torch.Tensor  # float32, (n, *shape)
    labels: torch.Tensor  # int64, (n,)
    corrupted: np.ndarray  # bool, (n,): noise added
    outlier: np.ndarray  # bool, (n,): replaced by an outlier


def save_training_set(path: Path, training: TrainingSet) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, points=training.points.numpy(), labels=training.labels.numpy(),
                 corrupted=training.corrupted, outlier=training.outlier)


def load_training_set(path: Path, shape: tuple[int, ...]) -> TrainingSet:
    """The training set `train` wrote, checked against the truth's point shape."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            points, labels, corrupted, outlier = (arrays[name] for name in TRAINING_SET_ARRAYS)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: not a training set of the known-distribution benchmark: {err}") from None
    if points.shape[1:] != tuple(shape) or not len(points) == len(labels) == len(corrupted) == len(outlier):
        raise DataError(f"{path}: points of shape {points.shape[1:]} ({len(points)} of them, {len(labels)} labels); "
                        f"the truth's points have shape {tuple(shape)}: retrain with `dvc repro`")
    return TrainingSet(torch.from_numpy(points), torch.from_numpy(labels), corrupted, outlier)


def load_denoiser(path: Path) -> tuple[Precond, dict[str, Any]]:
    """The trained denoiser (eval mode) and its checkpoint's header (everything but the weights)."""
    state = load_checkpoint(path)
    if state.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {MODEL_FORMAT!r}")
    denoiser = build_denoiser(**state["model_config"])
    denoiser.load_state_dict(state["model"])
    return denoiser.eval(), {k: v for k, v in state.items() if k != "model"}
