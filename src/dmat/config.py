"""Typed, validated `params.yaml`.

Every section of params.yaml is a frozen dataclass below. Loading walks the YAML against those
dataclasses: an unknown key, a value of the wrong type or a value outside its allowed range raises
`ParamsError` with a one-line message naming the key, the bad value and what is allowed. The CLI
turns that error into exit code 2 before any stage writes anything.

Field constraints live in the field's metadata (`allowed(...)`); `Literal[...]` types give the
allowed choices; `X | None` makes a key nullable. Floats also accept fractions such as "8/255".

The file is read as YAML 1.2 (ruamel.yaml), not YAML 1.1 (PyYAML's safe_load): `dvc exp run -S`
rewrites params.yaml with ruamel's round-trip dumper, which follows 1.2 and drops the quotes around
strings such as `off`, `yes` or `no` that are plain strings in 1.2 but booleans in 1.1. Reading with
the writer's own semantics guarantees that a value DVC writes back is read back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TORCHVISION_DATASETS = ("cifar10", "cifar100", "svhn")
NAME_PATTERN = r"[a-z0-9][a-z0-9_\-]{0,31}"  # names that become parts of file and stage names


class ParamsError(ValueError):
    """A params file that cannot be used: names the key, the value and what is allowed."""


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds (None = unbounded): inclusive ``min`` and ``max``, exclusive ``above``; for
    strings, a regular expression."""

    min: float | None = None
    max: float | None = None
    pattern: str | None = None
    above: float | None = None

    def describe(self) -> str:
        if self.pattern is not None:
            return f"matching /{self.pattern}/"
        if self.above is not None:
            return f"> {_fmt(self.above)}" + ("" if self.max is None else f" and <= {_fmt(self.max)}")
        if self.min is not None and self.max is not None:
            return f"between {_fmt(self.min)} and {_fmt(self.max)}"
        if self.min is not None:
            return f">= {_fmt(self.min)}"
        if self.max is not None:
            return f"<= {_fmt(self.max)}"
        return ""

    def admits(self, value: float) -> bool:
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above))


def allowed(default: Any, doc: str = "", *, min: float | None = None, max: float | None = None,
            pattern: str | None = None, above: float | None = None, per255: bool = False):
    """A dataclass field: its default (the one place defaults live), the one-line `doc` that params.yaml shows
    beside it, and bounds checked at load time (``above``: strictly greater). ``per255``: params.yaml writes
    the value in 1/255 steps (8/255), as image-intensity radii are read."""
    if isinstance(default, list | dict):
        raise TypeError("use immutable defaults (tuples) in config dataclasses")
    return field(default=default, metadata={"bounds": Bounds(min, max, pattern, above), "doc": doc,
                                            "per255": per255})


def subsection(cls: type, doc: str = ""):
    """A nested section: its defaults are its own class's."""
    return field(default_factory=cls, metadata={"doc": doc})


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


# --------------------------------------------------------------------------------------------
# Sections. Each stage reads only its own section (plus `base`). The defaults below are the CPU default
# profile: params.yaml is rendered from them (`dmat params render`), and the profiles in profiles/ hold only
# what they change.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseConfig:
    """Settings every stage shares."""

    seed: int = allowed(0, "every random choice in the pipeline derives from it", min=0, max=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = allowed("auto", "auto | cpu | cuda")
    threads: int = allowed(0, "CPU threads for torch; 0 = torch's default", min=0, max=1024)
    experiment: str = allowed("dmat", "MLflow experiment that every stage's run goes into",
                              pattern=r"^[\w.\- /]{1,200}$")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = allowed(
        "auto", "auto | fp32 | bf16 | fp16 (CUDA only): the networks that train and generate; never evaluation. "
                "auto = the fastest in a short probe, decided once per machine (dmat precision show)")
    memory_format: Literal["auto", "contiguous", "channels_last"] = allowed(
        "auto", "auto | contiguous | channels_last; auto = the fastest in a short probe, as precision")
    compile: bool = allowed(False, "torch.compile the training networks (minutes to compile on a CPU)")
    profile: str | None = allowed(
        None, "the committed profile these params come from (set by `dmat params apply`): variant labels are the "
              "changes from it; null = params.yaml at HEAD", pattern=r"^[\w.\-]+(/[\w.\-]+)*\.ya?ml$")


@dataclass(frozen=True)
class DataConfig:
    """The `fetch` and `prepare` stages: where real data comes from and how it is split."""

    name: str = allowed("cifar10", "dataset name (picks torchvision's dataset and the normalisation constants)",
                        pattern=r"^[a-z0-9_\-]{1,64}$")
    source: Literal["auto", "imagefolder", "npz", "torchvision"] = allowed(
        "auto", "auto (data.path if it exists, else torchvision) | imagefolder | npz | torchvision")
    path: str = allowed("../shared/data/cifar10-jpeg.tar.gz",
                        "image folder or .tar/.tar.gz with train/<class>/* and test/<class>/* (the offline "
                        "CIFAR-10), or a directory with train.npz and test.npz", pattern=r"^.{1,4096}$")
    download_dir: str = allowed("data/downloads", "torchvision's files: used when there, else downloaded once "
                                                  "(checksums verified)", pattern=r"^.{1,4096}$")
    val_size: int = allowed(1024, "held out of the training images for checkpoint selection", min=0)
    train_limit: int | None = allowed(5000, "class-stratified seeded subset of the rest; null = all", min=1)
    test_limit: int | None = allowed(2000, "class-stratified seeded subset of the test split; null = all", min=1)
    test_seed: int = allowed(0, "seed of that subset and its order, not base.seed: every seed is scored on the same "
                                "points", min=0, max=2**31 - 1)
    heldout_size: int = allowed(1000, "data/real/heldout: a stratified draw of training images in neither train nor "
                                      "val (the held-out-real control); 0 = empty", min=0)
    resize: tuple[int, int] | None = allowed(None, "[height, width] to resize images of another size to; null = "
                                                   "reject them", min=1, max=4096)
    classes: tuple[str, ...] | None = allowed(None, "class names for npz files that carry none")

    def check(self) -> None:
        if self.source == "torchvision" and self.name not in TORCHVISION_DATASETS:
            raise ParamsError(
                f"data.name = {self.name!r} is not allowed with data.source = 'torchvision': "
                f"expected one of {', '.join(TORCHVISION_DATASETS)}"
            )


@dataclass(frozen=True)
class DiffusionATParams:
    """Adversarial training of the diffusion model (docs/method.md); see dmat.core.diffusion_at."""

    mode: Literal["none", "random", "adversarial", "invariance"] = allowed(
        "adversarial", "none | random | adversarial | invariance (the naive ablation)")
    lam: float = allowed(0.3, "weight λ of the regulariser", min=0)
    rho: float = allowed(2.0, "box radius r = (σ/√(1+σ²))^ρ + floor", min=0)
    floor_min: float = allowed(8 / 255, "the radius's random floor, uniform in [floor_min, floor_max]", min=0,
                               per255=True)
    floor_max: float = allowed(16 / 255, "", min=0, per255=True)
    step_size: float = allowed(1.0, "adversarial step, as a fraction of r", min=0, max=10)
    detach_clean: bool = allowed(False, "stop gradients through D(x) in the regulariser")
    fraction: float = allowed(0.25, "share of each batch regularised (unbiased; 1 = all, as the paper): 1.9x faster",
                              above=0, max=1)

    def check(self) -> None:
        if self.floor_min > self.floor_max:
            raise ParamsError(f"train_diffusion.adversarial.floor_min = {self.floor_min} is not allowed: "
                              f"expected <= floor_max ({self.floor_max})")


@dataclass(frozen=True)
class CorruptParams:
    """Corruption of a share of the diffusion model's training images (how the AT claim is tested); off."""

    fraction: float = allowed(0.0, "share of training images corrupted (fixed per image)", min=0, max=1)
    sigma: float = allowed(0.2, "std of the added Gaussian noise, in [-1, 1] image units", min=0)


@dataclass(frozen=True)
class TrainDiffusionConfig:
    """The `train_diffusion` stage: class-conditional EDM with adversarial training of the diffusion model."""

    model: str = allowed("unet-tiny", "unet-tiny (CPU) | ddpmpp-cifar (paper scale, ~56M parameters)",
                         pattern=r"^[a-z0-9\-]{1,64}$")
    steps: int = allowed(360, "optimiser steps", min=1)
    batch_size: int = allowed(32, "global batch (split across torchrun processes)", min=1)
    lr: float = allowed(0.002, "Adam's learning rate", min=0)
    warmup_steps: int = allowed(50, "linear learning-rate ramp", min=0)
    ema_half_life_images: float = allowed(5000.0, "EMA half-life in training images (EDM)", min=1)
    ema_rampup_ratio: float | None = allowed(0.05, "half-life <= ratio x images seen; null = off", min=0)
    label_dropout: float = allowed(0.1, "trains the unconditional denoiser too, for generate.guidance", min=0, max=1)
    p_mean: float = allowed(-1.2, "training noise levels ln σ ~ N(p_mean, p_std²), as EDM", min=-10, max=10)
    p_std: float = allowed(1.2, "", min=0.01, max=10)
    augment: bool = allowed(True, "horizontal flips")
    adversarial: DiffusionATParams = subsection(DiffusionATParams)
    corrupt: CorruptParams = subsection(CorruptParams)
    log_every: int = allowed(25, "steps between MLflow metric points", min=1)
    checkpoint_every: int = allowed(100, "steps between resumable checkpoints", min=1)
    grid_steps: int = allowed(18, "sampler steps of the end-of-training sample grid", min=1, max=1000)


@dataclass(frozen=True)
class GenerateConfig:
    """The `generate` stage: class-conditional samples from the EMA denoiser into data/synthetic."""

    source: Literal["sample", "external"] = allowed(
        "sample", "sample (the EMA denoiser) | external: the files `external` names, streamed into data/synthetic "
                  "(docs/published.md); then only filter_scorer and filter_keep (the share kept per class) apply")
    external: tuple[str, ...] = allowed(
        (), "external: .npz files in the reference's layout (several: the parts of one set, in order), or one image "
            "folder or DMAT store; relative to the project root", pattern=r"^.{1,4096}$")
    per_class: int = allowed(100, "images per class", min=1)
    batch_size: int = allowed(64, "images per sampler call; does not change the output", min=1)
    network_batch: int = allowed(16, "the network always sees this many images (the last chunk padded), so the output "
                                     "is byte-identical for any batch_size and process count", min=1)
    sampler: Literal["heun", "euler"] = allowed("heun", "heun (EDM Algorithm 1) | euler")
    steps: int = allowed(10, "Heun: 2·steps − 1 network evaluations per image, plus guided ones", min=1, max=1000)
    sigma_min: float = allowed(0.002, "", min=0)
    sigma_max: float = allowed(80.0, "", min=0)
    rho: float = allowed(7.0, "", min=0)
    s_churn: float = allowed(0.0, "stochastic churn (0 = deterministic)", min=0)
    s_min: float = allowed(0.0, "", min=0)
    s_max: float | None = allowed(None, "null = no upper bound", min=0)
    s_noise: float = allowed(1.0, "", min=0)
    filter_scorer: str | None = allowed(
        None, "reference (models/reference/best.pt) or a classifier checkpoint path (add it to generate's deps); "
              "null = no filter", pattern=r"^.{1,4096}$")
    filter_keep: float = allowed(1.0, "generate per_class/filter_keep candidates, keep the top share per class by the "
                                      "scorer's probability of the conditioning class", above=0, max=1)
    guidance: float = allowed(3.0, "classifier-free guidance weight (1 = none, as the paper); > 1 needs "
                                   "train_diffusion.label_dropout > 0", min=1, max=100)
    guidance_interval: tuple[float, float] | None = allowed(
        (0.28, 5.42), "σ range where guidance applies (Kynkäänniemi et al. 2024); null = every σ", min=0)
    workers: int = allowed(0, "CPU worker processes; 0 = one per core (the same images for any count); ignored on "
                              "GPUs", min=0, max=1024)

    def check(self) -> None:
        if self.sigma_min >= self.sigma_max:
            raise ParamsError(f"generate.sigma_min = {self.sigma_min} is not allowed: expected < sigma_max "
                              f"({self.sigma_max})")
        if self.guidance_interval is not None and not self.guidance_interval[0] < self.guidance_interval[1]:
            raise ParamsError(f"generate.guidance_interval = {list(self.guidance_interval)} is not allowed: expected "
                              "[low, high] with low < high")
        if self.filter_keep < 1 and self.filter_scorer is None:
            raise ParamsError(f"generate.filter_keep = {self.filter_keep} is not allowed without "
                              "generate.filter_scorer: name the classifier checkpoint that scores images")
        if self.source == "external" and not self.external:
            raise ParamsError("generate.external = [] is not allowed with generate.source = 'external': name the "
                              ".npz file(s), image folder or DMAT store to read")
        if len(self.external) > 1 and not all(path.endswith(".npz") for path in self.external):
            raise ParamsError(f"generate.external = {list(self.external)} is not allowed: several sources must be "
                              ".npz files (the parts of one set); an image folder or a DMAT store is given alone")


@dataclass(frozen=True)
class MixConfig:
    """The `mix` stage: which generated images the classifier may use, and in what share."""

    synthetic_fraction: float = allowed(0.3, "share of every training batch that is generated (paper: 0.7)", min=0,
                                        max=1)
    synthetic_limit: int | None = allowed(None, "seeded stratified draw of generated images; null = all", min=1)
    source: Literal["generated", "heldout_real"] = allowed(
        "generated", "generated (data/synthetic) | heldout_real (data/real/heldout: the real-data control)")


@dataclass(frozen=True)
class ThreatConfig:
    """The training attack and threat model."""

    norm: Literal["Linf", "L2"] = allowed("Linf", "")
    eps: float = allowed(8 / 255, "radius; the paper trains L2 at 128/255", min=0, per255=True)
    step_size: float | None = allowed(None, "null = from eps and steps, as the reference: Linf 2.5·eps/steps (2/255 "
                                            "here), L2 2·eps/steps", above=0, per255=True)
    steps: int = allowed(10, "", min=0)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` stage: adversarial training of the classifier on mixed batches (TRADES, as the paper)."""

    model: str = allowed("wrn-16-1", "dmat.core.classifiers registry", pattern=r"^[a-z0-9\-]{1,64}$")
    loss: Literal["trades", "pgd-at"] = allowed("trades", "trades | pgd-at")
    epochs: int = allowed(3, "an epoch is ceil(N_real / batch_size) steps", min=1)
    batch_size: int = allowed(64, "global batch (split across torchrun processes)", min=1)
    lr: float = allowed(0.1, "peak of the one-cycle schedule", min=0)
    warmup_fraction: float = allowed(0.025, "", min=0, max=1)
    momentum: float = allowed(0.9, "", min=0, max=1)
    nesterov: bool = allowed(True, "")
    weight_decay: float = allowed(5e-4, "not applied to BatchNorm parameters", min=0)
    beta: float = allowed(5.0, "TRADES' robustness weight", min=0)
    label_smoothing: float = allowed(0.1, "TRADES' clean CE term only; PGD-AT trains on plain CE (as the reference)",
                                     min=0, max=0.99)
    ema_tau: float = allowed(0.995, "", min=0, max=1)
    augment: bool = allowed(True, "random crop (pad 4) + horizontal flip (never for SVHN)")
    attack: ThreatConfig = subsection(ThreatConfig)
    val_attack_steps: int = allowed(40, "PGD-CW steps of checkpoint selection on data/real/val", min=1)
    val_limit: int | None = allowed(256, "first n validation images; null = all", min=1)


@dataclass(frozen=True)
class TrainReferenceConfig:
    """The `train_reference` stage: standard training on data/real/train only (the yardstick)."""

    model: str = allowed("wrn-16-1", "the smallest registry net: a few minutes on 2 cores (paper profile: wrn-28-10)",
                         pattern=r"^[a-z0-9\-]{1,64}$")
    epochs: int = allowed(15, "an epoch is ceil(N_train / batch_size) steps", min=1)
    batch_size: int = allowed(128, "", min=1)
    lr: float = allowed(0.1, "peak learning rate", min=0)
    warmup_fraction: float = allowed(0.025, "linear warm-up, then cosine decay to 0; 0 = plain cosine", min=0, max=1)
    momentum: float = allowed(0.9, "", min=0, max=1)
    nesterov: bool = allowed(True, "")
    weight_decay: float = allowed(5e-4, "not applied to BatchNorm parameters", min=0)
    label_smoothing: float = allowed(0.0, "", min=0, max=0.99)
    augment: bool = allowed(True, "random crop (pad 4) + horizontal flip")
    val_limit: int | None = allowed(None, "first n images of data/real/val for checkpoint selection (clean accuracy); "
                                          "null = all", min=1)


@dataclass(frozen=True)
class EvaluateDiffusionConfig:
    """The `evaluate_diffusion` stage: denoiser robustness; sample quality under the reference classifier.

    The perturbation box r(σ) = (σ/√(1+σ²))^radius_rho + radius_floor is this section's yardstick, not
    the box a model was trained with, so that every model (AT mode none or adversarial) is measured alike.
    """

    n_real: int = allowed(1000, "first n images of data/real/test: the real side of FD, precision and recall", min=2)
    n_generated_per_class: int = allowed(100, "stratified draw from data/synthetic, outside the mix's rows when "
                                              "enough; the control: as many images of data/real/heldout", min=1)
    n_denoiser: int = allowed(128, "first n test images for the denoiser metrics (the costly part: PGD)", min=1)
    sigmas: tuple[float, ...] = allowed((0.05, 0.2, 0.5, 1.0, 2.0), "noise levels of the denoiser metrics, [-1, 1] "
                                                                    "image units", min=0)
    attack_steps: int = allowed(5, "PGD steps of the adversarial perturbation (step 2.5·r/steps)", min=1)
    radius_rho: float = allowed(2.0, "the box's exponent ρ: the same yardstick for every model, whatever its AT mode",
                                above=0)
    radius_floor: float = allowed(12 / 255, "fixed floor (the mean of the training floor, 8/255..16/255)", min=0,
                                  per255=True)
    batch_size: int = allowed(128, "", min=1)
    knn_k: int = allowed(3, "k-NN manifolds of precision and recall (Kynkäänniemi et al. 2019)", min=1)
    memorisation_quantile: float = allowed(0.01, "threshold: this quantile of data/real/val's nearest-training-image "
                                                 "pixel distances", above=0, max=0.5)
    inception_weights: str | None = allowed(None, "local torchvision Inception-v3 state dict for FID (add it to the "
                                                  "stage's deps); null = no FID", pattern=r"^.{1,4096}$")

    def check(self) -> None:
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ParamsError(f"evaluate_diffusion.sigmas = {list(self.sigmas)} is not allowed: expected a non-empty "
                              "list of numbers > 0")
        if len({f"{s:g}" for s in self.sigmas}) != len(self.sigmas):
            raise ParamsError(f"evaluate_diffusion.sigmas = {list(self.sigmas)} is not allowed: expected distinct "
                              "values")


AUTOATTACK_ATTACKS = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"]


@dataclass(frozen=True)
class ThreatEvalConfig:
    """One threat model to evaluate: AutoAttack at `eps`, plus a cheap PGD sweep over `sweep`."""

    norm: Literal["Linf", "L2"] = allowed("Linf", "")
    eps: float = allowed(8 / 255, "", min=0, per255=True)
    sweep: tuple[float, ...] = allowed((0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255), "eps values of the PGD sweep, "
                                                                                   "rising", min=0, per255=True)
    large_eps: float = allowed(0.5, "PGD here must bring accuracy down to chance", min=0)
    RELATIVE_KEYS: typing.ClassVar[bool] = True

    def check(self) -> None:
        if list(self.sweep) != sorted(set(self.sweep)):
            raise ParamsError(f"sweep = {list(self.sweep)} is not allowed: expected distinct values, rising")
        if self.large_eps <= self.eps:
            raise ParamsError(f"large_eps = {self.large_eps} is not allowed: expected > eps ({self.eps})")


def _default_threats() -> dict[str, ThreatEvalConfig]:
    return {"linf": ThreatEvalConfig(),
            "l2": ThreatEvalConfig(norm="L2", eps=0.5, sweep=(0.0, 0.25, 0.5, 1.0), large_eps=20.0)}


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` stage: robustness of the best EMA classifier: AutoAttack + PGD sweep + sanity checks."""

    n: int | None = allowed(100, "first n test images (RobustBench's rule); null = all (paper scale)", min=1)
    batch_size: int = allowed(250, "", min=1)
    version: Literal["standard", "plus", "rand", "custom"] = allowed("standard", "AutoAttack version")
    attacks: tuple[AUTOATTACK_ATTACKS, ...] | None = allowed(None, "version custom only, in the order to run: e.g. "
                                                                   "[apgd-ce, apgd-t, fab-t, square]")
    square_queries: int = allowed(5000, "Square's query budget (AutoAttack standard: 5000)", min=1)
    pgd_steps: int = allowed(0, "extra PGD-CE and PGD-CW on the points AutoAttack left; 0 = none", min=0)
    pgd_restarts: int = allowed(1, "", min=1)
    sweep_steps: int = allowed(10, "PGD-CE steps of the eps sweep and the sanity checks", min=1)
    sweep_n: int | None = allowed(None, "first points of the sweep; null = all n", min=1)
    tolerance: float = allowed(0.01, "slack of the sanity checks (accuracy)", min=0, max=1)
    threats: dict[str, ThreatEvalConfig] = field(default_factory=_default_threats,
                                                 metadata={"doc": "one `evaluate@<name>` stage each"})

    def check(self) -> None:
        if (self.version == "custom") != (self.attacks is not None):
            raise ParamsError(f"evaluate.attacks = {_show(self.attacks)} is not allowed with evaluate.version = "
                              f"{self.version!r}: a list of attacks goes with version custom, and only with it")


@dataclass(frozen=True)
class VerifyConfig:
    """The `verify` stage: deployment-side gates on models/export (every measured value in metrics/verify.json)."""

    parity_batches: tuple[int, ...] = allowed((1, 7, 64), "clean test batch sizes compared with PyTorch", min=1)
    parity_atol: float = allowed(1e-4, "max |logit difference|, and predicted classes must be identical", min=0)
    robust_acc_tolerance: float = allowed(0.002, "onnxruntime vs PyTorch accuracy on evaluate's adversarial examples",
                                          min=0, max=1)
    square_n: int = allowed(50, "first test points attacked by Square through the onnxruntime session", min=1)
    square_queries: int = allowed(1000, "", min=1)
    square_tolerance: float = allowed(0.0, "AutoAttack acc <= Square acc <= clean acc, within this", min=0, max=1)
    latency_runs: int = allowed(50, "timed batch-1 calls (after warm-up) for p50/p95", min=1)
    latency_budget_ms: float | None = allowed(None, "onnxruntime p95 at batch 1; null = record only", min=0)
    denoiser_sigmas: tuple[float, ...] = allowed((0.05, 1.0, 20.0), "", min=0)
    denoiser_atol: float = allowed(1e-3, "max |difference| of denoised outputs ([-1, 1] image units)", min=0)
    registered_model: str = allowed("dmat-classifier", "MLflow registered model; aliases candidate and champion",
                                    pattern=r"^[A-Za-z0-9][\w.\-]{0,99}$")
    register: bool = allowed(True, "register in MLflow after every gate passes")
    champion_alpha: float = allowed(0.05, "champion moves only to a version significantly more robust on the same "
                                          "test points and attack suite (and not less accurate)", above=0, max=0.5)


@dataclass(frozen=True)
class Params:
    """The whole params.yaml: the CPU default profile (the whole pipeline on a 2-core laptop)."""

    base: BaseConfig = subsection(BaseConfig)
    data: DataConfig = subsection(DataConfig)
    train_reference: TrainReferenceConfig = subsection(TrainReferenceConfig)
    train_diffusion: TrainDiffusionConfig = subsection(TrainDiffusionConfig)
    generate: GenerateConfig = subsection(GenerateConfig)
    mix: MixConfig = subsection(MixConfig)
    train: TrainConfig = subsection(TrainConfig)
    evaluate: EvaluateConfig = subsection(EvaluateConfig)
    verify: VerifyConfig = subsection(VerifyConfig)
    evaluate_diffusion: EvaluateDiffusionConfig = subsection(EvaluateDiffusionConfig)

    def section(self, name: str) -> Any:
        return getattr(self, name)


# --------------------------------------------------------------------------------------------
# Loading and validation.
# --------------------------------------------------------------------------------------------


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ParamsError naming the first bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read params file: {err}") from None
    try:
        raw = read_yaml(text)
    except ValueError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def read_yaml(text: str) -> Any:
    """YAML 1.2 text -> plain Python data ({} for an empty document); ValueError (one line) when invalid.

    Duplicate keys are an error, not a silent "last one wins"."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as err:
        raise ValueError(" ".join(str(err).split())) from None
    return {} if data is None else data


def to_yaml(data: Any) -> str:
    """Plain data as YAML 1.2 text in block style, keys sorted (the dialect `read_yaml` reads)."""
    import io

    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping."""
    return _parse_dataclass(Params, raw, key="")


def as_dict(config: Any) -> dict[str, Any]:
    """A config object as plain YAML-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _parse_dataclass(cls: type, raw: Any, key: str) -> Any:
    where = key or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} = {_show(raw)} is not allowed: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        name = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ParamsError(f"{name} is not a known key: allowed keys {'in ' + key if key else 'are'}: "
                          f"{', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            child_key = f"{key}.{name}" if key else name
            bounds = spec.metadata.get("bounds", Bounds())
            values[name] = _parse_value(hints[name], raw[name], child_key, bounds)
    config = cls(**values)
    if hasattr(config, "check"):
        try:
            config.check()
        except ParamsError as err:
            # Sections used under several names (mapping values) name their keys relative to themselves.
            raise ParamsError(f"{key}.{err}" if getattr(cls, "RELATIVE_KEYS", False) else str(err)) from None
    return config


def _parse_value(tp: Any, value: Any, key: str, bounds: Bounds) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        if len(inner) != 1:
            raise TypeError(f"unsupported union type for {key}")
        return _parse_value(inner[0], value, key, bounds)
    if value is None:
        raise ParamsError(f"{key} = null is not allowed: expected {_expected(tp, bounds)}")
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, key)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ParamsError(f"{key} = {_show(value)} is not allowed: expected one of "
                              f"{', '.join(map(str, args))}")
        return value
    if origin is tuple:
        return _parse_tuple(args, value, key, bounds)
    if origin is dict:
        return _parse_mapping(args[1], value, key, bounds)
    return _parse_scalar(tp, value, key, bounds)


def _parse_mapping(value_type: Any, value: Any, key: str, bounds: Bounds) -> dict:
    """A mapping of names (used in file names and DVC stage names) to values of one type."""
    if not isinstance(value, dict) or not value:
        raise ParamsError(f"{key} = {_show(value)} is not allowed: expected a non-empty mapping of names to values")
    for name in value:
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise ParamsError(f"{key}.{name} is not allowed as a name: expected lowercase letters, digits, _ or -, "
                              "at most 32 characters")
    return {name: _parse_value(value_type, item, f"{key}.{name}", bounds) for name, item in value.items()}


def _parse_tuple(args: tuple, value: Any, key: str, bounds: Bounds) -> tuple:
    if not isinstance(value, list):
        raise ParamsError(f"{key} = {_show(value)} is not allowed: expected a list")
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    else:
        item_types = list(args)
        if len(value) != len(item_types):
            raise ParamsError(f"{key} = {_show(value)} is not allowed: expected a list of "
                              f"{len(item_types)} values")
    pairs = enumerate(zip(item_types, value, strict=True))
    return tuple(_parse_value(t, v, f"{key}[{i}]", bounds) for i, (t, v) in pairs)


def _parse_scalar(tp: type, value: Any, key: str, bounds: Bounds) -> Any:
    def bad() -> ParamsError:
        return ParamsError(f"{key} = {_show(value)} is not allowed: expected {_expected(tp, bounds)}")

    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif tp is float:
        value = to_float(value)
        if value is None:
            raise bad()
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
        if bounds.pattern is not None and not re.fullmatch(bounds.pattern, value):
            raise bad()
        return value
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    if not bounds.admits(value):
        raise bad()
    return value


def to_float(value: Any) -> float | None:
    """A finite float from a number or a fraction string such as "8/255"; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*", value)
        try:
            value = float(match[1]) / float(match[2]) if match else float(value)
        except (ValueError, ZeroDivisionError):
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _expected(tp: Any, bounds: Bounds) -> str:
    names = {int: "an integer", float: "a number (fractions like 8/255 are fine)", bool: "true or false",
             str: "a string"}
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    text = names.get(tp, str(tp))
    extra = bounds.describe()
    return f"{text} {extra}".strip()


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value).replace("None", "null")
    return text if len(text) <= 80 else text[:77] + "..."
