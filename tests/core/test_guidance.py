"""Classifier-free guidance on denoisers with a closed form: class c's data ~ N(μ_c, s²)."""

import math

import pytest
import torch

from dmat.core.denoisers import build_denoiser
from dmat.core.guidance import GuidedDenoiser
from dmat.core.samplers import edm_sigma_steps, heun_sampler

MEANS = torch.tensor([-1.0, 1.0])  # two classes, equally likely
S = 0.5
NULL = 2


def _gaussian_posterior_mean(x: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return (S**2 * x + sigma**2 * mu) / (S**2 + sigma**2)


class ExactDenoiser(torch.nn.Module):
    """Exact conditional denoiser of each class and, for the null label, of the two-class mixture."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append(labels.clone())
        sigma = sigma.reshape(-1, 1)
        conditional = _gaussian_posterior_mean(x, sigma, MEANS[labels.clamp(max=1)].reshape(-1, 1))
        # mixture: posterior class weights from the marginal N(μ_c, s² + σ²) of each class
        log_p = torch.stack([-(x - m) ** 2 / (2 * (S**2 + sigma**2)) for m in MEANS])
        weights = log_p.softmax(0)
        mixture = sum(weights[c] * _gaussian_posterior_mean(x, sigma, MEANS[c]) for c in range(2))
        return torch.where((labels == NULL).reshape(-1, 1), mixture, conditional)


def test_weight_one_is_the_conditional_denoiser_with_one_evaluation() -> None:
    exact = ExactDenoiser()
    x, sigma, labels = torch.randn(6, 1), torch.full((6,), 0.7), torch.tensor([0, 1, 0, 1, 1, 0])
    out = GuidedDenoiser(exact, 1.0, NULL)(x, sigma, labels)
    assert torch.equal(out, ExactDenoiser()(x, sigma, labels))
    assert len(exact.calls) == 1 and NULL not in exact.calls[0]


def test_guided_output_extrapolates_from_unconditional_through_conditional_in_one_call() -> None:
    exact = ExactDenoiser()
    x, sigma, labels = torch.randn(5, 1), torch.full((5,), 0.7), torch.tensor([0, 1, 0, 1, 1])
    out = GuidedDenoiser(exact, 3.0, NULL)(x, sigma, labels)
    reference = ExactDenoiser()
    conditional, unconditional = reference(x, sigma, labels), reference(x, sigma, torch.full_like(labels, NULL))
    torch.testing.assert_close(out, unconditional + 3.0 * (conditional - unconditional))
    assert len(exact.calls) == 1 and exact.calls[0].tolist() == labels.tolist() + [NULL] * 5


def test_guidance_applies_only_inside_its_interval() -> None:
    exact = ExactDenoiser()
    x, labels = torch.randn(4, 1), torch.tensor([0, 1, 0, 1])
    sigma = torch.tensor([0.1, 0.3, 5.0, 50.0])
    out = GuidedDenoiser(exact, 2.0, NULL, interval=(0.3, 5.0))(x, sigma, labels)
    reference = ExactDenoiser()
    conditional = reference(x, sigma, labels)
    unconditional = reference(x, sigma, torch.full_like(labels, NULL))
    guided = unconditional + 2.0 * (conditional - unconditional)
    inside = torch.tensor([False, False, True, False])  # (0.3, 5.0]: 0.3 excluded, 5.0 included
    torch.testing.assert_close(out, torch.where(inside.reshape(-1, 1), guided, conditional))
    assert exact.calls[0].tolist() == [0, 1, 0, 1, NULL]  # one unconditional evaluation, for σ = 5


def test_guided_sampling_separates_the_classes_further_than_conditional_sampling() -> None:
    """The known effect of guidance: samples move away from the other class, and each class tightens."""
    latents = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1]).repeat(1000)
    plain = heun_sampler(ExactDenoiser(), latents, labels, edm_sigma_steps(32))
    guided = heun_sampler(GuidedDenoiser(ExactDenoiser(), 3.0, NULL), latents, labels, edm_sigma_steps(32))
    for c, sign in ((0, -1.0), (1, 1.0)):
        assert plain[labels == c].mean().item() == pytest.approx(MEANS[c].item(), abs=0.05)
        assert sign * guided[labels == c].mean().item() > sign * plain[labels == c].mean().item()
        assert guided[labels == c].std().item() < plain[labels == c].std().item()


def test_registry_denoiser_runs_guided_with_its_null_class() -> None:
    denoiser = build_denoiser("unet-tiny", img_resolution=8, in_channels=3, num_classes=4, label_dropout=0.1).eval()
    guided = GuidedDenoiser(denoiser, 2.0, null_label=4, interval=(0.5, math.inf))
    out = heun_sampler(guided, torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3]), edm_sigma_steps(3))
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("scale, interval", [(-1.0, (0.0, 1.0)), (2.0, (1.0, 1.0)), (2.0, (-1.0, 1.0))])
def test_bad_guidance_settings_are_refused(scale: float, interval: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="scale"):
        GuidedDenoiser(ExactDenoiser(), scale, NULL, interval=interval)
