"""Adversarial training of the diffusion model: the EDM training loss plus a robustness regulariser.

What follows the paper (Briglia et al., "What is Adversarial Training for Diffusion Models?", 2025):
- AT for diffusion models asks for **equivariance** of the noise prediction, not invariance: with x
  the noised input and ω a perturbation in noise units, ε̂(x + σω) should equal ε̂(x) + ω. With
  ε̂(x) = (x − D(x))/σ that is exactly D(x + σω) = D(x): the denoised output stays put. We therefore
  penalise R = ‖D(x + σω) − D(x)‖² in the EDM denoiser parametrisation.
- Perturbations are either random (``random``, akin to randomized smoothing) or adversarial
  (``adversarial``), drawn inside a box; no model of the data corruption is assumed.
- The naive alternative, invariance of the noise prediction (``invariance``), is an ablation only:
  ε̂(x + σω) = ε̂(x), i.e. D(x + σω) = D(x) + σω. We penalise it in the same (denoiser) units as R,
  R_inv = ‖D(x + σω) − D(x) − σω‖² = σ²·‖ε̂(x + σω) − ε̂(x)‖², with random ω.

What is our reconstruction (from secondary sources; every item is a field of DiffusionATConfig):
- The loss L = w(σ)·(‖D(x) − x0‖² + λ·R) with EDM's weight w(σ) and λ = 0.3; both norms are means
  over the non-batch dimensions, so λ does not depend on the image size.
- The box radius r = g(σ)^ρ + u with g(σ) = σ/√(1 + σ²), ρ = 2, and a per-sample floor
  u ~ Uniform(8/255, 16/255) so that the radius never vanishes at low noise.
- The adversarial ω: uniform random start in [−r, r], one signed-gradient ascent step on R of size
  ``step_size``·r, projected back into the box (one FGSM step with random start, as "fast AT").
- ``detach_clean``: whether the clean branch D(x) in R is a fixed target (no gradient through it).
- ``fraction``: R on only the first share of each (shuffled) batch, scaled up so that the loss stays
  an unbiased estimate of the full-batch one. An engineering knob for small compute budgets, not
  from the paper: ``adversarial`` costs about three denoiser passes per regularised image, one
  otherwise. 1 (every image, as the paper) unless set.

The perturbed and clean branches are evaluated with the same global random state, so dropout and
label dropout agree between them and R measures the effect of ω alone.

Every draw of the loss's own generator (σ, the noise n, the radius floors, ω's start) is made for the whole
batch first (:func:`draw_training_noise`), so a batch evaluated in micro-batches (gradient accumulation)
sees the very values the whole batch would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dmat.core.edm import P_MEAN, P_STD, SIGMA_DATA, loss_weight, sample_training_sigma

MODES = ("none", "random", "adversarial", "invariance")

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class DiffusionATConfig:
    """Options of the diffusion training loss.

    mode: ``none`` (plain EDM), ``random``, ``adversarial`` (equivariance regulariser with random or
        adversarial ω) or ``invariance`` (the naive ablation, random ω).
    lam: weight λ ≥ 0 of the regulariser relative to the denoising loss.
    rho: exponent ρ > 0 of the noise-dependent part of the box radius, g(σ)^ρ.
    floor_min, floor_max: range of the random floor u added to the radius, in noise units
        (0 ≤ floor_min ≤ floor_max); the defaults are 8/255 and 16/255.
    step_size: signed-gradient step of the adversarial mode, as a fraction of the radius r (≥ 0).
    detach_clean: treat D(x) in the regulariser as a constant target.
    fraction: share of each batch, in (0, 1], that gets the regulariser (see the module docstring).
    p_mean, p_std: training noise distribution, ln σ ~ N(p_mean, p_std²) (EDM Table 1).
    sigma_data: σ_data of the loss weight; must match the denoiser's preconditioning.
    """

    mode: str = "none"
    lam: float = 0.3
    rho: float = 2.0
    floor_min: float = 8 / 255
    floor_max: float = 16 / 255
    step_size: float = 1.0
    detach_clean: bool = False
    fraction: float = 1.0
    p_mean: float = P_MEAN
    p_std: float = P_STD
    sigma_data: float = SIGMA_DATA

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.lam < 0 or self.rho <= 0 or self.step_size < 0 or self.p_std <= 0 or self.sigma_data <= 0:
            raise ValueError(f"lam, step_size must be >= 0 and rho, p_std, sigma_data > 0: {self}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.floor_min <= self.floor_max:
            raise ValueError(f"need 0 <= floor_min <= floor_max, got {self.floor_min}, {self.floor_max}")


def box_radius(sigma: Tensor, cfg: DiffusionATConfig, generator: torch.Generator | None = None,
               floor: Tensor | None = None) -> Tensor:
    """Per-sample box radius r = g(σ)^ρ + u, g(σ) = σ/√(1 + σ²), u ~ U(floor_min, floor_max).

    `floor`: the U(0, 1) draws behind u, when already drawn; otherwise drawn here from `generator`."""
    g = sigma / (1 + sigma**2).sqrt()
    if floor is None:
        floor = torch.rand(sigma.shape, generator=generator, device=sigma.device, dtype=sigma.dtype)
    return g**cfg.rho + cfg.floor_min + (cfg.floor_max - cfg.floor_min) * floor


def _uniform_in_box(radius: Tensor, unit: Tensor) -> Tensor:
    """ω uniform in [−r, r] from U(0, 1) draws `unit`."""
    return (2 * unit - 1) * radius


def _mean_square(x: Tensor) -> Tensor:
    """Per-sample mean of squares over every dimension but the first."""
    return x.square().flatten(1).mean(dim=1)


def _regulariser(perturbed: Tensor, clean: Tensor, shift: Tensor, invariance: bool) -> Tensor:
    """R = ‖D(x + σω) − D(x)‖² (equivariance), or ‖D(x + σω) − D(x) − σω‖² (invariance ablation)."""
    target = clean + shift if invariance else clean
    return _mean_square(perturbed - target)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _with_rng_state(
    state: tuple[Tensor, Tensor | None], device: torch.device, fn: Callable[[], Tensor]
) -> Tensor:
    """Run fn from a saved global random state, leaving the current state untouched afterwards."""
    cpu_state, cuda_state = state
    with torch.random.fork_rng(devices=[device] if cuda_state is not None else []):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        return fn()


def _adversarial_omega(
    perturbed: Callable[[Tensor], Tensor],
    clean: Tensor,
    radius: Tensor,
    step_size: float,
    start: Tensor,
) -> Tensor:
    """Random start in the box (from U(0, 1) draws `start`), one signed-gradient ascent step on R, projection
    onto the box.

    ``perturbed(ω)`` evaluates D(x + σω); ``clean`` is D(x), a constant here.
    """
    omega = _uniform_in_box(radius, start).requires_grad_(True)
    (grad,) = torch.autograd.grad(_mean_square(perturbed(omega) - clean).sum(), omega)
    return torch.clamp(omega.detach() + step_size * radius * grad.sign(), min=-radius, max=radius)


def regularised_count(batch_size: int, cfg: DiffusionATConfig) -> int:
    """How many samples of a batch get the regulariser: ⌈fraction·N⌉, none in mode ``none``."""
    return 0 if cfg.mode == "none" else math.ceil(cfg.fraction * batch_size)


@dataclass(frozen=True)
class TrainingNoise:
    """The generator's draws for one batch: σ (N,), the noise n (N, ...), and for the regularised samples
    (the batch's first k) the U(0, 1) draws behind the radius floors (k,) and ω's start (k, ...).

    ``regulariser_scale`` is N/k of the whole batch: a micro-batch (:meth:`rows`) keeps it, so that every
    part's loss is its share of the whole batch's.
    """

    sigma: Tensor
    noise: Tensor
    floor: Tensor
    start: Tensor
    regulariser_scale: float

    def rows(self, part: slice) -> TrainingNoise:
        """The draws of the samples in `part` (a contiguous slice of the batch); its regularised samples are
        the batch's regularised samples that fall in it, again a prefix of the part."""
        k = len(self.floor)
        regularised = slice(min(part.start, k), min(part.stop, k))
        return replace(self, sigma=self.sigma[part], noise=self.noise[part], floor=self.floor[regularised],
                       start=self.start[regularised])


def draw_training_noise(x0: Tensor, cfg: DiffusionATConfig, generator: torch.Generator | None = None
                        ) -> TrainingNoise:
    """Every draw of :func:`diffusion_training_loss` for the batch `x0`, from `generator` in this order: σ, the
    noise, the radius floors, ω's start."""
    n, k = len(x0), regularised_count(len(x0), cfg)
    sigma = sample_training_sigma(n, p_mean=cfg.p_mean, p_std=cfg.p_std, generator=generator, device=x0.device)
    sigma = sigma.to(x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if k == 0:
        floor, start = sigma[:0], noise[:0]
    else:
        floor = torch.rand((k,), generator=generator, device=x0.device, dtype=x0.dtype)
        start = torch.rand((k, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    return TrainingNoise(sigma, noise, floor, start, n / max(k, 1))


def diffusion_training_loss(
    denoiser: Denoiser,
    x0: Tensor,
    class_labels: Tensor | None,
    cfg: DiffusionATConfig,
    *,
    generator: torch.Generator | None = None,
    noise: TrainingNoise | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample training loss L = w(σ)·(‖D(x) − x0‖² + λ·R), x = x0 + σ·n (EDM Eq. 2 and 8; docs/method.md).

    ``noise``: σ, n, the radius floors and ω's start (:func:`draw_training_noise`, or a micro-batch's
    :meth:`TrainingNoise.rows` of the whole batch's); None draws them from ``generator`` here. Returns the
    loss, shape (N,), to be averaged by the caller, and detached per-sample statistics ``sigma``,
    ``denoise_loss`` (the unweighted ‖D(x) − x0‖²) and ``regulariser`` (R: zero in mode ``none``, NaN for
    the samples that ``fraction`` leaves out).
    """
    noise = draw_training_noise(x0, cfg, generator) if noise is None else noise
    sigma = noise.sigma
    sigma_b = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    x = x0 + sigma_b * noise.noise

    n, k = len(x0), len(noise.floor)
    parts = []
    if k > 0:
        labels = None if class_labels is None else class_labels[:k]
        parts.append(_regularised_pass(denoiser, x[:k], sigma_b[:k], labels, cfg, noise))
    if k < n:
        labels = None if class_labels is None else class_labels[k:]
        left_out = torch.full((n - k,), 0.0 if cfg.mode == "none" else math.nan, dtype=x0.dtype, device=x0.device)
        parts.append((denoiser(x[k:], sigma[k:], labels), left_out))
    denoise_loss = _mean_square(torch.cat([denoised for denoised, _ in parts]) - x0)
    regulariser = torch.cat([reg for _, reg in parts])

    # The regularised samples carry R scaled by N/k of the whole batch: its mean stays an unbiased estimate.
    scaled_reg = torch.nan_to_num(regulariser, nan=0.0) * noise.regulariser_scale
    loss = loss_weight(sigma, cfg.sigma_data) * (denoise_loss + cfg.lam * scaled_reg)
    stats = {"sigma": sigma, "denoise_loss": denoise_loss, "regulariser": regulariser}
    return loss, {name: value.detach() for name, value in stats.items()}


def _regularised_pass(
    denoiser: Denoiser,
    x: Tensor,
    sigma_b: Tensor,
    class_labels: Tensor | None,
    cfg: DiffusionATConfig,
    noise: TrainingNoise,
) -> tuple[Tensor, Tensor]:
    """D(x) and R for noised inputs x; both branches run from the same global random state."""
    sigma = sigma_b.flatten()
    state = _rng_state(x.device)
    clean = denoiser(x, sigma, class_labels)

    def perturbed(omega: Tensor) -> Tensor:
        def evaluate() -> Tensor:
            return denoiser(x + sigma_b * omega, sigma, class_labels)

        return _with_rng_state(state, x.device, evaluate)

    radius = box_radius(sigma, cfg, floor=noise.floor).reshape_as(sigma_b)
    if cfg.mode == "adversarial":
        omega = _adversarial_omega(perturbed, clean.detach(), radius, cfg.step_size, noise.start)
    else:
        omega = _uniform_in_box(radius, noise.start)
    target = clean.detach() if cfg.detach_clean else clean
    return clean, _regulariser(perturbed(omega), target, sigma_b * omega, cfg.mode == "invariance")
