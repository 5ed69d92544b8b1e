"""The reference implementation's WideResNet weights, loaded into DMAT's registry networks.

Wang et al. 2023 ("Better Diffusion Models Further Improve Adversarial Training",
github.com/wzekai99/DM-Improves-AT) publish robust checkpoints of their `wideresnetwithswish`
networks. docs/published.md lists the facts this module relies on; in short:
- the network computes exactly what `dmat.core.classifiers.wide_resnet` computes (pre-activation
  blocks, SiLU, shortcut 1×1 convolution on the activated input where the channel count changes,
  "SAME" padding, final BN → SiLU → 8×8 average pool → linear, per-dataset normalisation inside);
  only the parameter names differ, and the normalisation constants are plain attributes, not state;
- its trainer wraps the network as `DataParallel(Sequential(network))`, or, with `--normalize`,
  `DataParallel(Sequential(Normalization, network))`, so state-dict keys start with `module.0.` or
  `module.1.`; that Normalization module has no state either, and its constants (below) differ from
  the network's own, so such a model normalises twice.

`load_reference_weights` maps such a state dict onto a DMAT network, refusing (naming the keys and
shapes) anything that does not match it exactly, and folds a second normalisation into the network's
normalisation buffers: ((x − m₁)/s₁ − m₂)/s₂ = (x − (m₁ + m₂·s₁)) / (s₁·s₂).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The `Normalization` module the reference's trainer puts first with `--normalize`: its dataset table's
# constants (SVHN's entry repeats CIFAR-10's), not the network's own.
REFERENCE_INPUT_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
NORMALIZATION_BUFFERS = ("normalize.mean", "normalize.std")  # DMAT's; the reference keeps them out of its state
_LISTED = 6  # keys named per kind of mismatch in an error message

# DMAT parameter-name pieces -> the reference's, applied to whole dotted components.
_RENAMES = (
    (re.compile(r"^stem\."), "init_conv."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"layer.\1.block.\2."),
    (re.compile(r"\.bn_(\d)\."), r".batchnorm_\1."),
    (re.compile(r"^bn\."), "batchnorm."),
    (re.compile(r"^head\."), "logits."),
)


class LayoutMismatch(ValueError):
    """A state dict that is not the reference's layout of the network asked for; the message names the keys."""


@dataclass(frozen=True)
class ReferenceLayout:
    """How the reference's state dict wrapped the network: the prefix every key carried and what it means."""

    prefix: str  # e.g. "module.0." ("" for a bare network)
    data_parallel: bool  # keys began with `module.`
    sequential_index: int | None  # 0: Sequential(network); 1: Sequential(Normalization, network); None: no Sequential

    @property
    def input_normalization(self) -> bool:
        """The trainer's `--normalize`: a Normalization module before the network."""
        return self.sequential_index == 1


def reference_name(key: str) -> str:
    """A DMAT WideResNet state-dict key -> the reference's name for the same tensor (its normalisation buffers
    have none: see NORMALIZATION_BUFFERS)."""
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def find_layout(keys: Sequence[str]) -> ReferenceLayout:
    """The wrapper prefix shared by every key: `module.` (DataParallel), then `0.` or `1.` (Sequential)."""
    if not keys:
        raise LayoutMismatch("the state dict is empty")
    data_parallel = all(k.startswith("module.") for k in keys)
    rest = [k.removeprefix("module.") for k in keys] if data_parallel else list(keys)
    first = {k.split(".", 1)[0] for k in rest}
    if len(first) == 1 and (index := next(iter(first))) in ("0", "1"):
        return ReferenceLayout(f"{'module.' if data_parallel else ''}{index}.", data_parallel, int(index))
    if first & {"0", "1"}:
        raise LayoutMismatch(f"keys start with different wrapper prefixes ({', '.join(sorted(first)[:_LISTED])}): "
                             "expected one network, as nn.Sequential(network) or nn.Sequential(Normalization, "
                             "network) saves it")
    return ReferenceLayout("module." if data_parallel else "", data_parallel, None)


def fold_normalization(outer: tuple[Sequence[float], Sequence[float]],
                       inner: tuple[Sequence[float], Sequence[float]]) -> tuple[list[float], list[float]]:
    """One (mean, std) equal to normalising with `outer`, then with `inner`."""
    (m1, s1), (m2, s2) = outer, inner
    return ([a + b * s for a, b, s in zip(m1, m2, s1, strict=True)],
            [s * t for s, t in zip(s1, s2, strict=True)])


def load_reference_weights(model: nn.Module, state: Mapping[str, Tensor],
                           input_normalization: tuple[Sequence[float], Sequence[float]] | None = None
                           ) -> ReferenceLayout:
    """Load the reference's state dict of the same WideResNet into `model` (a DMAT `wide_resnet`), exactly.

    `input_normalization`: the (mean, std) of the reference's Normalization module, needed when the keys say it
    was there (`module.1.`); it is then folded into the model's normalisation buffers. Raises LayoutMismatch
    naming missing, unexpected and mis-shaped keys; the model is unchanged then.
    """
    layout = find_layout(list(state))
    theirs = {key.removeprefix(layout.prefix): value for key, value in state.items()}
    ours = {reference_name(key): key for key in model.state_dict() if key not in NORMALIZATION_BUFFERS}
    expected = model.state_dict()
    _check_match(ours, expected, theirs)
    if not all(isinstance(value, Tensor) for value in theirs.values()):
        raise LayoutMismatch("the state dict holds values that are not tensors")
    converted = {ours[name]: theirs[name] for name in ours}
    mean, std = expected["normalize.mean"].flatten().tolist(), expected["normalize.std"].flatten().tolist()
    if layout.input_normalization:
        if input_normalization is None:
            raise LayoutMismatch(f"keys start with {layout.prefix!r}: the model was trained with a Normalization "
                                 "module before the network, whose constants are not in the file; name its dataset")
        mean, std = fold_normalization(input_normalization, (mean, std))
    converted["normalize.mean"] = torch.tensor(mean).view_as(expected["normalize.mean"])
    converted["normalize.std"] = torch.tensor(std).view_as(expected["normalize.std"])
    model.load_state_dict(converted, strict=True)
    return layout


def _check_match(ours: dict[str, str], expected: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> None:
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [f"{name} {tuple(theirs[name].shape)} (expected {tuple(expected[ours[name]].shape)})"
              for name in sorted(set(ours) & set(theirs))
              if isinstance(theirs[name], Tensor) and theirs[name].shape != expected[ours[name]].shape]
    problems = [f"{len(items)} {what}: {', '.join(items[:_LISTED])}{', …' if len(items) > _LISTED else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes))
                if items]
    if problems:
        raise LayoutMismatch("; ".join(problems))
