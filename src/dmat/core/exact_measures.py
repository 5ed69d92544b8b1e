"""Exact measures of a diffusion model whose data distribution is known (:mod:`dmat.core.known_distribution`).

Each function measures one thing against the ground truth, not against a proxy:
- the denoiser against the Bayes-optimal denoiser D*, at given noise levels and weighted as EDM trains;
- samples against the true density: their mean log-density, the mass each mode receives, how many fall
  outside every mode, and a distance between distributions (sliced Wasserstein);
- memorisation: how many samples lie closer to a training point than fresh true samples do;
- the effect of a perturbation of the sampler's starting noise: displacement and change of mode.

Where a measure has a finite-sample floor (a distance between two finite sample sets is never 0), the caller
measures the floor by applying the same function to true samples of the same size. Pure torch, float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dmat.core.edm import SIGMA_DATA, loss_weight, sample_training_sigma
from dmat.core.known_distribution import GaussianMixture

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _per_coordinate_square(a: Tensor, b: Tensor) -> Tensor:
    """‖a − b‖² / D per point: squared error in the units of one coordinate, comparable across dimensions."""
    return (_flat(a) - _flat(b)).square().mean(dim=1)


@torch.no_grad()
def _error_against_optimal(denoiser: Denoiser, truth: GaussianMixture, sigma: Tensor,
                           generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per point, for x = x0 + σ·n with (x0, y) from the truth: ‖D(x) − D*(x)‖²/D and ‖D*(x) − x0‖²/D."""
    x0, labels, _ = truth.sample(len(sigma), generator)
    sigma32 = sigma.to(torch.float32)
    x = x0 + sigma32.reshape(-1, *[1] * (x0.ndim - 1)) * torch.randn(x0.shape, generator=generator)
    optimal = truth.denoise(x.to(torch.float64), sigma, labels)
    return _per_coordinate_square(denoiser(x, sigma32, labels), optimal), _per_coordinate_square(optimal, x0)


@dataclass(frozen=True)
class DenoiserError:
    """At noise level ``sigma``: the mean ‖D − D*‖²/D (``error``) and the optimum's own ‖D* − x0‖²/D
    (``optimal_mse``, the irreducible part of any denoiser's error against the clean data)."""

    sigma: float
    error: float
    optimal_mse: float


def denoiser_error(denoiser: Denoiser, truth: GaussianMixture, sigma: float, n: int,
                   generator: torch.Generator) -> DenoiserError:
    """How far a class-conditional denoiser is from the Bayes-optimal one at noise level σ: the mean squared
    difference per coordinate, E‖D(x; σ, y) − D*(x; σ, y)‖²/D over x = x0 + σ·n with (x0, y) from the truth."""
    error, optimal = _error_against_optimal(denoiser, truth, torch.full((n,), sigma, dtype=torch.float64), generator)
    return DenoiserError(sigma, error.mean().item(), optimal.mean().item())


def weighted_denoiser_error(denoiser: Denoiser, truth: GaussianMixture, n: int, generator: torch.Generator, *,
                            p_mean: float, p_std: float, sigma_data: float = SIGMA_DATA) -> float:
    """The denoiser error as EDM weights it in training: E_σ[λ(σ)·‖D − D*‖²/D] with ln σ ~ N(p_mean, p_std²) and
    λ(σ) = (σ² + σ_data²)/(σ·σ_data)² (Karras et al. 2022, Eq. 8), Monte Carlo over n draws.

    Because D* is the posterior mean, E‖D − x0‖² = E‖D − D*‖² + E‖D* − x0‖² at every σ: this number is exactly
    how much the model's EDM loss on clean data exceeds the lowest loss any denoiser can reach.
    """
    sigma = sample_training_sigma(n, p_mean=p_mean, p_std=p_std, generator=generator).to(torch.float64)
    error, _ = _error_against_optimal(denoiser, truth, sigma, generator)
    return (loss_weight(sigma, sigma_data) * error).mean().item()


# --- Samples against the true density -------------------------------------------------------------------------

def mean_log_density(samples: Tensor, truth: GaussianMixture, class_labels: Tensor | None = None) -> float:
    """Mean true log-density of the samples, log p(x) (or log p(x | y) for samples drawn for classes y), in nats.

    Precision-like: samples off the data score low; it cannot see missing modes (a set collapsed onto the
    densest points scores higher than true samples do). Compare it with true samples' value, minus the
    truth's entropy in expectation."""
    return truth.log_prob(samples, class_labels).mean().item()


def mode_masses(samples: Tensor, truth: GaussianMixture) -> Tensor:
    """Share of the samples assigned to each mode (the component of highest posterior probability), (K,)."""
    counts = torch.bincount(truth.nearest_component(samples), minlength=truth.num_components)
    return counts.to(torch.float64) / max(len(samples), 1)


def mode_total_variation(masses: Tensor, truth: GaussianMixture) -> float:
    """Total variation between the modes' sample masses and their true weights, ½ Σ_k |m_k − π_k|, in [0, 1]:
    0 when every mode gets its share; dropped, collapsed or unbalanced modes raise it."""
    return 0.5 * (masses - truth.weights).abs().sum().item()


def mode_coverage(masses: Tensor, truth: GaussianMixture, share: float = 0.5) -> float:
    """Share of the modes that receive at least ``share`` of their true weight (1 = every mode present)."""
    return (masses >= share * truth.weights).to(torch.float64).mean().item()


def off_mode_rate(samples: Tensor, truth: GaussianMixture, tail: float = 1e-3) -> float:
    """Share of the samples outside every mode: those whose squared Mahalanobis distance to their most
    probable component exceeds that component's (1 − tail) quantile, i.e. P(χ²_D > m) < tail. True samples
    score about ``tail``."""
    flat = _flat(samples)
    k = truth.nearest_component(samples)
    mahalanobis = ((flat - truth.means[k]) / truth.stds[k]).square().sum(dim=1)
    tail_probability = torch.special.gammaincc(torch.tensor(truth.dim / 2, dtype=torch.float64), mahalanobis / 2)
    return (tail_probability < tail).to(torch.float64).mean().item()


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int, generator: torch.Generator) -> float:
    """Sliced 2-Wasserstein distance between two equally large sample sets (Rabin et al. 2011; Bonneel et al.
    2015): the root mean over random unit directions of the squared 1-D Wasserstein-2 distance between the
    projected sets (sorted and paired). In data units; two finite sets of true samples stay above 0 (the floor)."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"sliced_wasserstein needs two non-empty sets of one size, got {len(a)} and {len(b)}")
    flat_a, flat_b = _flat(a), _flat(b)
    directions = torch.randn(projections, flat_a.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    sorted_a = (flat_a @ directions.T).sort(dim=0).values
    sorted_b = (flat_b @ directions.T).sort(dim=0).values
    return math.sqrt((sorted_a - sorted_b).square().mean().item())


# --- Memorisation ---------------------------------------------------------------------------------------------

def nearest_distance(points: Tensor, reference: Tensor, chunk: int = 1024) -> Tensor:
    """Euclidean distance from each point to its nearest reference point, (n,)."""
    ref, flat = _flat(reference), _flat(points)
    if len(flat) == 0:
        return torch.empty(0, dtype=torch.float64)
    return torch.cat([torch.cdist(part, ref).min(dim=1).values for part in flat.split(chunk)])


def memorisation_threshold(fresh_true: Tensor, training: Tensor, quantile: float) -> float:
    """The distance to the training set below which only ``quantile`` of fresh true samples fall: a sample this
    close to a training point is closer than the truth itself would put it (memorisation, not generalisation)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    return torch.quantile(nearest_distance(fresh_true, training), quantile).item()


def memorisation_rate(samples: Tensor, training: Tensor, threshold: float) -> float:
    """Share of the samples closer to a training point than ``threshold`` (:func:`memorisation_threshold`). Fresh
    true samples score about the calibration quantile; copies of training points score 1."""
    return (nearest_distance(samples, training) < threshold).to(torch.float64).mean().item()


# --- Perturbations of sampling --------------------------------------------------------------------------------

def displacement(clean: Tensor, perturbed: Tensor) -> float:
    """Mean distance between the samples with and without the perturbation, per coordinate: E‖x' − x‖/√D."""
    return (_flat(perturbed) - _flat(clean)).norm(dim=1).div(math.sqrt(_flat(clean).shape[1])).mean().item()


def mode_change_rate(clean: Tensor, perturbed: Tensor, truth: GaussianMixture) -> float:
    """Share of the samples whose mode (most probable component) the perturbation changed."""
    return (truth.nearest_component(clean) != truth.nearest_component(perturbed)).to(torch.float64).mean().item()
