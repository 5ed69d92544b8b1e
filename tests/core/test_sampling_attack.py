"""The attack on sampling: PGD through the Heun sampler moves samples further than a random perturbation of the same
size, stays inside its ball, and the sampler it differentiates is the one that samples."""

import math

import pytest
import torch

from dmat.core import exact_measures as em
from dmat.core import known_distribution as kd
from dmat.core.samplers import edm_sigma_steps, heun_integrate, heun_sampler
from dmat.core.sampling_attack import attack_latents, random_direction

SIGMAS = edm_sigma_steps(8)


@pytest.mark.parametrize("truth", [kd.ring(8, classes=2), kd.patterns(side=4, modes=4, classes=2)], ids=["2d", "16d"])
def test_the_attack_moves_samples_further_than_random_perturbations_of_its_size(truth: kd.GaussianMixture) -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(64, *truth.shape, generator=generator, dtype=torch.float64)
    labels = truth.draw_labels(64, generator)
    radius = 0.05 * math.sqrt(truth.dim)
    start = random_direction(latents, radius, generator)
    delta = attack_latents(truth.denoise, latents, labels, SIGMAS, radius=radius, steps=5, start=start)
    assert (delta.flatten(1).norm(dim=1) <= radius * (1 + 1e-9)).all()
    clean = heun_sampler(truth.denoise, latents, labels, SIGMAS)
    attacked = heun_sampler(truth.denoise, latents + delta, labels, SIGMAS)
    randomly = heun_sampler(truth.denoise, latents + start, labels, SIGMAS)
    moved = (attacked - clean).flatten(1).norm(dim=1)
    moved_randomly = (randomly - clean).flatten(1).norm(dim=1)
    assert (moved >= moved_randomly - 1e-9).all()  # it starts from the random perturbation and keeps its best
    assert em.displacement(clean, attacked) > 1.3 * em.displacement(clean, randomly)
    assert em.mode_change_rate(clean, attacked, truth) >= em.mode_change_rate(clean, randomly, truth)


def test_the_differentiable_integration_is_the_sampler() -> None:
    truth = kd.ring(8)
    latents = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    samples = heun_integrate(truth.denoise, latents, None, SIGMAS)
    (gradient,) = torch.autograd.grad(samples.sum(), latents)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    torch.testing.assert_close(samples.detach(), heun_sampler(truth.denoise, latents.detach(), None, SIGMAS), rtol=0,
                               atol=0)
