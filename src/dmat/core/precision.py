"""Numeric precision and memory layout of the networks that train and generate, chosen by measurement.

A :class:`Setting` is a precision (fp32, or bf16/fp16 autocast) and a memory format (contiguous NCHW
or channels-last). Which one is fastest depends on the machine: on one CPU bf16 autocast made a
TRADES step 3× faster (a Xeon with AMX-bf16), on another 1.4× slower (no native bf16). So
`auto` measures instead of assuming: :func:`probe` times a few passes of the stage's own network at
its own batch size in every candidate setting, and :func:`choose` keeps the fastest when it beats
the baseline (fp32, contiguous) by at least ``margin``; otherwise, and on ties, the baseline stays.

Evaluation never uses any of this: attacks on a low-precision network can see masked gradients, so
robustness is measured under :func:`full_precision` (autocast off, TF32 off, deterministic cuDNN).

The CUDA kernel flags are process-wide: training turns TF32 and cuDNN's autotuner on
(:func:`training_kernels`), and every path that scores or generates enters :func:`exact_kernels` (or
:func:`full_precision`), which switch them off for its duration and restore them after.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = ("contiguous", "channels_last")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MARGIN = 0.1  # a candidate must be at least 10% faster than the baseline to replace it

PassFactory = Callable[["Setting"], Callable[[], None]]
Key = TypeVar("Key")


@dataclass(frozen=True)
class Setting:
    """How a network runs: `precision` fp32 | bf16 | fp16 (autocast), `memory_format` contiguous | channels_last."""

    precision: str = "fp32"
    memory_format: str = "contiguous"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS or self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown setting {self.precision!r}/{self.memory_format!r}: expected a precision in "
                             f"{PRECISIONS} and a memory format in {MEMORY_FORMATS}")

    @property
    def name(self) -> str:
        return f"{self.precision}_{self.memory_format}"

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"


BASELINE = Setting()


@dataclass(frozen=True)
class Decision:
    """The setting a stage runs in, where it came from, and the probe's seconds per pass (when it measured).

    `source`: `requested` (params fixed every knob), `probe` (measured now), `machine` (this machine's
    decision for the same workload, probed by an earlier run: see `dmat.precision_decisions`) or
    `checkpoint` (a resumed run keeps the choice its checkpoint recorded, so one run never mixes settings
    by chance). `timings` are the probe's, now or when the machine decided; `key` names the machine's decision.
    """

    setting: Setting
    source: str
    timings: dict[str, list[float]] = field(default_factory=dict, compare=False)
    key: str | None = field(default=None, compare=False)

    def record(self) -> dict:
        """Plain data for checkpoints (loadable with weights_only=True), metrics files and MLflow."""
        record = {"precision": self.setting.precision, "memory_format": self.setting.memory_format,
                  "source": self.source, "probe_s": {name: list(times) for name, times in self.timings.items()}}
        return record if self.key is None else {**record, "decision_key": self.key}

    @classmethod
    def from_record(cls, record: Mapping, source: str = "checkpoint", key: str | None = None) -> Decision:
        return cls(Setting(record["precision"], record["memory_format"]), source, dict(record["probe_s"]),
                   key or record.get("decision_key"))

    def headline(self) -> dict:
        """The choice alone, for a stage's headline metrics (the probe's timings go to its report)."""
        return {"precision": self.setting.precision, "memory_format": self.setting.memory_format}

    def summary(self) -> dict:
        """What the stage's metrics file and MLflow run show: the choice and each candidate's median ms per pass."""
        summary = {"precision": self.setting.precision, "memory_format": self.setting.memory_format,
                   "precision_source": self.source,
                   "probe_ms": {name: 1000 * statistics.median(times) for name, times in self.timings.items()}}
        return summary if self.key is None else {**summary, "precision_key": self.key}


def unsupported(device: str, precision: str) -> str | None:
    """Why `precision` cannot run on `device`, or None when it can."""
    on_cuda = torch.device(device).type == "cuda"
    if precision == "fp16" and not on_cuda:
        return "fp16 needs a CUDA device (and a gradient scaler); on the CPU use bf16"
    if precision == "bf16" and on_cuda and not _native_cuda_bf16():
        return "this CUDA device has no native bf16 (emulating it is slower than fp32)"
    return None


def _native_cuda_bf16() -> bool:
    """bf16 in hardware (Ampere and later); torch counts emulation (V100, T4) as support unless told not to."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: it did not count emulation then
        return torch.cuda.is_bf16_supported()


def candidates(device: str, precision: str = "auto", memory_format: str = "auto") -> list[Setting]:
    """The settings to measure: each knob set to `auto` varies, a requested value stays fixed.

    `auto` precision tries fp32 and bf16 where bf16 runs; never fp16, whose narrow range can
    underflow the attacks' input gradients (it is used only when asked for). The first
    candidate is the baseline the others must beat.
    """
    precisions = [precision] if precision != "auto" else ["fp32"] + (["bf16"] if not unsupported(device, "bf16")
                                                                      else [])
    formats = [memory_format] if memory_format != "auto" else list(MEMORY_FORMATS)
    return [Setting(p, f) for p in precisions for f in formats]


def choose(timings: Mapping[Setting, Sequence[float]], baseline: Setting, margin: float = MARGIN) -> Setting:
    """The fastest setting by median time, if it is at least `margin` faster than `baseline`; else `baseline`.

    Pure decision logic (no clock): the probe's timings in, one setting out. Among equally fast
    candidates the first listed wins, so ties never move away from the baseline.
    """
    medians = {setting: statistics.median(times) for setting, times in timings.items()}
    fastest = min(medians, key=lambda setting: medians[setting])
    if fastest != baseline and medians[fastest] <= (1 - margin) * medians[baseline]:
        return fastest
    return baseline


def probe(make_pass: Callable[[Key], Callable[[], None]], settings: Sequence[Key], *, warmup: int = 2,
          repeats: int = 3, synchronize: Callable[[], None] = lambda: None) -> dict[Key, list[float]]:
    """Seconds per pass of each setting: `warmup` untimed passes each (kernel selection and JIT happen
    there: a first bf16 channels-last pass can take 40× a later one), then `repeats` timed rounds,
    interleaved so that a burst of load elsewhere on a shared machine hits every candidate alike.
    (Any hashable keys work: the benchmarks time their contenders with it.)"""
    passes = {setting: make_pass(setting) for setting in settings}
    for run in passes.values():
        for _ in range(warmup):
            run()
    timings: dict[Key, list[float]] = {setting: [] for setting in settings}
    for _ in range(repeats):
        for setting, run in passes.items():
            synchronize()
            started = time.perf_counter()
            run()
            synchronize()
            timings[setting].append(time.perf_counter() - started)
    return timings


def network_passes(model: nn.Module, inputs: Sequence[Tensor], device: str, *, backward: bool) -> PassFactory:
    """Pass factories for :func:`probe`: one forward (+ backward of a scalar) of a copy of `model` on `inputs`.

    The copies (one per memory format) keep the model itself untouched: no BatchNorm statistics,
    gradients or layout change. Training stages measure forward and backward in the model's mode;
    generation measures forward passes without gradients.
    """
    copies: dict[str, nn.Module] = {}

    def make(setting: Setting) -> Callable[[], None]:
        if setting.memory_format not in copies:
            copies[setting.memory_format] = to_memory_format(copy.deepcopy(model), setting)
        network, args = copies[setting.memory_format], [to_memory_format(a, setting) for a in inputs]

        def run() -> None:
            with torch.set_grad_enabled(backward), autocast(setting, device):
                output = network(*args)
            if backward:
                output.float().square().mean().backward()
                network.zero_grad(set_to_none=True)

        return run

    return make


def autocast(setting: Setting, device: str) -> torch.autocast:
    """The autocast context of `setting` (explicitly disabled for fp32, so fp32 means fp32)."""
    device_type = torch.device(device).type
    if setting.precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[setting.precision])


def to_memory_format(value, setting: Setting):
    """A module's 4-D weights, or a 4-D tensor, in the setting's memory format; anything else unchanged."""
    if not setting.channels_last:
        return value
    if isinstance(value, nn.Module):
        return value.to(memory_format=torch.channels_last)
    if isinstance(value, Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


class Autocast(nn.Module):
    """`module` run in `setting`: 4-D inputs in its memory format, the forward under autocast, float32 out.

    The wrapper adds no parameters (a state dict of the wrapped module loads unchanged) and leaves
    backward outside autocast, as PyTorch recommends.
    """

    def __init__(self, module: nn.Module, setting: Setting, device: str):
        super().__init__()
        self.module, self.setting, self.device = module, setting, device

    def forward(self, *args: Tensor) -> Tensor:
        with autocast(self.setting, self.device):
            output = self.module(*[to_memory_format(a, self.setting) for a in args])
        return output.float()


def training_kernels(device: str) -> None:
    """Fast kernels for training on CUDA (no effect on the CPU): TF32 tensor-core matmuls and convolutions,
    and cuDNN's autotuner (`benchmark`: each convolution shape is timed once, then its fastest algorithm
    kept). Process-wide; scoring and generation switch them off with :func:`exact_kernels`."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Inside: TF32 off (float32 means float32), cuDNN's deterministic algorithms and no autotuning, whatever
    the caller set; restored on exit. On one GPU model with one software stack, the same inputs then give
    the same bits run after run and whatever else the process did before. Generation runs here (in its
    decided precision); nothing here changes CPU arithmetic."""
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic")
    saved = [getattr(owner, name) for owner, name in flags]
    for (owner, name), value in zip(flags, (False, False, False, True), strict=True):
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved, strict=True):
            setattr(owner, name, value)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Inside: autocast off on every device, and :func:`exact_kernels`, whatever the caller enabled. Every
    scoring path runs here: evaluation, validation, checkpoint selection, the filter's scorer."""
    with exact_kernels(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield
