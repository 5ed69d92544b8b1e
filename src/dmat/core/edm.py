"""EDM preconditioning, training noise distribution and loss weight.

Source: Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models" (NeurIPS 2022), Table 1, column "Ours (EDM)", and Eq. 7-8. A raw network F is wrapped as

    D(x; σ, y) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), y)

so that the network's input and training target both have unit variance at every noise level.
Data live in [-1, 1] with standard deviation σ_data = 0.5, as in EDM. Every function works on a
Python float or a tensor of noise levels, element-wise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SIGMA_DATA = 0.5  # EDM's σ_data for images scaled to [-1, 1]
P_MEAN = -1.2  # mean of ln σ during training (Table 1, "Training")
P_STD = 1.2  # standard deviation of ln σ during training


def _as_tensor(sigma: Tensor | float) -> Tensor:
    return sigma if isinstance(sigma, Tensor) else torch.tensor(sigma, dtype=torch.float64)


def c_skip(sigma: Tensor | float, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Skip scaling c_skip(σ) = σ_data² / (σ² + σ_data²) (EDM Table 1)."""
    sigma = _as_tensor(sigma)
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: Tensor | float, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Output scaling c_out(σ) = σ·σ_data / √(σ² + σ_data²) (EDM Table 1)."""
    sigma = _as_tensor(sigma)
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: Tensor | float, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Input scaling c_in(σ) = 1 / √(σ² + σ_data²) (EDM Table 1)."""
    sigma = _as_tensor(sigma)
    return (sigma**2 + sigma_data**2).rsqrt()


def c_noise(sigma: Tensor | float) -> Tensor:
    """Noise conditioning c_noise(σ) = ¼·ln σ (EDM Table 1)."""
    return _as_tensor(sigma).log() / 4


def loss_weight(sigma: Tensor | float, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Loss weight λ(σ) = (σ² + σ_data²) / (σ·σ_data)² = 1 / c_out(σ)² (EDM Table 1, Eq. 8).

    It makes the effective training target of F have unit variance at every σ.
    """
    sigma = _as_tensor(sigma)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_training_sigma(
    n: int,
    *,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n training noise levels, ln σ ~ N(P_mean, P_std²) (EDM Table 1, "Training")."""
    normal = torch.randn(n, generator=generator, device=device)
    return (normal * p_std + p_mean).exp()


class Precond(nn.Module):
    """EDM preconditioning (Eq. 7): turns a raw network F(c_in·x, c_noise, labels) into D(x; σ, y).

    ``sigma`` is a scalar or one noise level per sample, shape (N,); it is broadcast over the other
    dimensions of ``x``. The wrapped network must accept ``(x, noise_labels, class_labels)`` with
    ``noise_labels`` of shape (N,) and return a tensor shaped like ``x``.
    """

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        per_sample = sigma.reshape(-1, *[1] * (x.ndim - 1))
        f_x = self.model(c_in(per_sample, self.sigma_data) * x, c_noise(sigma), class_labels)
        return c_skip(per_sample, self.sigma_data) * x + c_out(per_sample, self.sigma_data) * f_x
