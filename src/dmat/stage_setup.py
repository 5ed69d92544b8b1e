"""Process-wide settings a stage applies before it starts: threads, device, seeds, precision and memory format."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dmat.config import BaseConfig, ParamsError
from dmat.distributed import World, broadcast_object

if TYPE_CHECKING:
    from dmat.core.precision import Decision, PassFactory


def apply_base(base: BaseConfig) -> None:
    """Seed Python's and numpy's global generators (stages that use torch call `apply_torch`)."""
    random.seed(base.seed)
    np.random.seed(base.seed % 2**32)


def apply_torch(base: BaseConfig) -> str:
    """Seed torch, set its CPU thread count (0 keeps torch's default) and return the device to use."""
    import torch

    if base.threads:
        torch.set_num_threads(base.threads)
    torch.manual_seed(base.seed)
    return resolve_device(base.device)


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when available; asking for CUDA without it is an error, not a silent fallback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("base.device = 'cuda' but no CUDA device is available: use 'auto' or 'cpu'")
    return device


def check_precision(base: BaseConfig, device: str) -> None:
    """A precision the device cannot run is a params error, raised before a stage writes anything."""
    from dmat.core.precision import unsupported

    reason = None if base.precision == "auto" else unsupported(device, base.precision)
    if reason:
        raise ParamsError(f"base.precision = {base.precision!r} is not allowed on {device}: {reason}")


def choose_setting(base: BaseConfig, w: World, make_passes: Callable[[], PassFactory],
                   recorded: Mapping[str, Any] | None = None, *, workload: Mapping[str, Any] | None = None) -> Decision:
    """The precision and memory format a stage runs in (`base.precision`, `base.memory_format`), the
    same on every torchrun rank: rank 0 decides and broadcasts (timings differ between processes).

    `workload` (the stage, its network, its per-process batch) makes `auto` decide once per machine: the
    first probe's choice is kept (`dmat.precision_decisions`) and every later run of the same workload on
    this machine reuses it, whatever the machine's load. Without it every run probes anew."""
    decision = None
    if w.is_main:
        workload = None if workload is None else {**workload, "world_size": w.size}
        decision = _decide(base, w.device, make_passes, recorded, workload)
    return broadcast_object(w, decision)


def _decide(base: BaseConfig, device: str, make_passes: Callable[[], PassFactory],
            recorded: Mapping[str, Any] | None, workload: Mapping[str, Any] | None) -> Decision:
    """A resumed run keeps the choice its checkpoint `recorded` wherever the params still say `auto`.
    Otherwise knobs set to `auto` are decided by this machine's kept decision for the workload, or probed
    on passes from `make_passes()` (called only when needed: it may copy the network), with torch's random
    state restored afterwards so that the probe never shifts what the stage draws."""
    from dmat.core.precision import Decision, Setting, candidates

    check_precision(base, device)
    if recorded is not None:
        kept = Decision.from_record(recorded)
        wanted = Setting(kept.setting.precision if base.precision == "auto" else base.precision,
                         kept.setting.memory_format if base.memory_format == "auto" else base.memory_format)
        return kept if wanted == kept.setting else Decision(wanted, "requested")
    options = candidates(device, base.precision, base.memory_format)
    if len(options) == 1:
        return Decision(options[0], "requested")
    if workload is None:
        return _probe(device, make_passes, options)
    return _machine_decision(device, make_passes, options, workload)


def _machine_decision(device: str, make_passes: Callable[[], PassFactory], options: list,
                      workload: Mapping[str, Any]) -> Decision:
    """This machine's kept decision for `workload`, else a probe whose choice is kept for the next runs."""
    from dmat import precision_decisions as decisions
    from dmat.core.precision import Decision

    names = [option.name for option in options]
    machine = decisions.machine(device)
    key = decisions.decision_key(machine, workload, names)
    record = decisions.recall(key)
    if record is None:
        probed = _probe(device, make_passes, options)
        record = decisions.keep(key, probed.record(), machine, workload, names)
        if record["decision"] == probed.record():
            return Decision(probed.setting, "probe", probed.timings, key)
    return Decision.from_record(record["decision"], source="machine", key=key)


def _probe(device: str, make_passes: Callable[[], PassFactory], options: list) -> Decision:
    import torch

    from dmat.core.precision import Decision, choose, probe

    on_cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if on_cuda else []):
        timings = probe(make_passes(), options, synchronize=torch.cuda.synchronize if on_cuda else lambda: None)
    return Decision(choose(timings, options[0]), "probe", {s.name: t for s, t in timings.items()})


def classifier_probe_passes(model, batch_size: int, image_shape, w: World):
    """Forward and backward passes of a classifier at this rank's share of `batch_size` on random HWC-shaped
    images, for the `auto` probe (the same passes for every stage that trains a classifier)."""
    import torch

    from dmat.core.precision import network_passes

    shape = (max(1, batch_size // w.size), *[image_shape[i] for i in (2, 0, 1)])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(w.device)
    return network_passes(model, [x], w.device, backward=True)


def training_network(model, decision: Decision, w: World, *, compile: bool, scaler_state: dict | None = None):
    """(module to call, gradient scaler) for training `model` in the decided setting.

    The weights are converted in place to the memory format (an optimiser built on them keeps
    working), wrapped in DDP under torchrun, optionally compiled, and run under autocast; TF32 is
    allowed on CUDA. The scaler scales the loss for fp16 (whose narrow range underflows small
    gradients) and passes it through otherwise; `scaler_state` is a resumed run's."""
    import torch

    from dmat.core.precision import Autocast, allow_tf32, to_memory_format

    to_memory_format(model, decision.setting)
    allow_tf32(w.device)
    network = torch.nn.parallel.DistributedDataParallel(model) if w.size > 1 else model
    if compile:
        network = torch.compile(network)
    scaler = torch.amp.GradScaler(torch.device(w.device).type, enabled=decision.setting.precision == "fp16")
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    return Autocast(network, decision.setting, w.device), scaler


def evaluation_network(model, base: BaseConfig, device: str):
    """The classifier as evaluation attacks it: always float32 (low precision can mask gradients), channels-last
    when `base.memory_format` asks for it by name — a layout, not a precision: only the fp32 kernels differ (2x
    faster for a WRN's forward and backward on a Xeon here). `auto` keeps the layout evaluation always had."""
    if base.memory_format != "channels_last":
        return model
    from dmat.core.precision import Autocast, Setting, to_memory_format

    setting = Setting("fp32", "channels_last")
    return Autocast(to_memory_format(model, setting), setting, device).eval()


def log_precision(tracked, decision: Decision) -> None:
    """The choice as MLflow params, the probe's median milliseconds per pass as metrics."""
    summary = decision.summary()
    tracked.log_params({k: v for k, v in summary.items() if k != "probe_ms"})
    tracked.log_metrics({f"probe_ms.{name}": ms for name, ms in summary["probe_ms"].items()})
