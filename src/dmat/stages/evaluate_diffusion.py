"""`evaluate_diffusion`: how robust the diffusion model's denoiser is, and how good its samples are.

Denoiser robustness (docs/method.md), on the first `n_denoiser` images of data/real/test at every σ of
`sigmas`: the denoising error, and the change of the denoised output under a random and under an
adversarial (PGD, `attack_steps`) perturbation inside the box r(σ) = g(σ)^radius_rho + radius_floor.
That box is this stage's yardstick, not the box the model was trained with: a model trained with AT
mode `none` and one trained with `adversarial` are measured in the same box, so their numbers compare.
The training box, when the model had one, is reported next to the results.

Sample quality, without downloads, under the reference classifier (models/reference/best.pt: standard
training on data/real/train only, see `train_reference`). It never saw generated data and does not change
with the diffusion model, so every diffusion variant is measured with the same yardstick; the classifier of
`train` is not used (it was trained on these very images). Measured on a seeded class-stratified draw of
`n_generated_per_class` images per class from data/synthetic (never a prefix: the store is sorted by
class), taken outside the rows the mix chose for training when the store has enough of them; the report
says which rows were used and how many of them the mix had chosen too (`reused_mixed_rows`). Next to each
number, the same measurement of the control: as many images of data/real/heldout (real training-split
images that no model of the pipeline trained on), the score of a perfect generator.
- `conditional_accuracy`: the share the reference classifies as their conditioning class, overall (with a
  95% Wilson interval) and per class; for the control, the reference's accuracy on those real images;
- `fd_reference`: the Fréchet distance to the first `n_real` test images in the reference's penultimate
  features. Not an FID: comparable only between runs that share the reference classifier, and biased
  upwards at small n (the control shows the floor at this n);
- `precision` and `recall`: k-NN manifold precision (share of the set inside the real images' manifold:
  realistic?) and recall (share of the real images inside the set's manifold: varied?), `knn_k`
  neighbours, in the same features (Kynkäänniemi et al. 2019);
- `memorisation_rate`: the share of images whose nearest data/real/train image (the diffusion model's
  training set) is at most a threshold away, in pixel space (Euclidean, [0, 1] images); the threshold is the
  `memorisation_quantile` of the same distances for data/real/val, so real unseen images score about that
  quantile: the control measures it, a copying generator scores well above it;
- `class_colour_agreement` and `class_layout_agreement` (report only): how well the per-class mean images
  reproduce what sets each real class apart in colour and in coarse layout (correlations; 1 is a perfect
  match, 0 none; see `dmat.core.diffusion_metrics.class_mean_agreement`);
- `fid`, only when `inception_weights` names a local torchvision Inception-v3 weights file (loaded
  with weights_only=True; a missing or foreign file is an error). Such a file is an input of the stage:
  add it to the stage's deps in dvc.yaml when you name it.

Writes metrics/evaluate_diffusion.json (the headline numbers), reports/evaluate_diffusion.json (everything:
per σ, per class, the rows used) and one MLflow run whose params include the diffusion model's training
recipe (as `train_diffusion.*`, the names its own run uses), the generated store's source and the reference
classifier.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dmat import pipeline
from dmat.artifacts import layout
from dmat.artifacts.loaders import load_denoiser, load_mix_manifest, load_reference_classifier
from dmat.artifacts.records import DiffusionHeader, MixManifest, ReferenceHeader
from dmat.checkpoint import load_checkpoint
from dmat.config import Params, flatten
from dmat.core.diffusion_at import DiffusionATConfig
from dmat.core.diffusion_metrics import (
    ClassMeans,
    FeatureMoments,
    NearestNeighbours,
    class_mean_agreement,
    conditional_accuracy,
    denoiser_robustness,
    frechet_distance,
    inception_feature_network,
    inception_features,
    knn_precision_recall,
    memorisation,
    memorisation_threshold,
)
from dmat.core.precision import full_precision
from dmat.core.rng import seeded_generator
from dmat.core.stats import wilson_interval
from dmat.data.splits import purpose_rng, stratified_sample, stratified_sample_preferring
from dmat.data.store import ArrayStore
from dmat.data.tensors import to_model_space, to_unit_tensor
from dmat.errors import CheckpointError, DataError
from dmat.files import sha256_file, write_json
from dmat.stage_setup import apply_torch
from dmat.tracking import stage_run

DECLARED = pipeline.for_module(__name__)
STAGE = DECLARED.name
SECTIONS = DECLARED.sections  # what its MLflow run logs: the params sections it reads
INCEPTION_BATCH = 32  # images per Inception-v3 call: 299×299 activations are large
PIXEL_CHUNK = 4096  # training images per block of the nearest-neighbour search
# metrics/evaluate_diffusion.json: each sample-quality number of the generated images next to the control's
# report name -> headline key (headline keys are unique across metrics files: `dvc exp show` columns)
HEADLINE_QUALITY = {"conditional_accuracy": "conditional_accuracy", "fd_reference": "fd_reference",
                    "precision": "knn_precision", "recall": "knn_recall", "memorisation_rate": "memorisation_rate"}


@dataclass(frozen=True)
class Inputs:
    """The stores this stage reads."""

    test: ArrayStore  # the real side of FD, precision and recall (first n_real images)
    synthetic: ArrayStore  # what is measured
    heldout: ArrayStore  # the control
    train: ArrayStore  # the diffusion model's training set (memorisation)
    val: ArrayStore  # real images no model trained on: calibrates the memorisation threshold

    @classmethod
    def open(cls) -> Inputs:
        return cls(*(ArrayStore.open(path) for path in (layout.REAL_TEST, layout.SYNTHETIC_DIR, layout.REAL_HELDOUT,
                                                          layout.REAL_TRAIN, layout.REAL_VAL)))


def run(params: Params) -> dict:
    cfg = params.evaluate_diffusion
    device = apply_torch(params.base)
    inception = load_inception(cfg.inception_weights, device) if cfg.inception_weights else None
    denoiser, diffusion = load_denoiser(device=device)
    denoiser.requires_grad_(False)  # the attacks need gradients for their input only
    reference, reference_state = load_reference_classifier(device=device)
    stores = Inputs.open()
    check_inputs(stores, diffusion, reference_state)
    manifest, mixed_rows = load_mix_manifest()
    generated_rows, selection = generated_selection(stores.synthetic, manifest, mixed_rows, params)
    control_rows = control_subset(stores.heldout, len(generated_rows), params)
    check_sizes(params, min(cfg.n_real, len(stores.test)), len(generated_rows), len(control_rows))
    with stage_run(STAGE, params, SECTIONS) as tracked:
        _log_inputs(tracked, stores, diffusion, reference_state, selection)
        started = time.perf_counter()
        metrics = {
            "adversarial_mode": diffusion.adversarial.get("mode", "none"),
            "box": {"rho": cfg.radius_rho, "floor": cfg.radius_floor, "attack_steps": cfg.attack_steps},
            "training_box": _training_box(diffusion),
            "denoiser": denoiser_metrics(denoiser, stores.test, params, device),
            "reference_classifier": _describe_reference(reference_state),
            **sample_quality(reference, inception, stores, generated_rows, control_rows, params, device),
        }
        metrics["generated"]["rows"] = {**selection, "indices": generated_rows.tolist()}
        if metrics["heldout_real"] is not None:
            metrics["heldout_real"]["rows"] = {"store_images": len(stores.heldout), "indices": control_rows.tolist()}
        metrics["seconds"] = time.perf_counter() - started
        write_json(layout.report_file(STAGE), metrics)
        summary = headline(metrics)
        write_json(layout.metrics_file(STAGE), summary)
        # the headline under its own names too (`dmat compare` reads those); lists (rows, intervals) stay in the report
        tracked.log_metrics(_numeric(flatten(metrics)) | summary)
        tracked.log_artifact(layout.report_file(STAGE))
    return metrics


def headline(report: dict) -> dict:
    """metrics/evaluate_diffusion.json: each sample-quality number of the generated images next to the held-out
    real control's (`heldout_*`), and the denoiser's error and adversarial change averaged over the noise levels
    (per σ, the random change, per-class numbers and FID are in the report)."""
    per_sigma = report["denoiser"].values()
    denoiser = {f"denoiser_{name}": float(np.mean([row[name] for row in per_sigma]))
                for name in ("denoise_error", "adversarial_change")}
    quality = {}
    for name, key in HEADLINE_QUALITY.items():
        quality[key] = report["generated"][name]
        if report["heldout_real"] is not None:
            quality[f"heldout_{key}"] = report["heldout_real"][name]
    return {**quality, **denoiser}


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


def check_inputs(stores: Inputs, diffusion: DiffusionHeader, reference_state: ReferenceHeader) -> None:
    """Refuse stores and models that do not belong together, naming them."""
    real = stores.test
    named = {str(layout.REFERENCE_BEST): reference_state.classes,
             str(layout.DIFFUSION_CHECKPOINT): diffusion.classes,
             **{str(store.path): store.classes for store in (stores.synthetic, stores.heldout, stores.train,
                                                             stores.val)}}
    for name, classes in named.items():
        if tuple(classes) != real.classes:
            raise DataError(f"{name}: classes {list(classes)} differ from {real.path}'s {list(real.classes)}")
    for store in (stores.synthetic, stores.heldout, stores.train, stores.val):
        if len(store) and store.image_shape != real.image_shape:
            raise DataError(f"{store.path}: images are {store.image_shape}, the real ones in {real.path} are "
                            f"{real.image_shape}")
    for store in (stores.train, stores.val):
        if len(store) == 0:
            raise DataError(f"{store.path} is empty: the memorisation rate needs the diffusion model's training "
                            "images and unseen real ones (data/real/val) to calibrate its threshold")


def check_sizes(params: Params, n_real: int, n_generated: int, n_control: int) -> None:
    """k-NN manifolds need more than k points per set (and a Fréchet distance two)."""
    cfg = params.evaluate_diffusion
    need = max(cfg.knn_k + 1, 2)
    for key, n in (("evaluate_diffusion.n_real (or the size of data/real/test)", n_real),
                   ("evaluate_diffusion.n_generated_per_class (or the size of data/synthetic)", n_generated)):
        if n < need:
            raise DataError(f"{key} gives {n} images: precision and recall with knn_k = {cfg.knn_k} need at least "
                            f"{need}")
    if 0 < n_control < need:
        raise DataError(f"data/real/heldout gives only {n_control} images for the control: precision and recall "
                        f"with knn_k = {cfg.knn_k} need at least {need}; raise data.heldout_size (0 = no control)")


def generated_selection(synthetic: ArrayStore, manifest: MixManifest, mixed_rows: np.ndarray,
                        params: Params) -> tuple[np.ndarray, dict]:
    """A seeded class-stratified draw of n_generated_per_class images per class (all when fewer), outside the
    rows the mix chose for training from this very store whenever a class has enough of them.

    Returns the rows and what the report says about them: how many the store had outside the mix, and how
    many mixed rows had to be used (`reused_mixed_rows`, 0 when the guard held).
    """
    total = min(params.evaluate_diffusion.n_generated_per_class * len(synthetic.classes), len(synthetic))
    mixed = np.zeros(len(synthetic), dtype=bool)
    mixes_this_store = manifest.synthetic.path == str(layout.SYNTHETIC_DIR) and \
        manifest.synthetic.sha256 == synthetic.digest
    if mixes_this_store:
        mixed[mixed_rows] = True
    rows, reused = stratified_sample_preferring(np.asarray(synthetic.labels), total, mixed,
                                                purpose_rng(params.base.seed, "evaluate_diffusion.generated"))
    return rows, {"n": len(rows), "store_images": len(synthetic), "mix_source": manifest.source,
                  "mix_uses_this_store": mixes_this_store, "mixed_rows_in_store": int(mixed.sum()),
                  "outside_mix_in_store": int((~mixed).sum()),
                  "reused_mixed_rows": reused, "reused_mixed": reused > 0,
                  "mix_indices_sha256": manifest.indices_sha256}


def control_subset(heldout: ArrayStore, n: int, params: Params) -> np.ndarray:
    """As many held-out real images as generated ones (all of them when fewer), class-stratified and seeded."""
    return stratified_sample(np.asarray(heldout.labels), min(n, len(heldout)),
                             purpose_rng(params.base.seed, "evaluate_diffusion.heldout")) if len(heldout) else \
        np.empty(0, dtype=np.int64)


def yardstick(params: Params) -> DiffusionATConfig:
    """The measuring box: r = g(σ)^radius_rho + radius_floor, with no random part."""
    cfg = params.evaluate_diffusion
    return DiffusionATConfig(mode="adversarial", rho=cfg.radius_rho, floor_min=cfg.radius_floor,
                             floor_max=cfg.radius_floor)


@full_precision()
def denoiser_metrics(denoiser: nn.Module, real: ArrayStore, params: Params, device: str) -> dict[str, dict]:
    """Means over the first n_denoiser test images, per σ; noise and ω are seeded per (seed, σ, batch). Float32:
    TF32 and autocast off."""
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


def sample_quality(reference: nn.Module, inception: nn.Module | None, stores: Inputs, generated_rows: np.ndarray,
                   control_rows: np.ndarray, params: Params, device: str) -> dict:
    """The sample-quality metrics of the generated images and of the held-out real control (None without one),
    each against the first n_real test images, under the reference classifier."""
    cfg = params.evaluate_diffusion
    real_rows = np.arange(min(cfg.n_real, len(stores.test)))
    real = _feature_pass(reference, inception, stores.test, real_rows, cfg.batch_size, device)
    sets = {"generated": (stores.synthetic, generated_rows)}
    if len(control_rows):
        sets["heldout_real"] = (stores.heldout, control_rows)
    passes = {name: _feature_pass(reference, inception, store, rows, cfg.batch_size, device)
              for name, (store, rows) in sets.items()}
    copying = memorisation_rates(stores, sets, cfg.memorisation_quantile)
    results = {name: {**set_metrics(real, passes[name], len(stores.test.classes), cfg.knn_k), **copying[name]}
               for name in sets}
    for name in results:
        results[name]["conditional_accuracy_per_class"] = dict(zip(
            stores.test.classes, results[name]["conditional_accuracy_per_class"], strict=True))
    return {"real": {"n": len(real_rows), "accuracy": float((real["predicted"] == real["labels"]).double().mean())},
            "generated": results["generated"], "heldout_real": results.get("heldout_real"),
            "calibration": copying["calibration"]}


def set_metrics(real: dict, other: dict, num_classes: int, k: int) -> dict:
    """Everything measured of one set of images against the real test images, in the reference's features."""
    overall, per_class = conditional_accuracy(other["predicted"], other["labels"], num_classes)
    n, hits = len(other["labels"]), int((other["predicted"] == other["labels"]).sum())
    agreement = class_mean_agreement(real["class_means"].means(), other["class_means"].means())
    coverage = knn_precision_recall(real["features"], other["features"], k)
    metrics = {
        "n": n, "conditional_accuracy": overall,
        "conditional_accuracy_interval": list(wilson_interval(hits, n)),
        "conditional_accuracy_per_class": per_class.tolist(),
        "fd_reference": frechet_distance(*_moments(real["features"]), *_moments(other["features"])),
        "precision": coverage["precision"], "recall": coverage["recall"],
        "class_colour_agreement": agreement["colour"], "class_layout_agreement": agreement["layout"],
    }
    if real["inception"].count:
        metrics["fid"] = frechet_distance(*real["inception"].statistics(), *other["inception"].statistics())
    return metrics


def memorisation_rates(stores: Inputs, sets: dict[str, tuple[ArrayStore, np.ndarray]], quantile: float) -> dict:
    """Per set, the memorisation rate against data/real/train in pixel space, with the threshold calibrated
    on all of data/real/val; one streamed pass over the training images serves every set."""
    queries = {name: _pixels(store, rows) for name, (store, rows) in sets.items()}
    queries["calibration"] = _pixels(stores.val, np.arange(len(stores.val)))
    neighbours = NearestNeighbours(torch.cat(list(queries.values())))
    for start in range(0, len(stores.train), PIXEL_CHUNK):
        neighbours.update(_pixels(stores.train, np.arange(start, min(start + PIXEL_CHUNK, len(stores.train)))))
    distances = dict(zip(queries, neighbours.distances.split([len(q) for q in queries.values()]), strict=True))
    calibration = distances.pop("calibration")
    results = {}
    for name, found in distances.items():
        rate = memorisation(found, calibration, quantile)
        hits = int((found <= rate["threshold"]).sum())
        results[name] = {"memorisation_rate": rate["rate"],
                         "memorisation_interval": list(wilson_interval(hits, len(found))),
                         "nearest_train_distance_median": float(found.median())}
    results["calibration"] = {"store": str(stores.val.path), "n": len(calibration), "quantile": quantile,
                              "threshold": memorisation_threshold(calibration, quantile),
                              "space": "pixels, Euclidean, [0, 1] images",
                              "nearest_train_distance_median": float(calibration.median())}
    return results


def _pixels(store: ArrayStore, rows: np.ndarray) -> Tensor:
    """Store rows as flattened float32 [0, 1] pixel vectors."""
    return to_unit_tensor(store.read(rows)[0], "cpu").flatten(1)


def _moments(features: Tensor) -> tuple[Tensor, Tensor]:
    moments = FeatureMoments()
    moments.update(features)
    return moments.statistics()


@full_precision()
@torch.no_grad()
def _feature_pass(reference: nn.Module, inception: nn.Module | None, store: ArrayStore, rows: np.ndarray,
                  batch_size: int, device: str) -> dict:
    """One pass over `rows`: the reference's penultimate features and predictions, per-class mean images,
    Inception feature moments."""
    inception_moments = FeatureMoments()
    class_means = ClassMeans(len(store.classes))
    features, predicted, labels = [], [], []
    for start in range(0, len(rows), batch_size):
        images, batch_labels = store.read(rows[start:start + batch_size])
        x = to_unit_tensor(images, device)
        batch_features = reference.features(x)
        features.append(batch_features.float().cpu())
        predicted.append(reference.head(batch_features).argmax(1).cpu())  # forward(x) = head(features(x))
        labels.append(torch.from_numpy(batch_labels))
        class_means.update(x, labels[-1])
        if inception is not None:
            for chunk in x.split(INCEPTION_BATCH):
                inception_moments.update(inception_features(inception, chunk))
    return {"features": torch.cat(features), "inception": inception_moments, "class_means": class_means,
            "predicted": torch.cat(predicted), "labels": torch.cat(labels)}


def _training_box(diffusion: DiffusionHeader) -> dict | None:
    """The box the diffusion model was trained with, when it was trained with one (for reference)."""
    adversarial = diffusion.adversarial
    if not adversarial or adversarial.get("mode", "none") == "none":
        return None
    return {key: adversarial[key] for key in ("mode", "rho", "floor_min", "floor_max") if key in adversarial}


def _describe_reference(state: ReferenceHeader) -> dict:
    return {"path": str(layout.REFERENCE_BEST), "model": state.model_config.name, "epoch": state.epoch,
            "sha256": sha256_file(layout.REFERENCE_BEST), "mlflow_run_id": state.mlflow_run_id}


def _log_inputs(tracked, stores: Inputs, diffusion: DiffusionHeader, reference_state: ReferenceHeader,
                selection: dict) -> None:
    for store, name in ((stores.test, "real/test"), (stores.synthetic, "synthetic"), (stores.heldout, "real/heldout"),
                        (stores.train, "real/train"), (stores.val, "real/val")):
        tracked.log_store(store, name, context="evaluation")
    recipe = {"train_diffusion": {**diffusion.train_config, "trained_steps": diffusion.step},
              "synthetic": {"images": len(stores.synthetic), "source": dict(stores.synthetic.meta.source)},
              "reference": {"model": reference_state.model_config.name},
              "rows": {"mix_source": selection["mix_source"], "reused_mixed_rows": selection["reused_mixed_rows"]}}
    tracked.log_params(flatten(recipe))
    tracked.set_tags({"dmat.diffusion_run_id": diffusion.mlflow_run_id or "",
                      "dmat.reference_run_id": reference_state.mlflow_run_id or "",
                      "dmat.adversarial_mode": diffusion.adversarial.get("mode", "none")})


def _numeric(flat: dict) -> dict[str, float]:
    """The numbers among flattened metrics, under names MLflow accepts (class names may hold any character)."""
    return {re.sub(r"[^\w\-. /]", "_", key): value for key, value in flat.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)}
