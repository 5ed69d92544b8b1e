"""Ground truths: the closed-form Bayes-optimal denoiser against a Monte Carlo posterior mean and Tweedie's formula,
the density, class-conditional sampling, and the training-data conditions."""

import math

import pytest
import torch

from dmat.core import known_distribution as kd

TRUTHS = {"ring": kd.ring(8, classes=2), "grid": kd.grid(5, classes=3),
          "patterns": kd.patterns(side=4, modes=6, classes=2)}


def monte_carlo_posterior_mean(truth: kd.GaussianMixture, x: torch.Tensor, sigma: float, label: int,
                               draws: int = 100_000) -> tuple[torch.Tensor, float]:
    """E[x0 | x, y] by self-normalised importance sampling: x0 drawn from p(x0 | y), weighted by N(x; x0, σ²I).
    Returns the estimate and its effective sample size."""
    generator = torch.Generator().manual_seed(11)
    x0, _, _ = truth.sample(draws, generator, torch.full((draws,), label))
    flat = x0.reshape(draws, -1).double()
    weights = (-(flat - x.reshape(1, -1).double()).square().sum(1) / (2 * sigma**2)).softmax(0)
    return (weights[:, None] * flat).sum(0), 1 / weights.square().sum().item()


@pytest.mark.parametrize("name", ["ring", "grid"])
@pytest.mark.parametrize("sigma", [0.05, 0.4])
def test_optimal_denoiser_is_the_monte_carlo_posterior_mean(name: str, sigma: float) -> None:
    truth = TRUTHS[name]
    generator = torch.Generator().manual_seed(3)
    x0, labels, _ = truth.sample(3, generator)
    x = x0 + sigma * torch.randn(x0.shape, generator=generator)
    exact = truth.denoise(x.double(), sigma, labels)
    for i in range(3):
        estimate, ess = monte_carlo_posterior_mean(truth, x[i], sigma, int(labels[i]))
        assert ess > 500  # enough effective draws for the tolerance below
        # Monte Carlo standard error of a weighted mean is about (posterior std)/√ESS; the posterior std is at most σ.
        torch.testing.assert_close(exact[i].reshape(-1), estimate, atol=6 * sigma / math.sqrt(ess), rtol=0)


@pytest.mark.parametrize("sigma", [0.05, 0.4])
def test_optimal_denoiser_error_is_orthogonal_to_functions_of_the_input_in_high_dimension(sigma: float) -> None:
    """In 64-D, where importance sampling degenerates, the defining property of E[x0 | x] by Monte Carlo over
    (x0, x) pairs: the error x0 − D*(x) has mean 0 and is uncorrelated with any function h of x."""
    truth = kd.patterns(side=8, modes=4, classes=2)
    generator = torch.Generator().manual_seed(4)
    x0, labels, _ = truth.sample(40_000, generator)
    x = x0 + sigma * torch.randn(x0.shape, generator=generator)
    error = (x0.double() - truth.denoise(x.double(), sigma, labels)).reshape(len(x), -1)
    flat = x.double().reshape(len(x), -1)
    for h in (torch.ones_like(flat), flat, flat.tanh() * flat.roll(1, dims=1)):
        products = error * h
        standard_error = products.std(dim=0) / math.sqrt(len(x))
        assert (products.mean(dim=0).abs() < 5 * standard_error).all()
    # ... while the error of a slightly wrong denoiser (shrinking too much) is not.
    wrong = (x0.double() - 0.9 * truth.denoise(x.double(), sigma, labels)).reshape(len(x), -1)
    assert ((wrong * flat).mean(dim=0).abs() > 5 * (wrong * flat).std(dim=0) / math.sqrt(len(x))).any()


@pytest.mark.parametrize("name", sorted(TRUTHS))
def test_optimal_denoiser_satisfies_tweedie(name: str) -> None:
    """D*(x; σ) = x + σ²∇ log p_σ(x | y): the denoiser and the density agree."""
    truth = TRUTHS[name]
    generator = torch.Generator().manual_seed(0)
    x0, labels, _ = truth.sample(20, generator)
    sigma = torch.rand(20, generator=generator, dtype=torch.float64) + 0.01
    per_point = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    x = (x0.double() + per_point * torch.randn(x0.shape, generator=generator)).requires_grad_()
    (score,) = torch.autograd.grad(truth.log_prob(x, labels, sigma).sum(), x)
    expected = x.detach() + per_point**2 * score
    torch.testing.assert_close(truth.denoise(x.detach(), sigma, labels), expected)


def test_density_integrates_to_one_and_class_densities_to_one_each() -> None:
    truth = TRUTHS["ring"]
    ticks, log_p = kd.log_density_grid(truth, limit=1.2, points=400)
    cell = (ticks[1] - ticks[0]).item() ** 2
    assert log_p.exp().sum().item() * cell == pytest.approx(1.0, abs=1e-3)
    mesh = torch.cartesian_prod(ticks, ticks)
    for label in range(truth.num_classes):
        conditional = truth.log_prob(mesh, torch.full((len(mesh),), label)).exp().sum().item() * cell
        assert conditional == pytest.approx(1.0, abs=1e-3)


def test_class_conditional_samples_come_from_their_class_modes_in_proportion() -> None:
    truth = TRUTHS["grid"]
    generator = torch.Generator().manual_seed(1)
    labels = torch.full((30_000,), 2)
    points, got_labels, components = truth.sample(30_000, generator, labels)
    assert points.shape == (30_000, 2) and points.dtype == torch.float32
    assert torch.equal(got_labels, labels) and (truth.component_class[components] == 2).all()
    shares = torch.bincount(components, minlength=25)[truth.component_class == 2].double() / 30_000
    assert shares.sub(1 / len(shares)).abs().max() < 0.01  # equal weights within the class
    assert (truth.nearest_component(points) == components).double().mean() > 0.99  # the modes are well apart


def test_patterns_are_image_shaped_with_diagonal_covariances() -> None:
    truth = kd.patterns(side=8, modes=8, classes=2)
    assert truth.shape == (1, 8, 8) and truth.dim == 64 and truth.num_classes == 2
    assert truth.stds.min() / truth.stds.max() < 0.5  # not isotropic
    points, _, components = truth.sample(5000, torch.Generator().manual_seed(0))
    spread = (points.reshape(5000, -1).double() - truth.means[components]) / truth.stds[components]
    assert spread.std().item() == pytest.approx(1.0, abs=0.02)


def test_corruption_noises_the_chosen_share_only() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.zeros(20_000, 2)
    noisy, chosen = kd.corrupt(points, 0.3, 0.5, generator)
    assert chosen.double().mean().item() == pytest.approx(0.3, abs=0.01)
    assert (noisy[~chosen] == 0).all()
    assert noisy[chosen].std().item() == pytest.approx(0.5, rel=0.03)


def test_outliers_lie_far_from_every_mode() -> None:
    truth = TRUTHS["ring"]
    generator = torch.Generator().manual_seed(0)
    points, labels, _ = truth.sample(5000, generator)
    moved, new_labels, chosen = kd.replace_with_outliers(points, labels, truth, 0.2, generator, radii=(1.5, 3.0))
    assert chosen.double().mean().item() == pytest.approx(0.2, abs=0.02)
    assert torch.equal(moved[~chosen], points[~chosen]) and torch.equal(new_labels[~chosen], labels[~chosen])
    radius = moved[chosen].norm(dim=1)
    assert radius.min() >= 1.5 * truth.extent() - 1e-4 and radius.max() <= 3.0 * truth.extent() + 1e-4
    assert truth.log_prob(moved[chosen]).max() < truth.log_prob(points).min() - 20  # nowhere near a mode


def test_mixtures_refuse_inconsistent_definitions() -> None:
    with pytest.raises(ValueError, match="classes must be between"):
        kd.ring(4, classes=5)
    truth = TRUTHS["ring"]
    with pytest.raises(ValueError, match="sum to 1"):
        kd.GaussianMixture(truth.means, truth.stds, truth.weights * 2, truth.component_class, (2,))
