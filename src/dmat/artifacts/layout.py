"""Every artifact path and file name of the pipeline, in one place (dvc.yaml declares the same paths).

Paths are relative to the project root, which is the working directory of every stage (DVC runs
them there). Standard library only.
"""

from __future__ import annotations

from pathlib import Path

# Which real data `fetch` found (kind, path, sha256 per split): what `prepare` depends on.
SOURCE_RECORD = Path("data/source.json")

# Real data (prepare): canonical stores. `heldout` holds training-split images in neither train nor val
# (the held-out-real control; empty when data.heldout_size is 0).
REAL_DIR = Path("data/real")
REAL_SPLITS = ("train", "val", "test", "heldout")
REAL_TRAIN, REAL_VAL, REAL_TEST, REAL_HELDOUT = (REAL_DIR / split for split in REAL_SPLITS)

# Generated data (generate): a class-sorted canonical store.
SYNTHETIC_DIR = Path("data/synthetic")
# Which external files generate reads with generate.source external (fetch_generated: sizes and modification
# times, no hashing): what generate depends on in their place.
GENERATED_SOURCE_RECORD = Path("data/generated_source.json")

# The mix (mix): which generated rows the classifier may use, and their share of each batch.
MIXED_DIR = Path("data/mixed")
MIX_MANIFEST_FILE = "manifest.json"
MIX_INDICES_FILE = "synthetic_indices.npy"
# mix.source -> the store that supplies the "synthetic" share of each batch (the manifest names it).
MIX_SOURCES = {"generated": SYNTHETIC_DIR, "heldout_real": REAL_HELDOUT}

# Where the model stages (train_reference, train_diffusion, train) train: their resumable checkpoints live here,
# outside their DVC outputs, until the stage finishes and moves them in (`dmat.checkpoint.publish`). DVC deletes
# a stage's outputs before running it, and a `persist: true` output would keep the stage out of DVC's run cache:
# this way a second experiment with the same upstream params restores the trained model instead of training it.
WORK_DIR = Path(".dmat/work")

# The diffusion model (train_diffusion).
DIFFUSION_DIR = Path("models/diffusion")
DIFFUSION_CHECKPOINT = DIFFUSION_DIR / "checkpoint.pt"
DIFFUSION_FORMAT = "dmat-diffusion-1"

# The classifier (train): the best EMA weights by validation robust accuracy, and the resumable last epoch.
CLASSIFIER_DIR = Path("models/classifier")
CLASSIFIER_BEST = CLASSIFIER_DIR / "best.pt"
CLASSIFIER_LAST = CLASSIFIER_DIR / "last.pt"
CLASSIFIER_FORMAT = "dmat-classifier-1"

# The reference classifier (train_reference): standard training on real data only, the fixed yardstick of
# generated data and the scorer of generate's filter. Its own format: never mistaken for a robust classifier.
REFERENCE_DIR = Path("models/reference")
REFERENCE_BEST = REFERENCE_DIR / "best.pt"
REFERENCE_LAST = REFERENCE_DIR / "last.pt"
REFERENCE_FORMAT = "dmat-reference-classifier-1"

# Evaluations (evaluate@<threat>): adversarial examples and reports, one directory per threat model.
EVAL_DIR = Path("models/eval")
EVAL_REPORT_FILE = "report.json"
ROBUSTBENCH_FILE = "robustbench.json"
EXAMPLES_FORMAT = "dmat-adversarial-examples-1"
EXAMPLE_ARRAYS = ("images.npy", "labels.npy", "predictions.npy")
OUTCOMES_FILE = "outcomes.npz"  # per test point: its row, clean correct, robust correct (for paired tests)

# Deployable models (export).
EXPORT_DIR = Path("models/export")
EXPORTED_CLASSIFIER_ONNX = EXPORT_DIR / "classifier.onnx"
EXPORTED_CLASSIFIER_PT2 = EXPORT_DIR / "classifier.pt2"
EXPORTED_DENOISER_ONNX = EXPORT_DIR / "denoiser.onnx"
EXPORT_MANIFEST = EXPORT_DIR / "manifest.json"
EXPORTED_FILES = (EXPORTED_CLASSIFIER_ONNX.name, EXPORTED_CLASSIFIER_PT2.name, EXPORTED_DENOISER_ONNX.name)

# Pictures and curves (`dvc plots`).
GENERATE_GRID = Path("plots/generate_grid.png")
TRAIN_CURVES = Path("plots/train_curves.csv")
REFERENCE_CURVES = Path("plots/train_reference_curves.csv")


def work_dir(stage: str) -> Path:
    """The directory a model stage trains in (its resumable checkpoints) until it publishes its outputs."""
    return WORK_DIR / stage


def eval_dir(threat: str) -> Path:
    return EVAL_DIR / threat


def metrics_file(name: str) -> Path:
    """A stage's declared DVC metrics, the few headline numbers people compare: metrics/<name>.json."""
    return Path("metrics") / f"{name}.json"


def report_file(name: str) -> Path:
    """A stage's full report (digests, per-class tables, check details): reports/<name>.json, an ordinary output."""
    return Path("reports") / f"{name}.json"


def sweep_file(threat: str) -> Path:
    return Path("plots") / f"evaluate_{threat}_sweep.csv"
