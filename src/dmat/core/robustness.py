"""Robustness evaluation of any classifier mapping float NCHW images in [0, 1] to logits.

Clean accuracy, AutoAttack (the official `pyautoattack`), PGD with CE or CW-margin loss, an eps
sweep with a cheap attack, and sanity checks that catch the usual ways an evaluation lies
(Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Croce & Hein 2020, AutoAttack §5).

A point is robust when it is classified correctly clean and under every attack run: robust
accuracy is the per-point worst case. AutoAttack already runs each attack only on the points the
previous ones left, so its per-attack accuracies are cumulative, in its own order.

AutoAttack reports its own warnings (randomised defence, softmax outputs, zero gradients, Square
beating the white-box attacks) to the logger `auto-attack`; they are captured here and become
flags in the report instead of lines lost in a log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dmat.core.attacks import pgd
from dmat.core.precision import full_precision
from dmat.core.stats import attack_suite

# Attack order of each AutoAttack version (pyautoattack 0.2.0, AutoAttack._set_version).
AUTOATTACK_VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
GRADIENT_FREE_ATTACKS = ("square",)
# The DLR losses compare the three largest logits: with fewer than four classes they are undefined.
DLR_ATTACKS = ("apgd-dlr", "apgd-t")
MAX_TARGET_CLASSES = 9  # AutoAttack's targeted attacks use the 9 most likely wrong classes

# AutoAttack's warning texts -> our flag names.
_AUTOATTACK_FLAGS = (
    ("randomized defense", "randomized"),
    ("probability distribution", "softmax_output"),
    ("zero gradient", "zero_gradients"),
    ("Square Attack has decreased", "square_beats_white_box"),
    ("dynamic defense", "dynamic_defense"),
    ("target classes", "too_few_classes"),
    ("not possible to use the", "too_few_classes"),
)
_BROKEN_COUNT = re.compile(r"^([\w-]+) - \d+/\d+ - (\d+) out of \d+ successfully perturbed")

# Two forward passes of a deterministic model agree to rounding; dropout or noise differ by far more.
_DETERMINISM_TOLERANCE = 1e-4
_PROBABILITY_TOLERANCE = 1e-5
_BALL_TOLERANCE = 1e-5  # float32 slack when checking that examples lie inside the eps-ball


class ContractError(ValueError):
    """The model does not map [0, 1] NCHW float32 images to one row of finite logits per image."""


@dataclass
class AttackResult:
    """Per point: still correct after the attack, and the example that broke it (else the input)."""

    correct: Tensor  # bool, N
    x_adv: Tensor  # N×C×H×W in [0, 1]
    per_attack: dict[str, float] = field(default_factory=dict)  # cumulative accuracy after each attack
    flags: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    attacks: list[str] = field(default_factory=list)  # AutoAttack's attacks, in the order run
    broken: dict[str, int] = field(default_factory=dict)  # points each AutoAttack attack broke


def batch_seed(seed: int, batch: int, *stream: int) -> int:
    """The seed of global batch `batch` (and of a stream within it, e.g. a PGD restart).

    A point's attacks depend only on its batch, never on which process ran it or which batches ran
    before, so an evaluation spread over torchrun processes gives every point the outcome of a
    single-process run with the same batch size. (numpy's SeedSequence hashes the key: neighbouring
    seeds and batches give unrelated streams.)
    """
    return int(np.random.SeedSequence([seed, batch, *stream]).generate_state(1)[0])


def predict(model: nn.Module | Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    """Predicted classes, batched, without gradients, on the device of `x`'s batches as given."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def check_contract(model: nn.Module, x: Tensor, num_classes: int | None = None) -> list[str]:
    """Put the model in eval mode and check it on a probe batch; returns flags for suspicious outputs.

    Raises ContractError for what no attack can work with (wrong output shape, non-finite logits).
    Flags: `nondeterministic` when two passes disagree (dropout left on, noise injection),
    `softmax_output` when rows are probability distributions rather than logits, `zero_gradients`
    when the loss gradient of some input is exactly zero (e.g. input quantisation masks gradients).
    """
    if isinstance(model, nn.Module):
        with contextlib.suppress(NotImplementedError):  # a torch.export module: its mode was fixed at export
            model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    if first.dim() != 2 or first.shape[0] != x.shape[0]:
        raise ContractError(f"the model returned shape {tuple(first.shape)} for a batch of {x.shape[0]} images: "
                            "expected one row of logits per image")
    if num_classes is not None and first.shape[1] != num_classes:
        raise ContractError(f"the model returned {first.shape[1]} logits per image: expected {num_classes} classes")
    if not torch.isfinite(first).all():
        raise ContractError("the model returned non-finite logits (NaN or inf) on clean test images")
    flags = []
    if (first - second).abs().max().item() > _DETERMINISM_TOLERANCE * max(1.0, first.abs().max().item()):
        flags.append("nondeterministic")
    if _looks_like_probabilities(first):
        flags.append("softmax_output")
    if isinstance(model, nn.Module) and _has_zero_input_gradients(model, x, first.argmax(1)):
        flags.append("zero_gradients")
    return flags


def _has_zero_input_gradients(model: nn.Module, x: Tensor, y: Tensor) -> bool:
    """Some input's loss gradient is exactly zero: gradient-based attacks are blind there (masking)."""
    with torch.enable_grad():
        probe = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(probe), y, reduction="sum"), probe,
                                      allow_unused=True)
    return grad is None or bool((grad.flatten(1).abs().sum(1) == 0).any())


def _looks_like_probabilities(outputs: Tensor) -> bool:
    in_unit_range = outputs.min() > -_PROBABILITY_TOLERANCE and outputs.max() < 1 + _PROBABILITY_TOLERANCE
    return bool(in_unit_range and ((outputs.sum(1) - 1).abs() < _PROBABILITY_TOLERANCE).all())


def autoattack_plan(version: str, attacks: Sequence[str] | None, num_classes: int) -> tuple[list[str], list[str]]:
    """The attacks to run, in order, and flags: DLR-based attacks are dropped below four classes."""
    planned = list(attacks) if version == "custom" else list(AUTOATTACK_VERSIONS[version])
    if num_classes >= 4:
        return planned, []
    kept = [a for a in planned if a not in DLR_ATTACKS]
    return kept, (["reduced_attack_set"] if kept != planned else [])


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 250,
    device: str = "cpu",
    square_queries: int | None = None,
    progress: Callable[[str], None] | None = None,
    first_batch: int = 0,
) -> AttackResult:
    """AutoAttack through pyautoattack with an explicit device and seed, one batch at a time.

    Batch i of `x` is global batch `first_batch + i` and gets its own AutoAttack run, seeded with
    `batch_seed(seed, first_batch + i)`. With ten or more classes and the default Square budget each
    is exactly `AutoAttack(model, device=, eps=, norm=, seed=batch_seed(...), version=)
    .run_standard_evaluation(x_batch, y_batch, batch_size=)`. With fewer classes the targeted attacks
    use every wrong class (AutoAttack's 9 do not exist) and the DLR-based attacks are dropped below
    four classes (flag `reduced_attack_set`).
    """
    if len(x) == 0:  # a torchrun rank left without a batch
        return AttackResult(correct=torch.zeros(0, dtype=torch.bool), x_adv=x.cpu().clone())
    num_classes = _num_classes(model, x[:1].to(device))
    planned, flags = autoattack_plan(version, attacks, num_classes)
    started = time.perf_counter()
    batches = []
    with _captured_autoattack_log(progress) as log:
        for index, start in enumerate(range(0, len(x), batch_size)):
            adversary = _autoattack(model, planned, version, num_classes, norm=norm, eps=eps, device=device,
                                    seed=batch_seed(seed, first_batch + index), square_queries=square_queries)
            # AutoAttack's L2 and L1 attacks fail on non-contiguous input (docs/method.md).
            rows = slice(start, start + batch_size)
            x_adv, _ = adversary.run_standard_evaluation(x[rows].contiguous(), y[rows].contiguous(),
                                                         batch_size=batch_size)
            batches.append(x_adv.cpu())
    x_adv = torch.cat(batches)
    correct = predict(model, x_adv.to(device), batch_size).cpu() == y.cpu()
    clean = predict(model, x.to(device), batch_size).cpu() == y.cpu()
    result = AttackResult(correct=correct & clean, x_adv=x_adv, seconds=time.perf_counter() - started,
                          attacks=planned, broken=dict(log.broken))
    result.per_attack = _cumulative_accuracy(clean, planned, log.broken, len(x))
    result.warnings = list(dict.fromkeys(log.warnings))  # each batch's run repeats AutoAttack's checks
    result.flags = flags + log.flags
    if result.per_attack and abs(list(result.per_attack.values())[-1] - _fraction(result.correct)) > 1e-9:
        result.flags.append("autoattack_log_mismatch")  # its own bookkeeping disagrees with a re-check
    return result


def _autoattack(model: nn.Module, planned: list[str], version: str, num_classes: int, *, norm: str, eps: float,
                device: str, seed: int, square_queries: int | None):
    import pyautoattack

    if version == "custom":
        adversary = pyautoattack.AutoAttack(model, attacks=planned, device=device, eps=eps, norm=norm, seed=seed,
                                            version="custom")
    else:
        adversary = pyautoattack.AutoAttack(model, device=device, eps=eps, norm=norm, seed=seed, version=version)
        adversary.attacks_to_run = planned  # the version's own list unless attacks had to be dropped
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    return adversary


def _num_classes(model: nn.Module, probe: Tensor) -> int:
    with torch.no_grad():
        return int(model(probe).shape[1])


def _cumulative_accuracy(clean: Tensor, attacks: list[str], broken: dict[str, int], n: int) -> dict[str, float]:
    remaining = int(clean.sum())
    per_attack = {"clean": remaining / n}
    for attack in attacks:
        remaining -= broken.get(attack, 0)
        per_attack[attack] = remaining / n
    return per_attack


class _AutoAttackLog(logging.Handler):
    """Collects AutoAttack's warnings as flags and counts the points each attack broke."""

    def __init__(self, progress: Callable[[str], None] | None):
        super().__init__(level=logging.DEBUG)
        self.progress = progress
        self.flags: list[str] = []
        self.warnings: list[str] = []
        self.broken: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)
            flag = next((name for text, name in _AUTOATTACK_FLAGS if text in message), "autoattack_warning")
            if flag not in self.flags:
                self.flags.append(flag)
        match = _BROKEN_COUNT.match(message)
        if match:
            self.broken[match[1]] = self.broken.get(match[1], 0) + int(match[2])
        if self.progress and (match or message.startswith("robust accuracy after")):
            self.progress(message)


class _captured_autoattack_log:  # noqa: N801 (used as a context manager, like contextlib helpers)
    def __init__(self, progress: Callable[[str], None] | None):
        self.handler = _AutoAttackLog(progress)
        self.logger = logging.getLogger("auto-attack")

    def __enter__(self) -> _AutoAttackLog:
        self.level, self.propagate = self.logger.level, self.logger.propagate
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False  # captured here; the caller decides what users see
        self.logger.addHandler(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        self.logger.propagate = self.propagate


def run_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    steps: int,
    loss: str = "ce",
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 250,
    device: str = "cpu",
    first_batch: int = 0,
) -> AttackResult:
    """PGD with `restarts` random starts; a point counts as broken if any restart breaks it.

    Step size 2.5·eps/steps (Madry et al. 2018). Batch i of `x` is global batch `first_batch + i`;
    each (batch, restart) draws its random start from a CPU generator seeded with
    `batch_seed(seed, batch, restart)`, so results depend neither on the device nor on how batches
    are spread over processes.
    """
    started = time.perf_counter()
    x_adv, correct = x.clone(), torch.ones(len(x), dtype=torch.bool)
    for restart in range(restarts):
        for index, start in enumerate(range(0, len(x), batch_size)):
            generator = torch.Generator().manual_seed(batch_seed(seed, first_batch + index, restart))
            rows = slice(start, start + batch_size)
            xb, yb = x[rows].to(device), y[rows].to(device)
            candidate = pgd(model, xb, yb, norm=norm, eps=eps, step_size=2.5 * eps / max(steps, 1), steps=steps,
                            loss=loss, random_start=eps > 0, generator=generator)
            with torch.no_grad():
                still = (model(candidate).argmax(1) == yb).cpu() & correct[rows]
            newly_broken = correct[rows] & ~still
            x_adv[rows][newly_broken] = candidate.cpu()[newly_broken]
            correct[rows] = still
    return AttackResult(correct=correct, x_adv=x_adv, seconds=time.perf_counter() - started,
                        per_attack={f"pgd-{loss}": _fraction(correct)})


def perturbation_norms(x: Tensor, x_adv: Tensor, norm: str) -> Tensor:
    delta = (x_adv - x).flatten(1).double()
    return {"Linf": delta.abs().amax(1), "L2": delta.norm(dim=1), "L1": delta.abs().sum(1)}[norm]


def sanity_checks(*, clean_acc_sweep_points: float, sweep: list[dict[str, float]], large_eps_acc: float | None,
                  x: Tensor, x_adv: Tensor, norm: str, eps: float, num_classes: int, model_flags: list[str],
                  robust_acc: float, pgd_acc_at_eps: float | None, tolerance: float) -> dict[str, dict]:
    """Pass/fail of the checks every honest evaluation passes, each with the values it compared.

    Checks that need the sweep pass vacuously without one (black-box models), and say so by a null value.
    """
    at_zero = next((row["robust_acc"] for row in sweep if row["eps"] == 0), None)
    sweep_accs = [row["robust_acc"] for row in sweep]
    largest_norm = perturbation_norms(x, x_adv, norm).max().item() if len(x) else 0.0
    checks = {
        "eps_zero_equals_clean": {
            "passed": at_zero is None or abs(at_zero - clean_acc_sweep_points) <= 1e-9,
            "clean_acc": clean_acc_sweep_points, "acc_at_eps_0": at_zero},
        "not_rising_with_eps": {
            "passed": all(b <= a + tolerance for a, b in zip(sweep_accs, sweep_accs[1:], strict=False)),
            "sweep": sweep_accs},
        "large_eps_at_most_chance": {
            "passed": large_eps_acc is None or large_eps_acc <= 1 / num_classes + tolerance, "acc": large_eps_acc,
            "chance": 1 / num_classes},
        "examples_in_ball": {
            "passed": largest_norm <= eps * (1 + _BALL_TOLERANCE) + _BALL_TOLERANCE, "largest_norm": largest_norm,
            "eps": eps},
        "examples_in_range": {
            "passed": bool(x_adv.min() >= 0 and x_adv.max() <= 1),
            "min": float(x_adv.min()), "max": float(x_adv.max())},
        "deterministic": {"passed": "nondeterministic" not in model_flags},
        "outputs_are_logits": {"passed": "softmax_output" not in model_flags},
    }
    if pgd_acc_at_eps is not None:  # AutoAttack must not be weaker than a plain PGD at the same eps
        checks["autoattack_not_weaker_than_pgd"] = {
            "passed": robust_acc <= pgd_acc_at_eps + tolerance, "autoattack": robust_acc, "pgd": pgd_acc_at_eps}
    return checks


def per_class_accuracy(correct: Tensor, y: Tensor, classes: Sequence[str]) -> dict[str, float | None]:
    """Accuracy within each class (None for a class with no points)."""
    result: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        members = y == index
        result[name] = _fraction(correct[members]) if members.any() else None
    return result


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything that decides an evaluation's result besides the model and the points."""

    norm: str
    eps: float
    version: str = "standard"
    attacks: tuple[str, ...] | None = None  # version custom only
    seed: int = 0
    batch_size: int = 250
    device: str = "cpu"
    square_queries: int | None = None  # None: the version's own budget
    pgd_steps: int = 0  # extra PGD-CE and PGD-CW after AutoAttack; 0 = none
    pgd_restarts: int = 1
    sweep: tuple[float, ...] = ()  # eps values of the PGD sweep (0 and eps are always added)
    large_eps: float | None = None  # the "falls to chance" check; None = skip the sweep and its checks
    sweep_steps: int = 10
    sweep_n: int | None = None
    tolerance: float = 0.01
    gradient_free: bool = False  # a black-box model (e.g. an onnxruntime session): Square only, no sweep


def _single_process(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Shard:
    """One process's share of an evaluation under torchrun.

    Each rank takes a contiguous block of whole batches, so the ranks' per-point results,
    concatenated in rank order, are in the points' order. `gather` returns every rank's value of
    an object, in rank order (an all-gather; a world of one just wraps its own).
    """

    rank: int = 0
    size: int = 1
    gather: Callable[[Any], list[Any]] = _single_process

    def block(self, n: int, batch_size: int) -> tuple[slice, int]:
        """This rank's rows of n points and the global index of its first batch."""
        batches = np.array_split(np.arange(math.ceil(n / batch_size)), self.size)[self.rank]
        if len(batches) == 0:
            return slice(n, n), 0
        return slice(int(batches[0]) * batch_size, min((int(batches[-1]) + 1) * batch_size, n)), int(batches[0])


def evaluate_robustness(model, x: Tensor, y: Tensor, classes: Sequence[str], settings: EvaluationSettings,
                        progress: Callable[[str], None] | None = None, shard: Shard = Shard()) -> tuple[dict, Tensor]:
    """Clean accuracy, AutoAttack (+ optional PGD), the eps sweep and the sanity checks on (x, y).

    Always in full precision (autocast and TF32 off, whatever the caller enabled): attacks on a
    low-precision network can see masked gradients. Under torchrun each process attacks its
    `shard` of whole batches and the per-point results are gathered; every batch's attacks are
    seeded by its global index, so the report equals a single-process run's with the same batch size.

    Returns the report (plain data, ready for JSON) and the adversarial examples (the input where
    no attack succeeded). Raises ContractError when the model cannot be evaluated at all.
    """
    s = settings
    with full_precision():
        flags = check_contract(model, x[:s.batch_size].to(s.device), len(classes))
        rows, first_batch = shard.block(len(x), s.batch_size)
        mine = _evaluate_points(model, x[rows], y[rows], first_batch, s, progress)
    points = _merge(shard.gather(mine))
    clean, correct = points["clean"], points["correct"]
    per_attack = _cumulative_accuracy(clean, points["attacks"], points["broken"], len(x))
    per_attack.update({name: _fraction(after) for name, after in points["pgd"].items()})
    flags += [flag for flag in points["flags"] if flag not in flags]
    sweep, checks = _sweep_and_checks(x, clean, correct, points, flags, len(classes), s)
    version = "custom" if s.gradient_free else s.version
    attacks = list(per_attack)[1:]
    budgets = {"square_queries": s.square_queries if "square" in attacks else None,
               "pgd_steps": s.pgd_steps, "pgd_restarts": s.pgd_restarts if s.pgd_steps else None}
    report = {
        "n": len(x), "norm": s.norm, "eps": s.eps, "version": version, "attacks": attacks,
        "suite": attack_suite(s.norm, s.eps, version, attacks, budgets),
        "seed": s.seed, "clean_acc": _fraction(clean), "robust_acc": _fraction(correct), "per_attack": per_attack,
        "per_class": {"clean": per_class_accuracy(clean, y, classes),
                      "robust": per_class_accuracy(correct, y, classes)},
        "flags": flags, "autoattack_warnings": points["warnings"], "gradient_free_only": s.gradient_free,
        "sweep": sweep, "sanity": checks, "sanity_passed": all(check["passed"] for check in checks.values()),
        "seconds_autoattack": points["seconds"], "images_per_s": len(x) / max(points["seconds"], 1e-9),
    }
    return report, points["x_adv"]


def _evaluate_points(model, x: Tensor, y: Tensor, first_batch: int, s: EvaluationSettings,
                     progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Per-point outcomes of every attack on a block of whole batches (global batch `first_batch` first)."""
    clean = predict(model, x.to(s.device), s.batch_size).cpu() == y if len(x) else torch.zeros(0, dtype=torch.bool)
    version, attacks = ("custom", GRADIENT_FREE_ATTACKS) if s.gradient_free else (s.version, s.attacks)
    result = run_autoattack(model, x, y, norm=s.norm, eps=s.eps, version=version, attacks=attacks, seed=s.seed,
                            batch_size=s.batch_size, device=s.device, square_queries=s.square_queries,
                            progress=progress, first_batch=first_batch)
    correct, x_adv, after = result.correct.clone(), result.x_adv.clone(), {}
    for loss in ("ce", "cw") if s.pgd_steps and not s.gradient_free else ():
        for index, start in enumerate(range(0, len(x), s.batch_size)):  # each batch's survivors: its own seeds
            survivors = start + correct[start:start + s.batch_size].nonzero().squeeze(1)
            extra = run_pgd(model, x[survivors], y[survivors], norm=s.norm, eps=s.eps, steps=s.pgd_steps, loss=loss,
                            restarts=s.pgd_restarts, seed=s.seed, batch_size=s.batch_size, device=s.device,
                            first_batch=first_batch + index)
            correct[survivors[~extra.correct]] = False
            x_adv[survivors[~extra.correct]] = extra.x_adv[~extra.correct]
        after[f"pgd-{loss}"] = correct.clone()
    points = {"clean": clean, "correct": correct, "x_adv": x_adv, "pgd": after, "attacks": result.attacks,
              "broken": result.broken, "flags": result.flags, "warnings": result.warnings, "seconds": result.seconds,
              "sweep": {}, "large_eps": None}
    if _has_sweep(s):
        points["sweep"], points["large_eps"] = _sweep_points(model, x, y, first_batch, s)
    return points


def _has_sweep(s: EvaluationSettings) -> bool:
    return not s.gradient_free and s.large_eps is not None and s.norm in ("Linf", "L2")  # PGD needs gradients


def _sweep_points(model, x: Tensor, y: Tensor, first_batch: int, s: EvaluationSettings) -> tuple[dict, Tensor]:
    """Per point of the sweep's share of the block: correct under PGD-CE at each eps, and at large_eps."""
    n = len(x) if s.sweep_n is None else max(0, min(len(x), s.sweep_n - first_batch * s.batch_size))
    xs, ys = x[:n], y[:n]

    def survives(eps: float) -> Tensor:
        return run_pgd(model, xs, ys, norm=s.norm, eps=eps, steps=s.sweep_steps, seed=s.seed, batch_size=s.batch_size,
                       device=s.device, first_batch=first_batch).correct

    return {eps: survives(eps) for eps in sorted({0.0, s.eps, *s.sweep})}, survives(s.large_eps)


def _merge(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' per-point outcomes (in rank order) as one evaluation."""
    first = shards[0]
    merged = {key: torch.cat([part[key] for part in shards]) for key in ("clean", "correct", "x_adv")}
    merged["pgd"] = {name: torch.cat([part["pgd"][name] for part in shards]) for name in first["pgd"]}
    merged["sweep"] = {eps: torch.cat([part["sweep"][eps] for part in shards]) for eps in first["sweep"]}
    merged["large_eps"] = None if first["large_eps"] is None else torch.cat([part["large_eps"] for part in shards])
    merged["attacks"] = next((part["attacks"] for part in shards if part["attacks"]), [])
    merged["broken"] = {attack: sum(part["broken"].get(attack, 0) for part in shards) for attack in merged["attacks"]}
    merged["flags"] = list(dict.fromkeys(flag for part in shards for flag in part["flags"]))
    merged["warnings"] = list(dict.fromkeys(warning for part in shards for warning in part["warnings"]))
    merged["seconds"] = max(part["seconds"] for part in shards)  # the ranks attack side by side
    return merged


def _sweep_and_checks(x: Tensor, clean: Tensor, correct: Tensor, points: dict[str, Any], flags: list[str],
                      num_classes: int, s: EvaluationSettings) -> tuple[list[dict], dict]:
    if not _has_sweep(s):
        sweep, large, pgd_at_eps = [], None, None
    else:
        sweep = [{"eps": float(eps), "robust_acc": _fraction(survived)} for eps, survived in points["sweep"].items()]
        large = _fraction(points["large_eps"])
        pgd_at_eps = next(row["robust_acc"] for row in sweep if row["eps"] == s.eps)
        n = len(points["large_eps"])
        clean, correct = clean[:n], correct[:n]
    checks = sanity_checks(clean_acc_sweep_points=_fraction(clean), sweep=sweep, large_eps_acc=large, x=x,
                           x_adv=points["x_adv"], norm=s.norm, eps=s.eps, num_classes=num_classes, model_flags=flags,
                           robust_acc=_fraction(correct), pgd_acc_at_eps=pgd_at_eps, tolerance=s.tolerance)
    return sweep, checks


def _fraction(flags: Tensor) -> float:
    return flags.double().mean().item() if len(flags) else 0.0
