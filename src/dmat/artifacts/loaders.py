"""Loading what one stage wrote for another: checkpoints as models (robust, reference, or either as a scorer) with
their headers, the mix manifest and the store it mixes, evaluation reports, adversarial examples, the generated
store's recorded source. Every loader names the file when it cannot be used (CheckpointError, DataError);
checkpoints load with weights_only=True."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dmat.artifacts import layout
from dmat.artifacts.records import (
    ClassifierHeader,
    DiffusionHeader,
    EvalReport,
    ImportedClassifierHeader,
    MixManifest,
    ReferenceHeader,
    from_json,
)
from dmat.checkpoint import load_checkpoint
from dmat.core.classifiers import build_classifier
from dmat.core.denoisers import build_denoiser
from dmat.data.store import META_FILE, ArrayStore
from dmat.errors import CheckpointError, DataError
from dmat.files import sha256_file

# Which weights of a classifier checkpoint are the model: the EMA of adversarial training, the plain weights of
# standard training.
_CLASSIFIER_WEIGHTS = {layout.CLASSIFIER_FORMAT: "ema", layout.REFERENCE_FORMAT: "model"}

RobustClassifierHeader = ClassifierHeader | ImportedClassifierHeader  # trained by `train`, or imported
ClassifierHeaders = RobustClassifierHeader | ReferenceHeader


def checkpoint_header(state: dict[str, Any], path: str | Path) -> ClassifierHeaders | DiffusionHeader:
    """The header of a checkpoint's contents `state` (read from `path`), by its format; a header of another shape
    is refused (RecordError names the file and the key)."""
    fmt = state.get("format")
    if fmt == layout.CLASSIFIER_FORMAT:
        cls = ImportedClassifierHeader if "imported" in state else ClassifierHeader
    elif fmt in (layout.REFERENCE_FORMAT, layout.DIFFUSION_FORMAT):
        cls = ReferenceHeader if fmt == layout.REFERENCE_FORMAT else DiffusionHeader
    else:
        raise CheckpointError(f"{path}: not a DMAT checkpoint (format {fmt!r})")
    return from_json(cls, state, str(path))


def load_classifier(path: str | Path = layout.CLASSIFIER_BEST,
                    device: str = "cpu") -> tuple[nn.Module, RobustClassifierHeader]:
    """The EMA classifier of a DMAT (robust) checkpoint, in eval mode on `device`, and the checkpoint's header."""
    return _load_classifier(path, device, (layout.CLASSIFIER_FORMAT,), "DMAT classifier")


def load_reference_classifier(path: str | Path = layout.REFERENCE_BEST,
                              device: str = "cpu") -> tuple[nn.Module, ReferenceHeader]:
    """The reference classifier (train_reference: standard training on real data only), in eval mode on `device`,
    and the checkpoint's header. A robust checkpoint is refused: it is not the yardstick."""
    return _load_classifier(path, device, (layout.REFERENCE_FORMAT,), "reference classifier")


def load_scoring_classifier(path: str | Path, device: str = "cpu") -> tuple[nn.Module, ClassifierHeaders]:
    """Any DMAT classifier checkpoint, reference or robust, in eval mode: what generate's filter may score with."""
    return _load_classifier(path, device, tuple(_CLASSIFIER_WEIGHTS), "DMAT classifier")


def _load_classifier(path: str | Path, device: str, formats: tuple[str, ...], what: str) -> tuple[nn.Module, Any]:
    state = load_checkpoint(path, map_location=device)
    if state.get("format") not in formats:
        raise CheckpointError(f"{path}: not a {what} checkpoint (format {state.get('format')!r})")
    header = checkpoint_header(state, path)
    config = header.model_config
    model = build_classifier(config.name, num_classes=config.num_classes, mean=config.mean,
                             std=config.std)
    model.load_state_dict(state[_CLASSIFIER_WEIGHTS[header.format]])
    return model.to(device).eval(), header


def load_denoiser(path: str | Path = layout.DIFFUSION_CHECKPOINT,
                  device: str = "cpu") -> tuple[nn.Module, DiffusionHeader]:
    """The EMA denoiser of a DMAT diffusion checkpoint, in eval mode on `device`, and the checkpoint's header."""
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != layout.DIFFUSION_FORMAT:
        raise CheckpointError(f"{path}: not a DMAT diffusion checkpoint (format {state.get('format')!r})")
    header = checkpoint_header(state, path)
    denoiser = build_denoiser(header.model_config.name, **header.model_config.build_args())
    denoiser.load_state_dict(state["ema"])
    return denoiser.to(device).eval(), header


def load_mix_manifest(directory: Path = layout.MIXED_DIR) -> tuple[MixManifest, np.ndarray]:
    """The mix manifest and the chosen generated rows, checked against each other."""
    path = directory / layout.MIX_MANIFEST_FILE
    try:
        manifest = from_json(MixManifest, json.loads(path.read_text()), str(path))
        rows = np.load(directory / manifest.indices_file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{directory}: unreadable mix manifest ({err}); run the mix stage") from None
    if sha256_file(directory / manifest.indices_file) != manifest.indices_sha256:
        raise DataError(f"{directory / manifest.indices_file}: sha256 differs from {layout.MIX_MANIFEST_FILE}")
    if manifest.synthetic.path not in {str(path) for path in layout.MIX_SOURCES.values()}:
        raise DataError(f"{directory / layout.MIX_MANIFEST_FILE}: synthetic.path must name one of "
                        f"{', '.join(map(str, layout.MIX_SOURCES.values()))}; run the mix stage")
    return manifest, rows


def open_mixed_store(manifest: MixManifest) -> ArrayStore:
    """The store whose rows the mix chose (data/synthetic, or data/real/heldout for mix.source heldout_real),
    checked against the digest the manifest recorded."""
    store = ArrayStore.open(manifest.synthetic.path)
    if store.digest != manifest.synthetic.sha256:
        raise DataError(f"{store.path}: its sha256 differs from the one {layout.MIXED_DIR / layout.MIX_MANIFEST_FILE} "
                        "recorded: the store changed after the mix stage ran; run it again")
    return store


def load_eval_report(threat: str, root: Path = Path()) -> EvalReport:
    """The evaluation report of one threat model, as saved with its adversarial examples (under the project
    `root`); a file of another shape is refused (RecordError names the file and the key)."""
    path = root / layout.eval_dir(threat) / layout.EVAL_REPORT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable evaluation report ({err}); run evaluate@{threat}") from None
    return from_json(EvalReport, data, str(path))


@dataclass(frozen=True)
class AdversarialExamples:
    """What evaluate@<threat> attacked: float32 N×H×W×C images in [0, 1], labels and PyTorch's predictions."""

    images: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray


def load_adversarial_examples(threat: str) -> AdversarialExamples:
    folder = layout.eval_dir(threat)
    try:
        images, labels, predictions = (np.load(folder / name, allow_pickle=False) for name in layout.EXAMPLE_ARRAYS)
    except (OSError, ValueError) as err:
        raise DataError(f"{folder}: unreadable adversarial examples ({err}); run evaluate@{threat}") from None
    return AdversarialExamples(images, labels, predictions)


@dataclass(frozen=True)
class PointOutcomes:
    """Which test rows an evaluation used and, per row, whether the model was correct clean and under attack."""

    rows: np.ndarray
    clean_correct: np.ndarray
    robust_correct: np.ndarray


def load_outcomes(path: Path) -> PointOutcomes:
    """An evaluation's per-point outcomes (models/eval/<threat>/outcomes.npz, or a copy from its MLflow run)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return PointOutcomes(data["rows"], data["clean_correct"], data["robust_correct"])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: unreadable per-point outcomes ({err})") from None


def generated_source(directory: Path = layout.SYNTHETIC_DIR) -> dict[str, Any]:
    """What the generated store recorded about how it was made (sampler, guidance, the diffusion model)."""
    path = directory / META_FILE
    try:
        return json.loads(path.read_text())["source"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: unreadable store metadata ({err}); run the generate stage") from None

