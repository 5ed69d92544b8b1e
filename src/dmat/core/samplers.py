"""EDM samplers, per-image initial noise, and the uint8 image conversion.

Source: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS
2022): time steps Eq. 5, deterministic 2nd-order Heun sampler Algorithm 1, its stochastic variant
("churn") Algorithm 2. Every sampler shares one signature (as in crowsonkb/k-diffusion), so they are
interchangeable through :data:`SAMPLERS`. Samplers integrate the probability-flow ODE
dx/dσ = (x − D(x; σ)) / σ in float64 while the network is evaluated in float32, as EDM does; the
denoiser should be in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor: ...


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Noise levels σ_0 = σ_max > … > σ_{N−1} = σ_min, then σ_N = 0 (EDM Eq. 5), float64.

    σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class Churn:
    """EDM Algorithm 2's stochasticity: S_churn (0 = deterministic), the σ range [S_min, S_max] where it
    applies, and S_noise."""

    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0


def _denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
    """Evaluate the network in float32, one σ per sample; return float64 for the ODE arithmetic."""
    sigmas = sigma.to(torch.float32).expand(x.shape[0])
    return denoiser(x.to(torch.float32), sigmas, class_labels).to(torch.float64)


def _churn(x: Tensor, t_cur: Tensor, num_steps: int, churn: Churn,
           randn_like: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Temporarily raise the noise level to t̂ = (1 + γ)·t and add matching fresh noise (EDM Alg. 2,
    lines 4-6), with γ = min(S_churn/N, √2 − 1) inside [S_min, S_max], else 0 (a no-op)."""
    gamma = min(churn.s_churn / num_steps, math.sqrt(2) - 1) if churn.s_min <= float(t_cur) <= churn.s_max else 0.0
    if gamma == 0.0:
        return x, t_cur
    t_hat = t_cur + gamma * t_cur
    return x + (t_hat**2 - t_cur**2).sqrt() * churn.s_noise * randn_like(x), t_hat


@torch.no_grad()
def heun_sampler(denoiser: Denoiser, latents: Tensor, class_labels: Tensor | None, sigmas: Tensor, *,
                 churn: Churn = Churn(), randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> Tensor:
    """EDM 2nd-order Heun sampler: Algorithm 1 (deterministic, ``s_churn=0``) or Algorithm 2.

    ``sigmas`` is the schedule σ_0 > … > σ_N = 0 (e.g. :func:`edm_sigma_steps`), on the latents' device.
    ``latents`` are unit Gaussian noise, scaled here by σ_0. The last step is plain Euler to σ = 0, so N
    steps cost 2·N − 1 network evaluations. Returns float64 samples.
    """
    return heun_integrate(denoiser, latents, class_labels, sigmas, churn=churn, randn_like=randn_like)


def heun_integrate(denoiser: Denoiser, latents: Tensor, class_labels: Tensor | None, sigmas: Tensor, *,
                   churn: Churn = Churn(), randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> Tensor:
    """The integration of :func:`heun_sampler` with autograd left as the caller has it: the samples are
    differentiable with respect to the latents (and the network), for attacks on sampling."""
    num_steps = len(sigmas) - 1
    x = latents.to(torch.float64) * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x_hat, t_hat = _churn(x, t_cur, num_steps, churn, randn_like)
        d_cur = (x_hat - _denoise(denoiser, x_hat, t_hat, class_labels)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:  # 2nd-order correction (Alg. 1, lines 7-9), skipped on the final step to σ = 0
            d_next = (x - _denoise(denoiser, x, t_next, class_labels)) / t_next
            x = x_hat + (t_next - t_hat) * (d_cur + d_next) / 2
    return x


@torch.no_grad()
def euler_sampler(denoiser: Denoiser, latents: Tensor, class_labels: Tensor | None, sigmas: Tensor, *,
                  churn: Churn = Churn(), randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> Tensor:
    """1st-order Euler sampler on a σ schedule (EDM Alg. 1/2 without the Heun correction).

    Same signature and churn as :func:`heun_sampler`; N steps cost N network evaluations.
    """
    num_steps = len(sigmas) - 1
    x = latents.to(torch.float64) * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x_hat, t_hat = _churn(x, t_cur, num_steps, churn, randn_like)
        x = x_hat + (t_next - t_hat) * (x_hat - _denoise(denoiser, x_hat, t_hat, class_labels)) / t_hat
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"heun": heun_sampler, "euler": euler_sampler}


def _image_generator(seed: int, class_index: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, class, index) and the stream (0: initial
    noise, 1: churn noise), via numpy's SeedSequence (which hashes its key, so neighbouring keys give
    unrelated streams)."""
    key = [seed, class_index, index] + ([stream] if stream else [])
    state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # manual_seed wants a value below 2^63


def image_noise(seed: int, class_index: int, indices: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """Unit Gaussian initial noise, float32 on the CPU, shape (len(indices), *shape).

    Image ``index`` of class ``class_index`` gets the same noise whichever batch (or process) asks
    for it, so generated data do not depend on the batch size or the number of workers. Unlike the
    reference implementation, classes do not share noise.
    """
    if min(seed, class_index, *indices, 0) < 0:
        raise ValueError("seed, class_index and indices must be non-negative")
    noise = [torch.randn(shape, generator=_image_generator(seed, class_index, i)) for i in indices]
    return torch.stack(noise) if noise else torch.empty(0, *shape)


def per_image_randn_like(seed: int, classes: Sequence[int], indices: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """A `randn_like` for the samplers' churn that draws each image's noise from that image's own
    stream, so stochastic sampling too gives every image the same result in any batch or process."""
    generators = [_image_generator(seed, c, i, stream=1) for c, i in zip(classes, indices, strict=True)]

    def randn_like(x: Tensor) -> Tensor:
        noise = [torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in generators]
        return torch.stack(noise).to(device=x.device, dtype=x.dtype)

    return randn_like


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1], NCHW → uint8 NHWC via clip(x·127.5 + 128, 0, 255) (EDM ``generate.py``)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
