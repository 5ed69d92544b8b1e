"""Classifier networks: pre-activation ResNets that take raw [0, 1] images and return logits.

The WideResNets follow the reference implementation of Wang et al. 2023, "Better Diffusion Models
Further Improve Adversarial Training" (github.com/wzekai99/DM-Improves-AT,
core/models/wideresnetwithswish.py, after Gowal et al. 2020 / Rebuffi et al. 2021): pre-activation
blocks (He et al. 2016, "Identity Mappings in Deep Residual Networks"), SiLU activations, BatchNorm
momentum 0.01, TensorFlow-style "SAME" padding for strided convolutions, He fan-out initialisation.
The dataset normalisation is a pair of buffers inside the model, so it travels with `.to()`, the
state dict and ONNX export, and every consumer (attacks, AutoAttack, serving) sees [0, 1] input.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Per-channel mean and std of the training split, as in the reference (SVHN: plain 0.5 / 0.5).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# The reference's value (PyTorch's default is 0.1): running statistics average over ~100 batches.
_BN_MOMENTUM = 0.01


class Normalize(nn.Module):
    """(x − mean) / std per channel, with mean and std as persistent buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, fig. 4e), the reference's `_Block`.

    BN → SiLU → conv3×3(stride) → BN → SiLU → conv3×3, added to the raw input, or, where the shape
    changes, to a 1×1 projection of the activated input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.bn_0 = nn.BatchNorm2d(in_channels, momentum=_BN_MOMENTUM)
        self.act_0 = nn.SiLU()
        # TensorFlow "SAME" padding as in the reference: a stride-2 convolution pads right and bottom only.
        self.pad = nn.ZeroPad2d((1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
        self.conv_0 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=0, bias=False)
        self.bn_1 = nn.BatchNorm2d(out_channels, momentum=_BN_MOMENTUM)
        self.act_1 = nn.SiLU()
        self.conv_1 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.act_0(self.bn_0(x))
        skip = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv_0(self.pad(activated))
        out = self.conv_1(self.act_1(self.bn_1(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Normalise → conv stem → stages of `PreActBlock`s → BN → SiLU → global average pool → linear.

    `features(x)` is the pooled penultimate activation (N, D); `forward(x) = head(features(x))`.
    """

    def __init__(
        self,
        *,
        stem_channels: int,
        stage_channels: Sequence[int],
        stage_strides: Sequence[int],
        blocks_per_stage: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(len(mean), stem_channels, 3, stride=1, padding=1, bias=False)
        stages, in_channels = [], stem_channels
        for channels, stride, blocks in zip(stage_channels, stage_strides, blocks_per_stage, strict=True):
            stages.append(_stage(in_channels, channels, stride, blocks))
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_channels, momentum=_BN_MOMENTUM)
        self.act = nn.SiLU()
        self.head = nn.Linear(in_channels, num_classes)
        self.feature_dim = in_channels
        _he_fan_out_init(self)

    def features(self, x: Tensor) -> Tensor:
        out = self.stages(self.stem(self.normalize(x)))
        # Global mean: the reference's avg_pool2d(out, 8) on 32×32 input, valid for any input size.
        return self.act(self.bn(out)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _stage(in_channels: int, out_channels: int, stride: int, blocks: int) -> nn.Sequential:
    """`blocks` blocks; only the first changes the channel count and the resolution."""
    return nn.Sequential(
        *(
            PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(blocks)
        )
    )


def _he_fan_out_init(model: nn.Module) -> None:
    """Reference init: conv weights N(0, 2 / (k·k·out_channels)), BN (1, 0), linear bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def wide_resnet(
    depth: int, width: int, *, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> PreActResNet:
    """WRN-depth-width (Zagoruyko & Komodakis 2016): three stages of (depth − 4) / 6 blocks."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
    blocks = (depth - 4) // 6
    return PreActResNet(
        stem_channels=16,
        stage_channels=(16 * width, 32 * width, 64 * width),
        stage_strides=(1, 2, 2),
        blocks_per_stage=(blocks,) * 3,
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


def preact_resnet18(*, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> PreActResNet:
    """PreActResNet-18 (He et al. 2016) built from the same SiLU blocks as the WideResNets."""
    return PreActResNet(
        stem_channels=64,
        stage_channels=(64, 128, 256, 512),
        stage_strides=(1, 2, 2, 2),
        blocks_per_stage=(2, 2, 2, 2),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


CLASSIFIERS: dict[str, Callable[..., PreActResNet]] = {
    "wrn-16-1": partial(wide_resnet, 16, 1),
    "wrn-16-4": partial(wide_resnet, 16, 4),
    "wrn-28-10": partial(wide_resnet, 28, 10),
    "wrn-70-16": partial(wide_resnet, 70, 16),
    "preact-resnet18": preact_resnet18,
}


def build_classifier(
    name: str, *, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> PreActResNet:
    """The registry entry `name`, freshly initialised, with normalisation constants `mean`, `std`."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; choose one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name](num_classes=num_classes, mean=mean, std=std)
