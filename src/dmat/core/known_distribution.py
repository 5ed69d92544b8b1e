"""Ground truths with closed forms: Gaussian mixtures, their Bayes-optimal denoiser, and training sets drawn
from them under the conditions the diffusion-AT claims are about (clean, corrupted, with outliers, small).

A mixture p(x0) = Σ_k π_k N(x0; μ_k, diag(s_k²)) over points of any shape (flattened to D coordinates inside)
has, at every noise level σ, a closed-form density of the noised data x = x0 + σ·n, n ~ N(0, I),

    p_σ(x) = Σ_k π_k N(x; μ_k, diag(s_k² + σ²)),

and a closed-form Bayes-optimal (minimum mean-squared error) denoiser, the posterior mean

    D*(x; σ) = E[x0 | x] = Σ_k r_k(x; σ) · (μ_k + s_k² / (s_k² + σ²) ⊙ (x − μ_k)),
    r_k(x; σ) = π_k N(x; μ_k, diag(s_k² + σ²)) / Σ_j π_j N(x; μ_j, diag(s_j² + σ²)).

Derivation: given the component k, x0 and x are jointly Gaussian, so E[x0 | x, k] is the Gaussian
conditional mean μ_k + s_k²(s_k² + σ²)⁻¹(x − μ_k) (Bishop, "Pattern Recognition and Machine Learning", 2006,
Eq. 2.113-2.117, "Bayes' theorem for Gaussian variables", coordinate by coordinate since the covariances are
diagonal), and the law of total expectation over the component posterior r_k (the responsibilities, Bishop
Eq. 9.13, evaluated on the σ-blurred components) gives D*. It satisfies Tweedie's formula
D*(x; σ) = x + σ²∇ log p_σ(x), which the tests check. Conditioned on a class y, the sums run over the
components of class y only.

Every component belongs to one class (``component_class``), so the same mixture serves class-conditional
models (class = group of modes) and unconditional ones (one class). All arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of Gaussians with diagonal covariances over points of shape ``shape``.

    means, stds: (K, D) float64, the component means μ_k and standard deviations s_k (> 0), D = prod(shape);
    weights: (K,) mixture weights π_k (positive, summing to 1); component_class: (K,) int64 class of each
    component, every class in 0..C−1 owning at least one component.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor
    component_class: Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.stds.shape != (k, d) or self.weights.shape != (k,) or self.component_class.shape != (k,):
            raise ValueError("means and stds must be (K, D), weights and component_class (K,)")
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold D = {d} coordinates")
        if not (self.stds > 0).all() or not (self.weights > 0).all():
            raise ValueError("component standard deviations and weights must be positive")
        if not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must sum to 1, got {float(self.weights.sum())}")
        classes = self.component_class.unique()
        if classes.tolist() != list(range(len(classes))):
            raise ValueError("component classes must be 0..C-1, each with at least one component")

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.component_class.max()) + 1

    def class_weights(self) -> Tensor:
        """P(y) for every class: the summed weights of its components, (C,)."""
        return torch.zeros(self.num_classes, dtype=torch.float64).index_add_(0, self.component_class, self.weights)

    def extent(self) -> float:
        """A radius around the origin that holds practically all the mass: max_k ‖μ_k‖ + 3‖s_k‖."""
        return float((self.means.norm(dim=1) + 3 * self.stds.norm(dim=1)).max())

    def sample(self, n: int, generator: torch.Generator,
               class_labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """n points (float32, shape (n, *shape)), their classes and their components.

        Without ``class_labels`` the components are drawn by weight; with them, each point's component is
        drawn among its class's components in proportion to their weights.
        """
        if class_labels is None:
            components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            allowed = self.component_class[None, :] == class_labels[:, None]
            if len(class_labels) != n:
                raise ValueError(f"{len(class_labels)} class labels for {n} points")
            probs = torch.where(allowed, self.weights[None, :], torch.zeros((), dtype=torch.float64))
            components = torch.multinomial(probs, 1, generator=generator)[:, 0]
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x0 = self.means[components] + self.stds[components] * noise
        return x0.to(torch.float32).reshape(n, *self.shape), self.component_class[components], components

    def draw_labels(self, n: int, generator: torch.Generator) -> Tensor:
        """n classes drawn from P(y)."""
        return torch.multinomial(self.class_weights(), n, replacement=True, generator=generator)

    def component_log_likelihood(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log N(x; μ_k, diag(s_k² + σ²)) for every point and component, (n, K); σ a number or one per point."""
        flat = _flat(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = self.stds[None] ** 2 + sigma**2  # (n or 1, K, D)
        squared = (flat[:, None, :] - self.means[None]) ** 2 / var
        return -0.5 * (squared + var.log() + LOG_2PI).sum(dim=2)

    def _log_joint(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None) -> Tensor:
        """log π_k + log N(x; μ_k, s_k² + σ²), −∞ for components outside each point's class, (n, K)."""
        log_joint = self.weights.log()[None] + self.component_log_likelihood(x, sigma)
        if class_labels is None:
            return log_joint
        outside = self.component_class[None, :] != class_labels.reshape(-1, 1)
        return log_joint.masked_fill(outside, -math.inf)

    def log_prob(self, x: Tensor, class_labels: Tensor | None = None, sigma: Tensor | float = 0.0) -> Tensor:
        """log p_σ(x), or log p_σ(x | y) with ``class_labels``, per point (n,), float64."""
        log_p = self._log_joint(x, sigma, class_labels).logsumexp(dim=1)
        if class_labels is None:
            return log_p
        return log_p - self.class_weights().log()[class_labels]

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0,
                         class_labels: Tensor | None = None) -> Tensor:
        """Posterior over the components given the noised point, r_k(x; σ), (n, K)."""
        return self._log_joint(x, sigma, class_labels).softmax(dim=1)

    def nearest_component(self, x: Tensor) -> Tensor:
        """The component each point most probably came from, arg max_k π_k N(x; μ_k, s_k²), (n,)."""
        return self._log_joint(x, 0.0, None).argmax(dim=1)

    def denoise(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """The Bayes-optimal denoiser D*(x; σ) = E[x0 | x0 + σ·n = x] (module docstring), shaped and typed like x.

        Signature of a DMAT denoiser (x, sigma, class_labels), so samplers run it as they run a network.
        """
        flat = _flat(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        r = self.responsibilities(x, sigma, class_labels)  # (n, K)
        shrink = self.stds[None] ** 2 / (self.stds[None] ** 2 + sigma**2)  # (n or 1, K, D)
        posterior_means = self.means[None] + shrink * (flat[:, None, :] - self.means[None])
        return (r[..., None] * posterior_means).sum(dim=1).reshape(x.shape).to(x.dtype)


def log_density_grid(truth: GaussianMixture, limit: float, points: int = 200) -> tuple[Tensor, Tensor]:
    """A 2-D truth's log-density on a square mesh over [−limit, limit]²: (ticks (points,), log p (points, points))
    with log p[i, j] at x = ticks[j], y = ticks[i] (rows: y), as contour plots take it."""
    if truth.dim != 2:
        raise ValueError(f"a density mesh needs a 2-D truth, this one has D = {truth.dim}")
    ticks = torch.linspace(-limit, limit, points, dtype=torch.float64)
    mesh = torch.cartesian_prod(ticks, ticks)[:, [1, 0]]  # (y, x) pairs, y major -> (x, y) points
    return ticks, truth.log_prob(mesh).reshape(points, points)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _alternating_classes(k: int, classes: int) -> Tensor:
    if not 1 <= classes <= k:
        raise ValueError(f"classes must be between 1 and the number of modes ({k}), got {classes}")
    return torch.arange(k) % classes


def ring(modes: int = 8, radius: float = 0.8, std: float = 0.05, classes: int = 1) -> GaussianMixture:
    """``modes`` equally weighted isotropic 2-D Gaussians on a circle; mode k has class k mod ``classes``."""
    angles = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, torch.full_like(means, std), torch.full((modes,), 1 / modes, dtype=torch.float64),
                           _alternating_classes(modes, classes), (2,))


def grid(side: int = 5, half_width: float = 0.8, std: float = 0.04, classes: int = 1) -> GaussianMixture:
    """side × side equally weighted isotropic 2-D Gaussians on a square grid spanning [−half_width, half_width]²."""
    ticks = torch.linspace(-half_width, half_width, side, dtype=torch.float64)
    means = torch.cartesian_prod(ticks, ticks)
    k = side * side
    return GaussianMixture(means, torch.full_like(means, std), torch.full((k,), 1 / k, dtype=torch.float64),
                           _alternating_classes(k, classes), (2,))


def patterns(side: int = 8, modes: int = 8, amplitude: float = 0.6, std: float = 0.08,
             classes: int = 1) -> GaussianMixture:
    """``modes`` equally weighted Gaussians over side × side one-channel images (D = side²).

    Mode k's mean is a grating amplitude·cos(2π f_k (i cos θ_k + j sin θ_k) / side) with θ_k = πk/modes and
    f_k alternating between 1 and 2 cycles per image; its per-pixel standard deviation varies over the
    pixels between 0.5 and 1.5 times ``std`` (a diagonal, not isotropic, covariance). Deterministic: the
    same truth for every seed.
    """
    d = side * side
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    means, stds = [], []
    for k in range(modes):
        theta, frequency = math.pi * k / modes, 1 + k % 2
        phase = 2 * math.pi * frequency * (rows * math.cos(theta) + cols * math.sin(theta)) / side
        means.append(amplitude * phase.cos().flatten())
        stds.append(std * (0.5 + ((torch.arange(d) + 3 * k) % d) / d).to(torch.float64))
    return GaussianMixture(torch.stack(means), torch.stack(stds), torch.full((modes,), 1 / modes, dtype=torch.float64),
                           _alternating_classes(modes, classes), (1, side, side))


# --- Training-data conditions: one knob each ------------------------------------------------------------------

def corrupt(x: Tensor, fraction: float, sigma: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A seeded choice of ``fraction`` of the points gets additive Gaussian noise of standard deviation ``sigma``
    (the image pipeline's ``train_diffusion.corrupt``, on points). Returns the points and which were corrupted."""
    if not 0 <= fraction <= 1 or sigma < 0:
        raise ValueError(f"need 0 <= fraction <= 1 and sigma >= 0, got {fraction}, {sigma}")
    chosen = torch.rand(len(x), generator=generator) < fraction
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    mask = chosen.reshape(-1, *[1] * (x.ndim - 1))
    return torch.where(mask, x + sigma * noise, x), chosen


def replace_with_outliers(x: Tensor, labels: Tensor, truth: GaussianMixture, fraction: float,
                          generator: torch.Generator,
                          radii: tuple[float, float] = (1.5, 3.0)) -> tuple[Tensor, Tensor, Tensor]:
    """Replace a seeded choice of ``fraction`` of the points by outliers: uniformly random directions at a
    radius uniform in [radii[0], radii[1]] × the truth's extent (far from every mode), with random classes.
    Returns the points, their labels and which were replaced."""
    if not 0 <= fraction <= 1 or not 1 <= radii[0] <= radii[1]:
        raise ValueError(f"need 0 <= fraction <= 1 and 1 <= radii[0] <= radii[1], got {fraction}, {radii}")
    chosen = torch.rand(len(x), generator=generator) < fraction
    directions = torch.randn(len(x), truth.dim, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    low, high = (r * truth.extent() for r in radii)
    radius = low + (high - low) * torch.rand(len(x), 1, generator=generator, dtype=torch.float64)
    outliers = (directions * radius).to(x.dtype).reshape(x.shape)
    random_labels = torch.randint(0, truth.num_classes, (len(x),), generator=generator)
    mask = chosen.reshape(-1, *[1] * (x.ndim - 1))
    return torch.where(mask, outliers, x), torch.where(chosen, random_labels, labels), chosen
