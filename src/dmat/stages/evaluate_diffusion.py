"""`evaluate_diffusion`: how robust the diffusion model's denoiser is, and how good its samples are.

Denoiser robustness (DESIGN.md §5), on the first `n_denoiser` images of data/real/test at every σ of
`sigmas`: the denoising error, and the change of the denoised output under a random and under an
adversarial (PGD, `attack_steps`) perturbation inside the box r(σ) = g(σ)^radius_rho + radius_floor.
That box is this stage's yardstick, not the box the model was trained with: a model trained with AT
mode `none` and one trained with `adversarial` are measured in the same box, so their numbers compare.
The training box, when the model had one, is reported next to the results.

Sample quality, without downloads, on a seeded class-stratified draw of `n_generated_per_class`
images per class from data/synthetic (never a prefix: the store is sorted by class), under the
trained classifier (models/classifier/best.pt):
- conditional accuracy: the share classified as their conditioning class, overall and per class,
  next to the classifier's accuracy on the real test images for reference;
- `fd_classifier`: the Fréchet distance between the first `n_real` test images and the generated ones
  in the classifier's penultimate-layer features. Not an FID: comparable only between runs that
  share the classifier, and biased upwards at small n.
- `class_colour_agreement` and `class_layout_agreement`: how well the generated per-class mean images
  reproduce what sets each real class apart in colour and in coarse layout (correlations; 1 is a
  perfect match, 0 none; see `dmat.core.diffusion_metrics.class_mean_agreement`);
- `fid`, only when `inception_weights` names a local torchvision Inception-v3 weights file (loaded
  with weights_only=True; a missing or foreign file is an error). Such a file is an input of the stage:
  add it to the stage's deps in dvc.yaml when you name it.

Writes metrics/evaluate_diffusion.json (the headline numbers), reports/evaluate_diffusion.json (everything,
per σ and per class) and one MLflow run whose params include the diffusion model's training recipe (as
`train_diffusion.*`, the names its own run uses) and the generated store's source.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmat.artifacts import layout
from dmat.artifacts.loaders import load_classifier, load_denoiser
from dmat.checkpoint import load_checkpoint
from dmat.config import Params, flatten
from dmat.core.diffusion_at import DiffusionATConfig
from dmat.core.diffusion_metrics import (
    ClassMeans,
    FeatureMoments,
    class_mean_agreement,
    conditional_accuracy,
    denoiser_robustness,
    frechet_distance,
    inception_feature_network,
    inception_features,
)
from dmat.core.rng import seeded_generator
from dmat.data.splits import purpose_rng, stratified_sample
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_model_space, to_unit_tensor
from dmat.errors import CheckpointError, DataError
from dmat.files import write_json
from dmat.stage_setup import apply_torch
from dmat.tracking import stage_run

STAGE = "evaluate_diffusion"
SECTIONS = ("base", "evaluate_diffusion")
INCEPTION_BATCH = 32  # images per Inception-v3 call: 299×299 activations are large


def run(params: Params) -> dict:
    cfg = params.evaluate_diffusion
    device = apply_torch(params.base)
    inception = load_inception(cfg.inception_weights, device) if cfg.inception_weights else None
    denoiser, diffusion = load_denoiser(device=device)
    denoiser.requires_grad_(False)  # the attacks need gradients for their input only
    classifier, classifier_state = load_classifier(layout.CLASSIFIER_BEST, device)
    real, synthetic = ArrayStore.open(layout.REAL_TEST), ArrayStore.open(layout.SYNTHETIC_DIR)
    check_inputs(real, synthetic, diffusion, classifier_state)
    real_rows = np.arange(min(cfg.n_real, len(real)))
    generated_rows = generated_subset(synthetic, params)
    with stage_run(STAGE, params, SECTIONS) as tracked:
        _log_inputs(tracked, real, synthetic, diffusion, classifier_state)
        started = time.perf_counter()
        metrics = {
            "adversarial_mode": diffusion.get("adversarial", {}).get("mode", "none"),
            "box": {"rho": cfg.radius_rho, "floor": cfg.radius_floor, "attack_steps": cfg.attack_steps},
            "training_box": _training_box(diffusion),
            "denoiser": denoiser_metrics(denoiser, real, params, device),
            **sample_quality(classifier, inception, real, real_rows, synthetic, generated_rows, cfg.batch_size,
                             device),
        }
        metrics["seconds"] = time.perf_counter() - started
        write_json(layout.report_file(STAGE), metrics)
        write_json(layout.metrics_file(STAGE), headline(metrics))
        tracked.log_metrics(_numeric(flatten(metrics)))
        tracked.log_artifact(layout.report_file(STAGE))
    return metrics


def headline(report: dict) -> dict:
    """metrics/evaluate_diffusion.json: sample quality, and the denoiser metrics averaged over the noise levels
    (per σ in the report)."""
    per_sigma = report["denoiser"].values()
    denoiser = {f"denoiser_{name}": float(np.mean([row[name] for row in per_sigma]))
                for name in ("denoise_error", "random_change", "adversarial_change")}
    quality = ("conditional_accuracy", "real_test_accuracy", "fd_classifier", "class_colour_agreement",
               "class_layout_agreement", "fid")
    return {**{k: report[k] for k in quality if k in report}, **denoiser, "evaluate_diffusion_s": report["seconds"]}


def load_inception(path: str, device: str) -> nn.Module:
    """FID's feature network from a local torchvision Inception-v3 state dict; never a download."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: Inception-v3 weights file not found (evaluate_diffusion.inception_weights); "
                              "DMAT never downloads it")
    state = load_checkpoint(path, map_location=device)  # weights_only=True; names the file when torn
    try:
        return inception_feature_network(state).to(device)
    except (RuntimeError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise CheckpointError(f"{path}: not torchvision Inception-v3 weights ({reason})") from None


def check_inputs(real: ArrayStore, synthetic: ArrayStore, diffusion: dict, classifier_state: dict) -> None:
    """Refuse stores and models that do not belong together, naming them."""
    checkpoints = {str(layout.CLASSIFIER_BEST): classifier_state["classes"],
                   str(layout.DIFFUSION_CHECKPOINT): diffusion["classes"]}
    for name, classes in [(str(synthetic.path), synthetic.classes), *checkpoints.items()]:
        if tuple(classes) != real.classes:
            raise DataError(f"{name}: classes {list(classes)} differ from {real.path}'s {list(real.classes)}")
    if synthetic.image_shape != real.image_shape:
        raise DataError(f"{synthetic.path}: generated images are {synthetic.image_shape}, the real ones in "
                        f"{real.path} are {real.image_shape}")
    if len(real) < 2 or len(synthetic) < 2:
        raise DataError(f"{real.path} and {synthetic.path} need at least 2 images each for a Fréchet distance")


def generated_subset(synthetic: ArrayStore, params: Params) -> np.ndarray:
    """A seeded class-stratified draw of n_generated_per_class images per class (all when fewer)."""
    total = min(params.evaluate_diffusion.n_generated_per_class * len(synthetic.classes), len(synthetic))
    return stratified_sample(np.asarray(synthetic.labels), total,
                             purpose_rng(params.base.seed, "evaluate_diffusion.generated"))


def yardstick(params: Params) -> DiffusionATConfig:
    """The measuring box: r = g(σ)^radius_rho + radius_floor, with no random part."""
    cfg = params.evaluate_diffusion
    return DiffusionATConfig(mode="adversarial", rho=cfg.radius_rho, floor_min=cfg.radius_floor,
                             floor_max=cfg.radius_floor)


def denoiser_metrics(denoiser: nn.Module, real: ArrayStore, params: Params, device: str) -> dict[str, dict]:
    """Means over the first n_denoiser test images, per σ; noise and ω are seeded per (seed, σ, batch)."""
    cfg = params.evaluate_diffusion
    box, rows = yardstick(params), np.arange(min(cfg.n_denoiser, len(real)))
    sums: dict[float, dict[str, float]] = {sigma: {} for sigma in cfg.sigmas}
    for start in range(0, len(rows), cfg.batch_size):
        images, labels = real.read(rows[start:start + cfg.batch_size])
        x0, y = to_model_space(images, device), torch.from_numpy(labels).to(device)
        for index, sigma in enumerate(cfg.sigmas):
            generator = seeded_generator(params.base.seed, index, start)
            result = denoiser_robustness(denoiser, x0, y, sigma, box, attack_steps=cfg.attack_steps,
                                         generator=generator)
            for name, values in result.items():
                sums[sigma][name] = sums[sigma].get(name, 0.0) + values.double().sum().item()
    return {f"sigma_{sigma:g}": {"sigma": sigma, **{name: total / len(rows) for name, total in sums[sigma].items()}}
            for sigma in cfg.sigmas}


def sample_quality(classifier: nn.Module, inception: nn.Module | None, real: ArrayStore, real_rows: np.ndarray,
                   synthetic: ArrayStore, generated_rows: np.ndarray, batch_size: int, device: str) -> dict:
    """Conditional accuracy, fd_classifier, class-mean agreement and (with Inception weights) FID of the
    generated images."""
    real_pass = _feature_pass(classifier, inception, real, real_rows, batch_size, device)
    generated_pass = _feature_pass(classifier, inception, synthetic, generated_rows, batch_size, device)
    agreement = class_mean_agreement(real_pass["class_means"].means(), generated_pass["class_means"].means())
    predicted, conditioning = generated_pass["predicted"], generated_pass["labels"]
    overall, per_class = conditional_accuracy(predicted, conditioning, len(real.classes))
    metrics = {
        "n_real": len(real_rows), "n_generated": len(generated_rows),
        "conditional_accuracy": overall,
        "conditional_accuracy_per_class": dict(zip(real.classes, per_class.tolist(), strict=True)),
        "real_test_accuracy": float((real_pass["predicted"] == real_pass["labels"]).double().mean()),
        "fd_classifier": frechet_distance(*real_pass["classifier"].statistics(),
                                          *generated_pass["classifier"].statistics()),
        "class_colour_agreement": agreement["colour"], "class_layout_agreement": agreement["layout"],
    }
    if inception is not None:
        metrics["fid"] = frechet_distance(*real_pass["inception"].statistics(),
                                          *generated_pass["inception"].statistics())
    return metrics


@torch.no_grad()
def _feature_pass(classifier: nn.Module, inception: nn.Module | None, store: ArrayStore, rows: np.ndarray,
                  batch_size: int, device: str) -> dict:
    """One pass over `rows`: classifier feature moments and predictions, Inception feature moments."""
    moments = {"classifier": FeatureMoments(), "inception": FeatureMoments()}
    class_means = ClassMeans(len(store.classes))
    predicted, labels = [], []
    for start in range(0, len(rows), batch_size):
        images, batch_labels = store.read(rows[start:start + batch_size])
        x = to_unit_tensor(images, device)
        features = classifier.features(x)
        moments["classifier"].update(features)
        predicted.append(classifier.head(features).argmax(1).cpu())  # forward(x) = head(features(x))
        labels.append(torch.from_numpy(batch_labels))
        class_means.update(x, labels[-1])
        if inception is not None:
            for chunk in x.split(INCEPTION_BATCH):
                moments["inception"].update(inception_features(inception, chunk))
    return {**moments, "class_means": class_means, "predicted": torch.cat(predicted), "labels": torch.cat(labels)}


def _training_box(diffusion: dict) -> dict | None:
    """The box the diffusion model was trained with, when it was trained with one (for reference)."""
    adversarial = diffusion.get("adversarial")
    if not adversarial or adversarial.get("mode", "none") == "none":
        return None
    return {key: adversarial[key] for key in ("mode", "rho", "floor_min", "floor_max") if key in adversarial}


def _log_inputs(tracked, real: ArrayStore, synthetic: ArrayStore, diffusion: dict, classifier_state: dict) -> None:
    tracked.log_store(real, "real/test", context="evaluation")
    tracked.log_store(synthetic, "synthetic", context="evaluation")
    recipe = {"train_diffusion": {**diffusion.get("train_config", {}), "trained_steps": diffusion.get("step")},
              "synthetic": {"images": len(synthetic), "source": dict(synthetic.meta.source)},
              "classifier": {"model": classifier_state["model_config"]["name"]}}
    tracked.log_params(flatten(recipe))
    tracked.set_tags({"dmat.diffusion_run_id": diffusion.get("mlflow_run_id") or "",
                      "dmat.classifier_run_id": classifier_state.get("mlflow_run_id") or "",
                      "dmat.adversarial_mode": diffusion.get("adversarial", {}).get("mode", "none")})


def _numeric(flat: dict) -> dict[str, float]:
    """The numbers among flattened metrics, under names MLflow accepts (class names may hold any character)."""
    return {re.sub(r"[^\w\-. /]", "_", key): value for key, value in flat.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)}
