"""Typed, validated params of the known-distribution benchmark (experiments/known-distribution/params.yaml).

The benchmark is a pipeline of its own (its own dvc.yaml and params file), so it has its own schema; it is
read, validated and reported exactly as `params.yaml` is (`dmat.config`): an unknown key or a value out of
bounds stops a stage with exit code 2 and a message naming the key. The diffusion-AT settings are the image
pipeline's own section type (`DiffusionATParams`), so both pipelines configure the one method alike.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from dmat.config import DiffusionATParams, ParamsError, allowed

PIPELINE_DIR = "experiments/known-distribution"  # relative to the project root; DVC runs the stages here
DISTRIBUTIONS = ("ring", "grid", "patterns")


@dataclass(frozen=True)
class KnownDistributionBase:
    """Settings every stage of the benchmark shares."""

    seed: int = allowed(0, min=0, max=2**31 - 1)  # training: data draw, initialisation, batches, noise
    device: Literal["cpu"] = "cpu"  # small networks: the benchmark runs on CPU cores
    threads: int = allowed(1, min=0, max=1024)  # torch CPU threads; 0 = torch's default
    experiment: str = allowed("known-distribution", pattern=r"^[\w.\- /]{1,200}$")  # MLflow experiment
    # The committed params file the variant labels are the changes from (this file names itself)
    profile: str | None = allowed(None, pattern=r"^[\w.\-]+(/[\w.\-]+)*\.ya?ml$")


@dataclass(frozen=True)
class TruthConfig:
    """One ground truth, a Gaussian mixture (dmat.core.known_distribution), and the denoiser that learns it."""

    distribution: Literal["ring", "grid", "patterns"] = "ring"
    modes: int = allowed(8, min=1, max=4096)  # ring, patterns: number of modes; grid: modes per side
    classes: int = allowed(1, min=1, max=4096)  # mode k belongs to class k mod classes (1 = unconditional)
    scale: float = allowed(0.8, above=0)  # ring: radius; grid: half-width; patterns: grating amplitude
    std: float = allowed(0.05, above=0)  # component standard deviation (patterns: its mean over pixels)
    side: int | None = allowed(None, min=2, max=64)  # patterns only: image side, D = side²
    model: str = allowed("mlp-2d", pattern=r"^[a-z0-9\-]{1,64}$")  # dmat.core.denoisers registry
    RELATIVE_KEYS: typing.ClassVar[bool] = True

    def check(self) -> None:
        if (self.distribution == "patterns") != (self.side is not None):
            raise ParamsError(f"side = {self.side} is not allowed with distribution {self.distribution!r}: "
                              "patterns need an image side, the 2-D distributions none")
        modes = self.modes**2 if self.distribution == "grid" else self.modes
        if self.classes > modes:
            raise ParamsError(f"classes = {self.classes} is not allowed: expected <= the number of modes ({modes})")


@dataclass(frozen=True)
class KnownDataConfig:
    """The training set each model learns from: n true points, then one knob per condition."""

    n: int = allowed(4096, min=2)  # training points (the small-n condition lowers it)
    corrupt_fraction: float = allowed(0.0, min=0, max=1)  # share of points with added Gaussian noise
    corrupt_sigma: float = allowed(0.3, min=0)  # its standard deviation, in data units
    outlier_fraction: float = allowed(0.0, min=0, max=1)  # share of points replaced by outliers
    # outliers lie at a radius uniform in [low, high] × the truth's extent (max ‖μ_k‖ + 3‖s_k‖): far from every mode
    outlier_radii: tuple[float, float] = allowed((1.5, 3.0), min=1)

    def check(self) -> None:
        if self.outlier_radii[0] > self.outlier_radii[1]:
            raise ParamsError(f"data.outlier_radii = {list(self.outlier_radii)} is not allowed: expected [low, high] "
                              "with low <= high")


@dataclass(frozen=True)
class KnownTrainConfig:
    """Training of the denoiser: EDM's loss and diffusion AT (dmat.core.diffusion_at), Adam, cosine decay to 0."""

    steps: int = allowed(1000, min=1)
    batch_size: int = allowed(256, min=1)
    lr: float = allowed(2e-3, above=0)  # peak Adam learning rate, decayed to 0 on a cosine
    p_mean: float = allowed(-1.2, min=-10, max=10)  # training noise levels, ln σ ~ N(p_mean, p_std²)
    p_std: float = allowed(1.2, min=0.01, max=10)
    adversarial: DiffusionATParams = field(default_factory=DiffusionATParams)
    log_every: int = allowed(100, min=1)  # steps between MLflow metric points


@dataclass(frozen=True)
class KnownEvaluateConfig:
    """The exact measures (dmat.core.exact_measures). Every draw comes from `seed`, not base.seed: every run is
    scored on the same points, latents and true samples, whatever its training seed."""

    seed: int = allowed(20260, min=0, max=2**31 - 1)
    sigmas: tuple[float, ...] = allowed((0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0), above=0)
    n_denoiser: int = allowed(2000, min=1)  # noised points per noise level of the error curve
    n_weighted: int = allowed(8192, min=1)  # draws of the EDM-weighted error
    n_samples: int = allowed(2000, min=2)  # samples from the model (and true samples for the floors)
    sampler_steps: int = allowed(18, min=1, max=1000)  # Heun steps (NFE = 2·steps − 1)
    sigma_min: float = allowed(0.002, above=0)
    sigma_max: float = allowed(80.0, above=0)
    rho: float = allowed(7.0, above=0)
    projections: int = allowed(256, min=1)  # random directions of the sliced Wasserstein distance
    memorisation_quantile: float = allowed(0.01, above=0, max=0.5)  # of fresh true samples' training-set distances
    attack_n: int = allowed(128, min=1)  # first samples whose starting noise is attacked
    attack_eps: float = allowed(0.05, above=0)  # L2 radius per coordinate of the latent: ‖δ‖ <= eps·√D
    attack_steps: int = allowed(10, min=1)

    def check(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ParamsError(f"evaluate.sigma_min = {self.sigma_min} is not allowed: expected < sigma_max "
                              f"({self.sigma_max})")
        if self.attack_n > self.n_samples:
            raise ParamsError(f"evaluate.attack_n = {self.attack_n} is not allowed: expected <= n_samples "
                              f"({self.n_samples})")


@dataclass(frozen=True)
class KnownDistributionParams:
    """The whole experiments/known-distribution/params.yaml."""

    PARAMS_FILE: typing.ClassVar[str] = f"{PIPELINE_DIR}/params.yaml"  # relative to the project root
    DVC_FILE: typing.ClassVar[str] = f"{PIPELINE_DIR}/dvc.yaml"
    GRID_REPORT: typing.ClassVar[str] = "dmat known-distribution report --grid"

    base: KnownDistributionBase = field(default_factory=KnownDistributionBase)
    truths: dict[str, TruthConfig] = field(default_factory=lambda: {"ring": TruthConfig()})
    data: KnownDataConfig = field(default_factory=KnownDataConfig)
    train: KnownTrainConfig = field(default_factory=KnownTrainConfig)
    evaluate: KnownEvaluateConfig = field(default_factory=KnownEvaluateConfig)

    def section(self, name: str) -> typing.Any:
        return getattr(self, name)

    def truth(self, name: str) -> TruthConfig:
        """The truth `name` of `truths`; a ParamsError naming the ones there are otherwise."""
        if name not in self.truths:
            raise ParamsError(f"truths.{name} does not exist: expected one of {', '.join(self.truths)}")
        return self.truths[name]
