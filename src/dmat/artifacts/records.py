"""What stages hand each other, as typed records: the mix manifest that `mix` writes for `train` and
`evaluate_diffusion`; the evaluation report that `evaluate` writes for `export`, `verify` and `dmat lineage`; the
header of the checkpoints that the model stages (`train`, `train_reference`, `train_diffusion`) and `dmat import`
write for the stages that load their models.

Each record is a frozen dataclass with `to_json()` (plain data: JSON files, or the non-tensor part of a checkpoint,
loadable with `weights_only=True`) and `from_json(data, where)`, which refuses data of another shape — a file
written by an older DMAT, or edited by hand — with a `RecordError` naming the file and the missing or mistyped
keys, so that the user knows which stage to run again. Field names are the keys on disk: one vocabulary
(`clean_acc`, `robust_acc`, `mlflow_run_id`, ...) from the stage that writes a record to every reader.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from dmat.errors import DataError

R = TypeVar("R")


class RecordError(DataError):
    """A record of another shape: names the file and what is missing or wrong."""


def to_json(record: Any) -> Any:
    """A record (or a value inside one) as plain data; tuples become lists, None fields are kept."""
    if dataclasses.is_dataclass(record):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, tuple | list):
        return [to_json(v) for v in record]
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    return record


def from_json(cls: type[R], data: Any, where: str) -> R:
    """`cls` from plain data, checking every field's presence and type; RecordError names `where` and the key."""
    return _build(cls, data, where, "")


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: {prefix or 'the record'} is not a mapping: written by another version of DMAT? "
                          "Run the stage that writes it again")
    hints = typing.get_type_hints(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(f"{where}: missing {', '.join(prefix + name for name in missing)}: written by another "
                          "version of DMAT? Run the stage that writes it again")
    values = {f.name: _value(hints[f.name], data[f.name], where, prefix + f.name)
              for f in dataclasses.fields(cls) if f.name in data}
    return cls(**values)


def _value(tp: Any, value: Any, where: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, where, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecordError(f"{where}: {key} is not a list")
        item = args[0] if args else Any
        return tuple(_value(item, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    expected = {int: int, float: (int, float), str: str, bool: bool, dict: dict, list: list}.get(origin or tp)
    if expected is not None and (not isinstance(value, expected) or (tp in (int, float) and isinstance(value, bool))):
        raise RecordError(f"{where}: {key} = {value!r} is not of type {getattr(tp, '__name__', tp)}")
    return float(value) if tp is float else value


# --- the mix manifest -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealStoreRef:
    path: str
    sha256: str
    images: int
    class_counts: dict


@dataclasses.dataclass(frozen=True)
class MixedStoreRef:
    """The store that supplies the generated share of each batch, and how much of it the mix uses."""

    path: str
    sha256: str
    images: int
    used: int
    class_counts_used: dict


@dataclasses.dataclass(frozen=True)
class MixManifest:
    """data/mixed/manifest.json: which store supplies the generated share, which rows of it, in what share."""

    real: RealStoreRef
    source: str  # mix.source: generated | heldout_real
    synthetic: MixedStoreRef
    synthetic_fraction: float
    synthetic_limit: int | None
    seed: int
    classes: tuple[str, ...]
    indices_file: str
    indices_sha256: str


# --- the evaluation report --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """Robust accuracy under PGD-CE at one eps of the sweep (a row of plots/evaluate_<threat>_sweep.csv)."""

    eps: float
    robust_acc: float


@dataclasses.dataclass(frozen=True)
class PerClassAccuracy:
    """Accuracy within each class, by class name (None for a class with no points among the n)."""

    clean: dict
    robust: dict


@dataclasses.dataclass(frozen=True)
class EvalRows:
    """Which test rows the evaluation used: the first `first`, and their identity (what paired comparisons share)."""

    first: int
    rows_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalReport:
    """models/eval/<threat>/report.json, what `evaluate` writes for one threat model and export, verify and
    `dmat lineage` read: the numbers of `dmat.core.robustness.evaluate_robustness`, what was evaluated, and a 95%
    Wilson interval ([low, high]) for every accuracy."""

    threat: str
    # the threat model, the attacks and their outcome (dmat.core.robustness.evaluate_robustness)
    n: int
    norm: str
    eps: float
    version: str  # AutoAttack's
    attacks: tuple[str, ...]
    suite: dict | None = None  # the attack suite's identity; absent from reports written before it was recorded
    seed: int
    clean_acc: float
    robust_acc: float
    per_attack: dict  # cumulative robust accuracy after each attack, by name ("clean" first)
    per_class: PerClassAccuracy
    flags: tuple[str, ...]
    autoattack_warnings: tuple[str, ...]
    gradient_free_only: bool
    sweep: tuple[SweepPoint, ...]
    sanity: dict  # check name -> {"passed": bool, and the values it compared}
    sanity_passed: bool
    seconds_autoattack: float
    images_per_s: float
    # what was evaluated
    classes: tuple[str, ...]
    model: str
    checkpoint_sha256: str
    test_sha256: str
    train_run_id: str | None
    mlflow_run_id: str | None
    seconds_total: float
    # the intervals
    confidence: float
    rows: EvalRows
    clean_acc_ci: tuple[float, ...]
    robust_acc_ci: tuple[float, ...]
    per_attack_ci: dict
    per_class_n: dict
    per_class_ci: dict  # "clean" | "robust" -> class name -> [low, high] (None for a class with no points)

    def failed_checks(self) -> list[str]:
        """The sanity checks that did not pass, by name."""
        return [name for name, check in self.sanity.items() if not check["passed"]]


# --- checkpoint headers ------------------------------------------------------------------------------------------
# A checkpoint is its header (one of the records below, plain data) and its tensors: the weights (`model`, `ema`),
# kept before the header's `model_config`, and in a resumable checkpoint what resuming needs (`optimizer`,
# `grad_scaler`) at the end. `checkpoint_contents` puts them together; `from_json(Header, state, path)` reads the
# header back (the tensors are not part of it).


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The classifier's network (`core.classifiers.build_classifier`) and its input."""

    name: str
    num_classes: int
    mean: tuple[float, ...]  # the input normalisation, per channel
    std: tuple[float, ...]
    dataset: str  # "" when the training store names none
    input_shape: tuple[int, ...]  # H, W, C


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """The diffusion model's network (`core.denoisers.build_denoiser`)."""

    name: str
    img_resolution: int
    in_channels: int
    num_classes: int
    label_dropout: float

    def build_args(self) -> dict[str, Any]:
        """build_denoiser's keyword arguments (all but the name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


@dataclasses.dataclass(frozen=True)
class Threat:
    """The threat model a robust classifier was trained against."""

    norm: str
    eps: float


@dataclasses.dataclass(frozen=True)
class ReferenceHeader:
    """models/reference/{best,last}.pt (train_reference: standard training on real data; weights `model`)."""

    format: str
    fingerprint: str  # of the configuration and inputs: a checkpoint resumes only its own run
    epoch: int  # epochs trained
    model_config: ClassifierConfig
    classes: tuple[str, ...]
    mlflow_run_id: str | None
    history: tuple[dict, ...]  # one row of figures per epoch
    train_config: dict  # the params section it trained from
    precision: dict  # `core.precision.Decision.record()`


@dataclasses.dataclass(frozen=True)
class ClassifierHeader:
    """models/classifier/{best,last}.pt (train: adversarial training on the mix; weights `model` and `ema`)."""

    format: str
    fingerprint: str
    epoch: int
    model_config: ClassifierConfig
    classes: tuple[str, ...]
    threat: Threat
    mlflow_run_id: str | None
    history: tuple[dict, ...]
    train_config: dict
    precision: dict


@dataclasses.dataclass(frozen=True)
class ImportedClassifierHeader:
    """A classifier checkpoint that `dmat import` wrote from the reference's published weights (`ema`): trained
    elsewhere, so no fingerprint, epochs, run or precision of its own, and where it came from (`imported`)."""

    format: str
    epoch: int | None  # None
    model_config: ClassifierConfig
    classes: tuple[str, ...]
    threat: Threat
    mlflow_run_id: str | None  # None
    history: tuple[dict, ...]  # empty
    train_config: dict  # empty
    imported: dict  # the source file, its digest and how its weights were mapped


@dataclasses.dataclass(frozen=True)
class DiffusionHeader:
    """models/diffusion/model.pt (train_diffusion; weights `model` and `ema`)."""

    format: str
    fingerprint: str
    step: int  # optimiser steps trained
    model_config: DenoiserConfig
    classes: tuple[str, ...]
    adversarial: dict  # train_diffusion.adversarial as trained (`mode` first among them)
    mlflow_run_id: str | None
    log: tuple[dict, ...]  # one row of figures per logging interval
    train_config: dict
    precision: dict


def checkpoint_contents(header: Any, weights: dict[str, Any], training: dict[str, Any] | None = None) -> dict:
    """What a checkpoint file holds: the header's fields with the `weights` before its model_config, then
    `training` (what resuming needs), in the order DMAT has always written them."""
    fields = to_json(header)
    at = list(fields).index("model_config")
    items = list(fields.items())
    return {**dict(items[:at]), **weights, **dict(items[at:]), **(training or {})}
