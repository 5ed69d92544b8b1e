"""`dmat known-distribution evaluate --truth NAME`: the exact measures of a trained denoiser (dmat.core.exact_measures).

Every measure is against the ground truth, on draws from `evaluate.seed` (the same points, latents and true
samples for every run, whatever its training seed):
- the denoiser's error against the Bayes-optimal denoiser per noise level, and EDM-weighted;
- its samples (deterministic Heun sampler) against the true density: mean log-density, mode masses (total
  variation, coverage), the share outside every mode, sliced Wasserstein distance to true samples, and the
  share closer to a training point than true samples come (memorisation);
- the attack on sampling: PGD on the starting noise vs a random perturbation of the same size.
Next to each, two references measured the same way: `_exact`, the Bayes-optimal denoiser through the same
sampler (what the sampler's discretisation alone costs), and `_true`, fresh true samples (the finite-sample
floor).

Writes metrics/evaluate_<truth>.json, plots/<truth>/{denoiser_error.csv,denoiser_error.png,samples.png} and
data/<truth>/samples.npz, and logs them to MLflow.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dmat.artifacts import known_distribution as layout
from dmat.config import as_dict
from dmat.core import exact_measures as measures
from dmat.core.known_distribution import GaussianMixture, log_density_grid
from dmat.core.rng import seeded_generator
from dmat.core.samplers import edm_sigma_steps, heun_sampler, to_uint8
from dmat.core.sampling_attack import attack_latents, random_direction
from dmat.errors import DataError
from dmat.files import atomic_path, write_json
from dmat.known_distribution_config import KnownDistributionParams, KnownEvaluateConfig
from dmat.plots import image_grid, save_curve, save_png, save_scatter_over_density
from dmat.stage_setup import apply_torch
from dmat.tracking import stage_run

STAGE = "kd-evaluate"
SECTIONS = ("base", "data", "train", "evaluate")  # the condition and the AT mode are part of what a run measures
# Random streams of the evaluation, keyed (evaluate.seed, purpose, truth[, noise level]).
CURVE, WEIGHTED, LATENTS, TRUE_REFERENCE, TRUE_FLOOR, PROJECTIONS, ATTACK = range(7)
PICTURE_SAMPLES = 32  # images shown for image-shaped truths
# The 2-D picture shows at most this many times the truth's extent: beyond it the density's contours vanish
VIEW_LIMIT = 4.0

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def error_curve(denoiser: Denoiser, truth: GaussianMixture, ev: KnownEvaluateConfig, key: int) -> list[dict]:
    generators = [seeded_generator(ev.seed, CURVE, key, i) for i in range(len(ev.sigmas))]
    return [vars(measures.denoiser_error(denoiser, truth, sigma, ev.n_denoiser, generator))
            for sigma, generator in zip(ev.sigmas, generators, strict=True)]


def sample_measures(samples: Tensor, labels: Tensor, truth: GaussianMixture, reference: Tensor, training: Tensor,
                    threshold: float, ev: KnownEvaluateConfig, key: int) -> dict[str, float]:
    """The sample-quality measures of one sample set (model, exact sampler or fresh true samples)."""
    masses = measures.mode_masses(samples, truth)
    projections = seeded_generator(ev.seed, PROJECTIONS, key)  # the same directions for every set
    return {"log_density": measures.mean_log_density(samples, truth, labels),
            "mode_tv": measures.mode_total_variation(masses, truth),
            "mode_coverage": measures.mode_coverage(masses, truth),
            "off_mode_rate": measures.off_mode_rate(samples, truth),
            "sliced_w2": measures.sliced_wasserstein(samples, reference, ev.projections, projections),
            "memorisation_rate": measures.memorisation_rate(samples, training, threshold)}


def attack_measures(denoiser: Denoiser, latents: Tensor, labels: Tensor, sigmas: Tensor, truth: GaussianMixture,
                    ev: KnownEvaluateConfig, key: int) -> dict[str, float]:
    """Displacement and mode changes of the samples under PGD on the starting noise and under a random
    perturbation of the same norm (the attack's start, so the attack moves each sample at least as far)."""
    radius = ev.attack_eps * math.sqrt(latents[0].numel())
    latents = latents.to(torch.float64)
    start = random_direction(latents, radius, seeded_generator(ev.seed, ATTACK, key))
    delta = attack_latents(denoiser, latents, labels, sigmas, radius=radius, steps=ev.attack_steps, start=start)
    clean = heun_sampler(denoiser, latents, labels, sigmas)
    attacked = heun_sampler(denoiser, latents + delta, labels, sigmas)
    randomly = heun_sampler(denoiser, latents + start, labels, sigmas)
    return {"attack_displacement": measures.displacement(clean, attacked),
            "attack_mode_change": measures.mode_change_rate(clean, attacked, truth),
            "random_displacement": measures.displacement(clean, randomly),
            "random_mode_change": measures.mode_change_rate(clean, randomly, truth)}


def _suffixed(metrics: dict[str, float], suffix: str) -> dict[str, float]:
    return {f"{name}{suffix}": value for name, value in metrics.items()}


def run(params: KnownDistributionParams, truth: str) -> dict:
    cfg = params.truth(truth)
    apply_torch(params.base)
    mixture, key = layout.truth_of(cfg), layout.truth_key(truth)
    denoiser, header = layout.load_denoiser(layout.model_file(truth))
    if header.get("truth_config") != as_dict(cfg):
        raise DataError(f"{layout.model_file(truth)} was trained on another truth than truths.{truth} describes "
                        "now: run `dvc repro` to retrain it")
    training = layout.load_training_set(layout.training_set_file(truth), mixture.shape)
    with stage_run(f"{STAGE}@{truth}", params, SECTIONS) as tracked:
        tracked.log_params({**{f"truth.{k}": v for k, v in as_dict(cfg).items()}, "truth.name": truth})
        metrics, curve, sets = evaluate(denoiser, mixture, training.points, params, key)
        metrics["train_loss"] = header["log"][-1]["loss"] if header.get("log") else math.nan
        title = f"{truth}: AT {params.train.adversarial.mode}, {condition(params)}"
        write_outputs(truth, title, metrics, curve, sets, mixture, training.points)
        tracked.log_metrics(metrics)
        for path in (layout.error_curve_file(truth), layout.error_curve_picture(truth), layout.samples_picture(truth),
                     layout.samples_file(truth)):
            tracked.log_artifact(path)
    return metrics


def evaluate(denoiser: Denoiser, mixture: GaussianMixture, training: Tensor, params: KnownDistributionParams,
             key: int) -> tuple[dict[str, float], list[dict], dict[str, Tensor]]:
    """Every measure of one truth: the metrics, the error curve and the sample sets (with their labels)."""
    ev = params.evaluate
    curve = error_curve(denoiser, mixture, ev, key)
    metrics = {"denoiser_error_weighted": measures.weighted_denoiser_error(
        denoiser, mixture, ev.n_weighted, seeded_generator(ev.seed, WEIGHTED, key),
        p_mean=params.train.p_mean, p_std=params.train.p_std)}
    metrics.update({f"denoiser_error_sigma_{row['sigma']:g}": row["error"] for row in curve})

    latents_generator = seeded_generator(ev.seed, LATENTS, key)
    labels = mixture.draw_labels(ev.n_samples, latents_generator)
    latents = torch.randn(ev.n_samples, *mixture.shape, generator=latents_generator)
    sigmas = edm_sigma_steps(ev.sampler_steps, ev.sigma_min, ev.sigma_max, ev.rho)
    model_samples = heun_sampler(denoiser, latents, labels, sigmas)
    exact_samples = heun_sampler(mixture.denoise, latents, labels, sigmas)
    reference, _, _ = mixture.sample(ev.n_samples, seeded_generator(ev.seed, TRUE_REFERENCE, key), labels)
    floor, _, _ = mixture.sample(ev.n_samples, seeded_generator(ev.seed, TRUE_FLOOR, key), labels)
    threshold = measures.memorisation_threshold(reference, training, ev.memorisation_quantile)
    metrics["memorisation_threshold"] = threshold
    for suffix, samples in (("", model_samples), ("_exact", exact_samples), ("_true", floor)):
        metrics.update(_suffixed(sample_measures(samples, labels, mixture, reference, training, threshold, ev, key),
                                 suffix))

    attacked = slice(0, ev.attack_n)
    for suffix, network in (("", denoiser), ("_exact", mixture.denoise)):
        attack = attack_measures(network, latents[attacked], labels[attacked], sigmas, mixture, ev, key)
        metrics.update(_suffixed(attack, suffix))
    return metrics, curve, {"model": model_samples, "exact": exact_samples, "labels": labels}


def condition(params: KnownDistributionParams) -> str:
    """The training-data condition in words, for picture titles."""
    data, parts = params.data, [f"n={params.data.n}"]
    if data.corrupt_fraction > 0:
        parts.append(f"{data.corrupt_fraction:.0%} corrupted (σ {data.corrupt_sigma:g})")
    if data.outlier_fraction > 0:
        parts.append(f"{data.outlier_fraction:.0%} outliers")
    return ", ".join(parts)


def write_outputs(truth: str, title: str, metrics: dict[str, float], curve: list[dict], sets: dict[str, Tensor],
                  mixture: GaussianMixture, training: Tensor) -> None:
    write_json(layout.metrics_file(layout.EVALUATE_STAGE, truth), metrics)
    with atomic_path(layout.error_curve_file(truth)) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sigma", "error", "optimal_mse"])
        writer.writeheader()
        writer.writerows(curve)
    save_curve(layout.error_curve_picture(truth), [row["sigma"] for row in curve],
               {"model vs Bayes-optimal": [row["error"] for row in curve],
                "Bayes-optimal vs clean (irreducible)": [row["optimal_mse"] for row in curve]},
               xlabel="noise level σ", ylabel="mean squared error per coordinate", title=title,
               ylim=None, log_axes=True)
    with atomic_path(layout.samples_file(truth)) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{name: values.numpy() for name, values in sets.items()})
    samples = sets["model"]
    if mixture.dim == 2:
        _scatter(layout.samples_picture(truth), title, mixture, samples, training)
    else:
        images = to_uint8(samples[:PICTURE_SAMPLES].reshape(-1, *mixture.shape[-3:]).float()).numpy()
        save_png(layout.samples_picture(truth), image_grid(images, columns=8), scale=4)


def _scatter(path: Path, title: str, mixture: GaussianMixture, samples: Tensor, training: Tensor) -> None:
    """Model samples and training points over the true density's contours; the view holds the truth and
    nearly all samples, up to VIEW_LIMIT times the truth's extent (points beyond it, such as the training set's
    outliers or a diverged sampler's output, are not drawn)."""
    finite = samples[torch.isfinite(samples).all(dim=1)]
    spread = float(finite.abs().quantile(0.995)) if len(finite) else 0.0
    extent = mixture.extent()
    ticks, log_density = log_density_grid(mixture, min(max(1.25 * extent, spread), VIEW_LIMIT * extent))
    save_scatter_over_density(path, ticks.numpy(), log_density.numpy(),
                              [("training points", training.numpy(), "0.6"), ("samples", samples.numpy(), "tab:blue")],
                              title=title)
