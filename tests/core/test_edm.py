"""Known answers for EDM preconditioning (Karras et al. 2022, Table 1) with σ_data = 0.5."""

import math

import pytest
import torch
from torch import nn

from dmat.core.edm import Precond, c_in, c_noise, c_out, c_skip, loss_weight, sample_training_sigma

# σ: (c_skip, c_out, c_in, c_noise, loss weight), worked by hand for σ_data = 0.5:
# c_skip = 0.25/(σ²+0.25), c_out = 0.5σ/√(σ²+0.25), c_in = 1/√(σ²+0.25), c_noise = ln σ / 4,
# weight = (σ²+0.25)/(0.25σ²).
HAND_COMPUTED = {
    0.5: (0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4, 8.0),
    1.0: (0.2, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25), 0.0, 5.0),
    2.0: (0.25 / 4.25, 1 / math.sqrt(4.25), 1 / math.sqrt(4.25), math.log(2) / 4, 4.25),
    0.002: (0.25 / 0.250004, 0.001 / math.sqrt(0.250004), 1 / math.sqrt(0.250004), math.log(0.002) / 4,
            0.250004 / 1e-6),
}


@pytest.mark.parametrize("sigma", sorted(HAND_COMPUTED))
def test_preconditioning_matches_hand_computed_values(sigma: float) -> None:
    skip, out, inp, noise, weight = HAND_COMPUTED[sigma]
    assert c_skip(sigma).item() == pytest.approx(skip, rel=1e-12)
    assert c_out(sigma).item() == pytest.approx(out, rel=1e-12)
    assert c_in(sigma).item() == pytest.approx(inp, rel=1e-12)
    assert c_noise(sigma).item() == pytest.approx(noise, rel=1e-12, abs=1e-15)
    assert loss_weight(sigma).item() == pytest.approx(weight, rel=1e-12)


def test_preconditioning_gives_unit_variance_input_and_target() -> None:
    """EDM's design constraints (Appendix B.6): for data of variance σ_data² and x = x0 + σn, the
    network input c_in·x and its effective target (x0 − c_skip·x)/c_out have unit variance."""
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    var_data = 0.25
    ones = torch.ones_like(sigma)
    torch.testing.assert_close(c_in(sigma) ** 2 * (var_data + sigma**2), ones)
    target_var = ((1 - c_skip(sigma)) ** 2 * var_data + c_skip(sigma) ** 2 * sigma**2) / c_out(sigma) ** 2
    torch.testing.assert_close(target_var, ones)
    torch.testing.assert_close(loss_weight(sigma), c_out(sigma) ** -2)
    assert c_skip(sigma).dtype == torch.float64
    assert c_skip(1.0, sigma_data=1.0).item() == pytest.approx(0.5)


def test_training_sigma_is_lognormal_with_edm_parameters() -> None:
    sigma = sample_training_sigma(200_000, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (200_000,) and (sigma > 0).all()
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)
    again = sample_training_sigma(5, p_mean=0.0, p_std=0.5, generator=torch.Generator().manual_seed(1))
    normal = torch.randn(5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, (normal * 0.5).exp())


class _Recorder(nn.Module):
    """Raw network that records its inputs and returns a constant, to check the wrapper's algebra."""

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None):
        self.seen = (x, noise_labels, class_labels)
        return torch.ones_like(x)


def test_precond_scales_input_and_combines_skip_and_output() -> None:
    raw = _Recorder()
    denoiser = Precond(raw)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 2.0])
    labels = torch.tensor([0, 1, 2])
    out = denoiser(x, sigma, labels)
    per_sample = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(raw.seen[0], c_in(per_sample) * x)
    torch.testing.assert_close(raw.seen[1], c_noise(sigma))
    assert raw.seen[2] is labels
    torch.testing.assert_close(out, c_skip(per_sample) * x + c_out(per_sample))


def test_precond_broadcasts_a_scalar_sigma() -> None:
    denoiser = Precond(_Recorder())
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(denoiser(x, 0.7, None), denoiser(x, torch.full((4,), 0.7), None))
    torch.testing.assert_close(denoiser(x, torch.tensor(0.7), None), denoiser(x, torch.full((4,), 0.7), None))
