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


def allowed(default: Any, *, min: float | None = None, max: float | None = None, pattern: str | None = None,
            above: float | None = None):
    """A dataclass field with a default and bounds checked at load time (``above``: strictly greater)."""
    if isinstance(default, list | dict):
        raise TypeError("use immutable defaults (tuples) in config dataclasses")
    return field(default=default, metadata={"bounds": Bounds(min, max, pattern, above)})


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


# --------------------------------------------------------------------------------------------
# Sections. Each stage reads only its own section (plus `base`).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseConfig:
    """Settings every stage shares."""

    seed: int = allowed(0, min=0, max=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = allowed(0, min=0, max=1024)  # 0 = let torch decide
    experiment: str = allowed("dmat", pattern=r"^[\w.\- /]{1,200}$")  # MLflow experiment name
    # Numerics of the networks that train and generate (train, train_diffusion, generate; never evaluation):
    # auto = measured at stage start, see dmat.core.precision. fp16 needs CUDA.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    compile: bool = False  # torch.compile the training networks (train, train_diffusion)
    # Processes for the stages that run under torchrun (train_reference, train_diffusion, generate, train,
    # evaluate): above 1, `dmat <stage>` starts torchrun itself; 0 = one per visible GPU (1 without GPUs).
    nproc: int = allowed(1, min=0, max=1024)
    # The committed profile these params start from (e.g. profiles/cpu-experiment.yaml): every run's `dmat.variant`
    # label is what differs from that file at HEAD. null = HEAD's params.yaml.
    profile: str | None = allowed(None, pattern=r"^[\w.\-]+(/[\w.\-]+)*\.ya?ml$")


@dataclass(frozen=True)
class DataConfig:
    """The `prepare` stage: where real data comes from and how it is split."""

    # Dataset name: picks the torchvision dataset and the classifier's normalisation constants.
    name: str = allowed("cifar10", pattern=r"^[a-z0-9_\-]{1,64}$")
    # auto: data.path when it exists (as imagefolder), else torchvision's files in data.download_dir.
    source: Literal["auto", "imagefolder", "npz", "torchvision"] = "auto"
    # imagefolder: a directory or .tar/.tar.gz with train/<class>/* and test/<class>/*;
    # npz: a directory with train.npz and test.npz.
    path: str = allowed("../shared/data/cifar10-jpeg.tar.gz", pattern=r"^.{1,4096}$")
    # torchvision (and auto's fallback): its files are used when there, else downloaded there once.
    download_dir: str = allowed("data/downloads", pattern=r"^.{1,4096}$")
    val_size: int = allowed(1024, min=0)  # held out of the training images before any subsetting
    train_limit: int | None = allowed(None, min=1)  # class-stratified seeded subset; null = all
    test_limit: int | None = allowed(None, min=1)
    # data/real/heldout: a class-stratified seeded draw of training images in neither train nor val (the
    # held-out-real control: what a perfect generator would score); 0 = an empty store
    heldout_size: int = allowed(0, min=0)
    resize: tuple[int, int] | None = allowed(None, min=1, max=4096)  # [height, width]; null = reject other sizes
    classes: tuple[str, ...] | None = None  # class names for npz files that carry none

    def check(self) -> None:
        if self.source == "torchvision" and self.name not in TORCHVISION_DATASETS:
            raise ParamsError(
                f"data.name = {self.name!r} is not allowed with data.source = 'torchvision': "
                f"expected one of {', '.join(TORCHVISION_DATASETS)}"
            )


@dataclass(frozen=True)
class DiffusionATParams:
    """Adversarial training of the diffusion model (DESIGN.md §5); see dmat.core.diffusion_at."""

    mode: Literal["none", "random", "adversarial", "invariance"] = "none"
    lam: float = allowed(0.3, min=0)  # weight λ of the regulariser
    rho: float = allowed(2.0, min=0)  # radius exponent: r = g(σ)^ρ + floor
    floor_min: float = allowed(8 / 255, min=0)  # random floor of the radius, uniform in [min, max]
    floor_max: float = allowed(16 / 255, min=0)
    step_size: float = allowed(1.0, min=0, max=10)  # adversarial step, as a fraction of the radius
    detach_clean: bool = False  # stop gradients through D(x) in the regulariser
    fraction: float = allowed(1.0, above=0, max=1)  # share of each batch regularised (1 = all, as the paper)

    def check(self) -> None:
        if self.floor_min > self.floor_max:
            raise ParamsError(f"train_diffusion.adversarial.floor_min = {self.floor_min} is not allowed: "
                              f"expected <= floor_max ({self.floor_max})")


@dataclass(frozen=True)
class CorruptParams:
    """Optional corruption of the diffusion model's training images (how the AT claim is tested)."""

    fraction: float = allowed(0.0, min=0, max=1)  # share of training images corrupted (fixed per image)
    sigma: float = allowed(0.2, min=0)  # std of the added Gaussian noise, in [-1, 1] image units


@dataclass(frozen=True)
class TrainDiffusionConfig:
    """The `train_diffusion` stage: class-conditional EDM on data/real/train."""

    model: str = allowed("unet-tiny", pattern=r"^[a-z0-9\-]{1,64}$")  # dmat.core.denoisers registry
    steps: int = allowed(2000, min=1)  # optimiser steps
    batch_size: int = allowed(64, min=1)  # global batch (split across torchrun processes)
    # Images per forward/backward on one process; each process's share of batch_size is split into
    # ceil(share / micro_batch) micro-batches whose gradients add up before one optimiser step. null = the whole share.
    micro_batch: int | None = allowed(None, min=1)
    lr: float = allowed(1e-3, min=0)  # Adam learning rate
    warmup_steps: int = allowed(100, min=0)  # linear learning-rate ramp
    ema_half_life_images: float = allowed(20000, min=1)  # EMA half-life in training images (EDM)
    ema_rampup_ratio: float | None = allowed(0.05, min=0)  # half-life <= ratio × images seen; null = off
    label_dropout: float = allowed(0.0, min=0, max=1)  # for classifier-free / unconditional use
    # Training noise levels, ln σ ~ N(p_mean, p_std²): EDM's -1.2 and 1.2 by default.
    p_mean: float = allowed(-1.2, min=-10, max=10)
    p_std: float = allowed(1.2, min=0.01, max=10)
    augment: bool = False  # horizontal flips of the training images
    adversarial: DiffusionATParams = field(default_factory=DiffusionATParams)
    corrupt: CorruptParams = field(default_factory=CorruptParams)
    log_every: int = allowed(50, min=1)  # steps between MLflow metric points
    checkpoint_every: int = allowed(250, min=1)  # steps between resumable checkpoints
    grid_steps: int = allowed(18, min=1, max=1000)  # sampler steps for the end-of-training sample grid


@dataclass(frozen=True)
class GenerateConfig:
    """The `generate` stage: class-conditional samples from the EMA denoiser into data/synthetic."""

    per_class: int = allowed(500, min=1)
    batch_size: int = allowed(128, min=1)  # images per sampler call; does not change the output
    # The network always sees exactly this many images (the last chunk padded), so the output is
    # byte-identical for any batch_size and process count. Small on CPU (it is also faster there);
    # larger on GPUs. Changing it may change the images in their last bits.
    network_batch: int = allowed(16, min=1)
    sampler: Literal["heun", "euler"] = "heun"
    steps: int = allowed(18, min=1, max=1000)  # Heun: NFE = 2·steps − 1
    sigma_min: float = allowed(0.002, min=0)
    sigma_max: float = allowed(80.0, min=0)
    rho: float = allowed(7.0, min=0)
    s_churn: float = allowed(0.0, min=0)  # stochastic churn (0 = deterministic)
    s_min: float = allowed(0.0, min=0)
    s_max: float | None = allowed(None, min=0)  # null = no upper bound
    s_noise: float = allowed(1.0, min=0)
    # Scores the candidates when filter_keep < 1: "reference" (models/reference/best.pt, the standard classifier
    # of train_reference, as Wang et al.'s select_1M) or the path of another DMAT classifier checkpoint (a
    # robust one is accepted when named; add the file to generate's deps in dvc.yaml)
    filter_scorer: str | None = allowed(None, pattern=r"^.{1,4096}$")
    filter_keep: float = allowed(1.0, above=0, max=1)  # top share kept per class, by the conditioning class's prob.
    # Classifier-free guidance weight w (1 = none, as the paper); > 1 needs a denoiser trained with
    # train_diffusion.label_dropout > 0. Applied for σ in (guidance_interval[0], guidance_interval[1]].
    guidance: float = allowed(1.0, min=1, max=100)
    guidance_interval: tuple[float, float] | None = allowed(None, min=0)  # [σ_lo, σ_hi]; null = every σ
    # CPU processes sharing the work when not under torchrun (one thread each, so the store is the
    # same for any count); 0 = one per available core. Ignored on GPUs.
    workers: int = allowed(0, min=0, max=1024)

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


@dataclass(frozen=True)
class MixConfig:
    """The `mix` stage: which generated images the classifier may use, and in what share."""

    synthetic_fraction: float = allowed(0.5, min=0, max=1)  # share of every batch that is generated
    synthetic_limit: int | None = allowed(None, min=1)  # seeded random draw of generated images; null = all
    # The store that supplies the "synthetic" share: generated (data/synthetic) or heldout_real
    # (data/real/heldout, the held-out-real control: real images the pipeline did not train on)
    source: Literal["generated", "heldout_real"] = "generated"


@dataclass(frozen=True)
class ThreatConfig:
    """A threat model and the PGD attack used against it."""

    norm: Literal["Linf", "L2"] = "Linf"
    eps: float = allowed(8 / 255, min=0)
    # null = derived from eps and steps as the reference does (dmat.core.attacks.default_step_size):
    # Linf 2.5·eps/steps (2/255 at 8/255, 10 steps), L2 2·eps/steps (its L2 solver's learning rate)
    step_size: float | None = allowed(None, above=0)
    steps: int = allowed(10, min=0)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` stage: adversarial training of the classifier on mixed batches (DESIGN.md §4)."""

    model: str = allowed("wrn-16-1", pattern=r"^[a-z0-9\-]{1,64}$")  # dmat.core.classifiers registry
    loss: Literal["trades", "pgd-at"] = "trades"
    epochs: int = allowed(10, min=1)  # an epoch is ceil(N_real / batch_size) steps
    batch_size: int = allowed(128, min=1)  # global batch (split across torchrun processes)
    # Images per forward/backward on one process; each process's share of batch_size is split into
    # ceil(share / micro_batch) micro-batches whose gradients add up before one optimiser step. null = the whole share.
    micro_batch: int | None = allowed(None, min=1)
    lr: float = allowed(0.2, min=0)  # peak of the one-cycle schedule
    warmup_fraction: float = allowed(0.025, min=0, max=1)
    momentum: float = allowed(0.9, min=0, max=1)
    nesterov: bool = True
    weight_decay: float = allowed(5e-4, min=0)  # not applied to BatchNorm parameters
    beta: float = allowed(5.0, min=0)  # TRADES robustness weight
    label_smoothing: float = allowed(0.1, min=0, max=0.99)  # TRADES' clean CE term only (PGD-AT: plain CE)
    ema_tau: float = allowed(0.995, min=0, max=1)
    augment: bool = True  # crop + flip (never for SVHN)
    attack: ThreatConfig = field(default_factory=ThreatConfig)
    val_attack_steps: int = allowed(40, min=1)  # PGD-CW steps for checkpoint selection on data/real/val
    val_limit: int | None = allowed(None, min=1)  # first n validation images; null = all


@dataclass(frozen=True)
class TrainReferenceConfig:
    """The `train_reference` stage: standard (non-adversarial) training of a classifier on data/real/train only.

    The fixed yardstick of generated data (evaluate_diffusion) and the scorer of generate's filter: it never
    sees generated data and does not depend on the diffusion model, so every diffusion variant shares it.
    """

    model: str = allowed("wrn-16-1", pattern=r"^[a-z0-9\-]{1,64}$")  # dmat.core.classifiers registry
    epochs: int = allowed(15, min=1)
    batch_size: int = allowed(128, min=1)  # global batch (split across torchrun processes)
    # Images per forward/backward on one process; each process's share of batch_size is split into
    # ceil(share / micro_batch) micro-batches whose gradients add up before one optimiser step. null = the whole share.
    micro_batch: int | None = allowed(None, min=1)
    lr: float = allowed(0.1, min=0)  # peak learning rate
    warmup_fraction: float = allowed(0.025, min=0, max=1)  # linear warm-up, then cosine decay; 0 = plain cosine
    momentum: float = allowed(0.9, min=0, max=1)
    nesterov: bool = True
    weight_decay: float = allowed(5e-4, min=0)  # not applied to BatchNorm parameters
    label_smoothing: float = allowed(0.0, min=0, max=0.99)
    augment: bool = True  # crop + flip (never for SVHN)
    val_limit: int | None = allowed(None, min=1)  # first n validation images for checkpoint selection; null = all


@dataclass(frozen=True)
class EvaluateDiffusionConfig:
    """The `evaluate_diffusion` stage: denoiser robustness and sample quality of the diffusion model.

    The perturbation box r(σ) = (σ/√(1+σ²))^radius_rho + radius_floor is this section's yardstick, not
    the box a model was trained with, so that every model (AT mode none or adversarial) is measured alike.
    """

    n_real: int = allowed(1000, min=2)  # first n images of data/real/test: the real side of FD, precision, recall
    # seeded stratified draw from data/synthetic, outside the mix's rows when there are enough; the control
    # is as many images of data/real/heldout
    n_generated_per_class: int = allowed(100, min=1)
    n_denoiser: int = allowed(128, min=1)  # first n images of data/real/test for the denoiser metrics
    sigmas: tuple[float, ...] = allowed((0.05, 0.2, 0.5, 1.0, 2.0), min=0)  # noise levels, [-1, 1] image units
    attack_steps: int = allowed(5, min=1)  # signed-gradient (PGD) steps of the adversarial perturbation
    radius_rho: float = allowed(2.0, above=0)  # exponent ρ of the box radius
    radius_floor: float = allowed(12 / 255, min=0)  # fixed floor of the box radius, in noise units
    batch_size: int = allowed(128, min=1)
    knn_k: int = allowed(3, min=1)  # k of the k-NN manifolds of precision and recall (Kynkäänniemi et al. 2019)
    # memorisation threshold: this quantile of data/real/val's nearest-training-image pixel distances
    memorisation_quantile: float = allowed(0.01, above=0, max=0.5)
    inception_weights: str | None = allowed(None, pattern=r"^.{1,4096}$")  # local torchvision Inception-v3 file

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

    norm: Literal["Linf", "L2"] = "Linf"
    eps: float = allowed(8 / 255, min=0)
    sweep: tuple[float, ...] = allowed((0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255), min=0)  # eps values, rising
    large_eps: float = allowed(0.5, min=0)  # the "falls to chance" sanity check runs PGD here
    RELATIVE_KEYS: typing.ClassVar[bool] = True

    def check(self) -> None:
        if list(self.sweep) != sorted(set(self.sweep)):
            raise ParamsError(f"sweep = {list(self.sweep)} is not allowed: expected distinct values, rising")
        if self.large_eps <= self.eps:
            raise ParamsError(f"large_eps = {self.large_eps} is not allowed: expected > eps ({self.eps})")


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` stage: robustness of the best EMA classifier on the first n test images."""

    n: int | None = allowed(None, min=1)  # first n points of data/real/test (RobustBench's rule); null = all
    batch_size: int = allowed(250, min=1)
    version: Literal["standard", "plus", "rand", "custom"] = "standard"  # AutoAttack version
    attacks: tuple[AUTOATTACK_ATTACKS, ...] | None = None  # version custom only, in the order to run
    square_queries: int = allowed(5000, min=1)  # Square's query budget (AutoAttack standard: 5000)
    pgd_steps: int = allowed(0, min=0)  # extra PGD-CE and PGD-CW on the points AutoAttack left; 0 = none
    pgd_restarts: int = allowed(1, min=1)
    sweep_steps: int = allowed(10, min=1)  # PGD-CE steps for the eps sweep and the sanity checks
    sweep_n: int | None = allowed(None, min=1)  # first points used by the sweep; null = all n
    tolerance: float = allowed(0.01, min=0, max=1)  # slack of the sanity checks, as accuracy
    threats: dict[str, ThreatEvalConfig] = field(default_factory=lambda: {"linf": ThreatEvalConfig()})

    def check(self) -> None:
        if (self.version == "custom") != (self.attacks is not None):
            raise ParamsError(f"evaluate.attacks = {_show(self.attacks)} is not allowed with evaluate.version = "
                              f"{self.version!r}: a list of attacks goes with version custom, and only with it")


@dataclass(frozen=True)
class VerifyConfig:
    """The `verify` stage: deployment-side gates on models/export, then the model registry."""

    parity_batches: tuple[int, ...] = allowed((1, 7, 64), min=1)  # clean test batch sizes compared with PyTorch
    parity_atol: float = allowed(1e-4, min=0)  # max |logit difference| onnxruntime vs PyTorch
    robust_acc_tolerance: float = allowed(0.002, min=0, max=1)  # onnxruntime vs PyTorch on the adversarial examples
    square_n: int = allowed(50, min=1)  # first test points attacked by Square through onnxruntime
    square_queries: int = allowed(1000, min=1)
    square_tolerance: float = allowed(0.0, min=0, max=1)  # slack of "AutoAttack <= Square <= clean"
    latency_runs: int = allowed(50, min=1)  # timed batch-1 calls (after warm-up) for p50/p95
    latency_budget_ms: float | None = allowed(None, min=0)  # onnxruntime p95 at batch 1; null = record only
    denoiser_sigmas: tuple[float, ...] = allowed((0.05, 1.0, 20.0), min=0)
    denoiser_atol: float = allowed(1e-3, min=0)  # max |difference| of denoised outputs ([-1, 1] image units)
    registered_model: str = allowed("dmat-classifier", pattern=r"^[A-Za-z0-9][\w.\-]{0,99}$")
    register: bool = True  # register in MLflow after every gate passes
    # `champion` moves to a new version only when it is significantly more robust on the champion's test points
    champion_alpha: float = allowed(0.05, above=0, max=0.5)  # level of the exact McNemar test


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train_diffusion: TrainDiffusionConfig = field(default_factory=TrainDiffusionConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_reference: TrainReferenceConfig = field(default_factory=TrainReferenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    evaluate_diffusion: EvaluateDiffusionConfig = field(default_factory=EvaluateDiffusionConfig)

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
