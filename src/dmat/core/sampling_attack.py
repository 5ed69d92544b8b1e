"""Attacks on sampling: perturb the starting noise of the deterministic sampler to move the sample it makes.

The deterministic Heun sampler (:func:`dmat.core.samplers.heun_integrate`) is a differentiable map S from the
latent z (unit Gaussian noise) to a sample. An attacker who may change z by a small δ, ‖δ‖₂ ≤ r, chooses δ to
move S(z + δ) as far as possible from S(z). We solve that by projected gradient ascent in the L2 ball (PGD,
Madry et al. 2018, with the normalised-gradient steps of its L2 variant), differentiating through every
sampler step, and compare it with a random perturbation of the same size. The claim under test ("diffusion
AT makes sampling resilient to iterative attacks", Briglia et al.) predicts smaller displacements for
adversarially trained denoisers. Radii are per sample, in the latents' units: r = eps·√D gives a root mean
square change of ``eps`` per coordinate of z.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dmat.core.samplers import heun_integrate

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))


def _project(delta: Tensor, radius: float) -> Tensor:
    """Scale every sample's δ back into the L2 ball of the radius (δ inside it is left alone)."""
    return delta * (radius / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def random_direction(like: Tensor, radius: float, generator: torch.Generator) -> Tensor:
    """A perturbation of norm exactly ``radius`` per sample, in a uniformly random direction."""
    delta = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    return delta * radius / _per_sample_norm(delta)


def sample_displacement(denoiser: Denoiser, latents: Tensor, delta: Tensor, class_labels: Tensor | None,
                        sigmas: Tensor, clean: Tensor) -> Tensor:
    """‖S(z + δ) − S(z)‖² per sample, differentiable with respect to δ; ``clean`` is S(z)."""
    moved = heun_integrate(denoiser, latents + delta, class_labels, sigmas)
    return (moved - clean).flatten(1).square().sum(dim=1)


def attack_latents(denoiser: Denoiser, latents: Tensor, class_labels: Tensor | None, sigmas: Tensor, *,
                   radius: float, steps: int, start: Tensor, step_size: float | None = None) -> Tensor:
    """PGD in the L2 ball of ``radius`` on the sampler's starting noise, maximising ‖S(z + δ) − S(z)‖².

    Starts from ``start`` inside the ball (a random start: at δ = 0 the gradient of the objective vanishes),
    then takes ``steps`` ascent steps δ ← Π(δ + α·g/‖g‖) with α = ``step_size`` (default 2.5·radius/steps, as
    Madry et al.'s L2 PGD), and keeps each sample's best iterate. Started from a random perturbation of norm
    ``radius`` (:func:`random_direction`), it moves every sample at least as far as that perturbation does:
    what it adds is what the iterations add. Returns δ, shaped like the latents (float64).
    """
    if radius <= 0 or steps < 0:
        raise ValueError(f"need radius > 0 and steps >= 0, got {radius}, {steps}")
    step_size = 2.5 * radius / max(steps, 1) if step_size is None else step_size
    latents = latents.to(torch.float64)
    with torch.no_grad():
        clean = heun_integrate(denoiser, latents, class_labels, sigmas)
    delta = _project(start.to(torch.float64), radius)
    best, best_objective = delta.clone(), torch.full((len(latents),), -1.0, dtype=torch.float64)
    for step in range(steps + 1):
        delta.requires_grad_(True)
        objective = sample_displacement(denoiser, latents, delta, class_labels, sigmas, clean)
        improved = objective.detach() > best_objective
        best[improved], best_objective[improved] = delta.detach()[improved], objective.detach()[improved]
        if step == steps:
            break
        (grad,) = torch.autograd.grad(objective.sum(), delta)
        with torch.no_grad():
            delta = _project(delta + step_size * grad / _per_sample_norm(grad).clamp_min(1e-12), radius)
    return best
