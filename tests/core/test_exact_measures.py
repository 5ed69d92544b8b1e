"""Each exact measure on known cases: true samples score at the floor, and a shifted, collapsed, spread or copied
sample set is caught by the measure meant to catch it."""

import math

import pytest
import torch

from dmat.core import exact_measures as em
from dmat.core import known_distribution as kd
from dmat.core.edm import loss_weight, sample_training_sigma

RING = kd.ring(8, classes=2)
N = 2000


def draw(n: int = N, seed: int = 0, truth: kd.GaussianMixture = RING) -> tuple[torch.Tensor, torch.Tensor]:
    points, labels, _ = truth.sample(n, torch.Generator().manual_seed(seed))
    return points, labels


def gen(seed: int = 99) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_optimal_denoiser_has_zero_error_and_the_identity_a_large_one() -> None:
    for sigma in (0.05, 1.0):
        assert em.denoiser_error(RING.denoise, RING, sigma, 500, gen()).error < 1e-12
    identity = em.denoiser_error(lambda x, s, y: x, RING, 1.0, 500, gen())
    assert identity.error > 0.5 and identity.optimal_mse < identity.error / 2


def test_weighted_error_is_the_excess_edm_loss_over_the_optimum() -> None:
    """E[λ‖D − x0‖²] − E[λ‖D* − x0‖²] = E[λ‖D − D*‖²] for the posterior mean D*: check it on a blurred denoiser."""

    def blurred(x, sigma, labels):
        return 0.8 * RING.denoise(x, sigma, labels)

    n = 200_000
    weighted = em.weighted_denoiser_error(blurred, RING, n, gen(1), p_mean=-1.2, p_std=1.2)
    generator = gen(1)  # the same σ, points and noise as above
    sigma = sample_training_sigma(n, p_mean=-1.2, p_std=1.2, generator=generator).double()
    x0, labels, _ = RING.sample(n, generator)
    x = x0 + sigma[:, None].float() * torch.randn(x0.shape, generator=generator)
    weight = loss_weight(sigma)
    loss = (weight * (blurred(x.double(), sigma, labels) - x0.double()).square().mean(1)).mean()
    optimum = (weight * (RING.denoise(x.double(), sigma, labels) - x0.double()).square().mean(1)).mean()
    assert weighted == pytest.approx((loss - optimum).item(), rel=0.03)
    assert em.weighted_denoiser_error(RING.denoise, RING, 1000, gen(), p_mean=-1.2, p_std=1.2) < 1e-12


def test_true_samples_score_at_the_floor() -> None:
    samples, labels = draw(seed=1)
    reference, _ = draw(seed=2)
    masses = em.mode_masses(samples, RING)
    assert em.mode_total_variation(masses, RING) < 0.05
    assert em.mode_coverage(masses, RING) == 1.0
    assert em.off_mode_rate(samples, RING) < 0.005
    entropy = -RING.log_prob(draw(50_000, seed=3)[0]).mean().item()
    assert em.mean_log_density(samples, RING, labels) == pytest.approx(-entropy + math.log(2), abs=0.1)  # log p(x|y)
    assert em.sliced_wasserstein(samples, reference, 128, gen()) < 0.06


def test_a_shifted_set_is_caught_by_the_distance_and_the_log_density() -> None:
    samples, labels = draw(seed=1)
    reference, _ = draw(seed=2)
    shifted = samples + torch.tensor([0.15, 0.0])
    floor = em.sliced_wasserstein(samples, reference, 128, gen())
    assert em.sliced_wasserstein(shifted, reference, 128, gen()) > 2 * floor
    assert em.mean_log_density(shifted, RING, labels) < em.mean_log_density(samples, RING, labels) - 2
    assert em.off_mode_rate(shifted, RING) > 0.2  # three standard deviations off: many leave every mode


def test_a_collapsed_set_is_caught_by_mode_mass_and_coverage_not_by_log_density() -> None:
    samples, labels = draw(seed=1)
    collapsed = RING.means[0].float().expand(N, 2).clone()  # every sample at the densest point of one mode
    masses = em.mode_masses(collapsed, RING)
    assert em.mode_total_variation(masses, RING) == pytest.approx(1 - 1 / 8)
    assert em.mode_coverage(masses, RING) == pytest.approx(1 / 8)
    assert em.mean_log_density(collapsed, RING) > em.mean_log_density(samples, RING)  # precision-like: blind to it
    half = torch.cat([samples[: N // 2][RING.nearest_component(samples[: N // 2]) < 4]] * 2)  # four modes dropped
    assert em.mode_coverage(em.mode_masses(half, RING), RING) == 0.5


def test_a_copied_set_is_caught_by_memorisation() -> None:
    training, _ = draw(64, seed=5)
    fresh, _ = draw(seed=6)
    threshold = em.memorisation_threshold(fresh, training, quantile=0.01)
    honest, _ = draw(seed=7)
    copies = training[torch.randint(0, 64, (N,), generator=gen())] + 1e-4 * torch.randn(N, 2, generator=gen(3))
    assert em.memorisation_rate(honest, training, threshold) < 0.03
    assert em.memorisation_rate(copies, training, threshold) > 0.99
    assert em.off_mode_rate(copies, RING) < 0.02  # each copy is a plausible point of the truth


def test_off_mode_rate_catches_over_dispersed_samples_in_high_dimension() -> None:
    truth = kd.patterns(classes=2)
    samples, _, components = truth.sample(N, gen(1))
    too_wide = truth.means[components] + 1.3 * (samples.reshape(N, -1).double() - truth.means[components])
    assert em.off_mode_rate(samples, truth) < 0.005
    assert em.off_mode_rate(too_wide, truth) > 0.5


def test_displacement_and_mode_changes() -> None:
    samples, _ = draw(seed=1)
    assert em.displacement(samples, samples + torch.tensor([0.3, 0.4])) == pytest.approx(0.5 / math.sqrt(2))
    rotated = samples @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # a quarter turn: two modes on
    assert em.mode_change_rate(samples, rotated, RING) == pytest.approx(1.0)
    assert em.mode_change_rate(samples, samples + 1e-3, RING) < 0.01
