"""Registry of class-conditional EDM denoisers D(x; σ, y).

Every entry is a raw network F wrapped in EDM preconditioning (:class:`dmat.core.edm.Precond`), so
``build_denoiser(name, ...)(x, sigma, class_labels)`` takes float32 data in [-1, 1] (NCHW images, or
(N, D) points for ``mlp-2d``), one noise level per sample (shape (N,)) and int64 labels (shape (N,)),
and returns the denoised estimate shaped like ``x``.

Class conditioning, as in EDM's DDPM++ (Karras et al. 2022, ``networks.py``): a label embedding is
added to the sinusoidal noise embedding before the mapping MLP. The label embedding has one extra
row, index ``num_classes``, a learned "null" class: label dropout (classifier-free guidance, Ho &
Salimans 2022) replaces a label by it with probability ``label_dropout`` in training mode only, and
passing ``class_labels=None`` (or the index ``num_classes``) asks for the unconditional denoiser.

Configurations:
- ``unet-tiny``: 32/64 channels at two resolutions, one block each, attention at the bottleneck,
  and plain resampling (pooling / nearest neighbour) between the resolutions instead of DDPM++'s
  resampling residual blocks (at 32×32 the upsampling block alone would cost over a quarter of the
  network's operations); trains usefully on 32×32 images on a 2-core CPU in minutes.
- ``ddpmpp-cifar``: EDM's DDPM++ CIFAR-10 configuration (Table 7 of EDM: 128 channels, multipliers
  2-2-2, 4 blocks per resolution, attention at 16×16, dropout 0.13), about 56M parameters.
- ``mlp-2d``: a residual MLP for points of any dimension D (2-D toy data, the known-distribution
  benchmark's 64-D image-shaped mixtures); it flattens ``x`` to ``in_channels·img_resolution²`` features
  and returns its shape, so flat points of shape (N, D) use ``in_channels=D, img_resolution=1`` and
  (N, 1, 8, 8) images ``in_channels=1, img_resolution=8``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmat.core.edm import Precond

SKIP_SCALE = math.sqrt(0.5)  # DDPM++ scales every residual sum by 1/√2 to keep unit variance


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, C/4) groups, as EDM's networks."""
    return nn.GroupNorm(min(32, channels // 4), channels)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise label (Vaswani et al. 2017), as in EDM's DDPM++.

    Frequencies run geometrically from 1 down to 1/max_positions (both ends included).
    """

    def __init__(self, num_channels: int, max_positions: int = 10_000) -> None:
        super().__init__()
        half = num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("freqs", max_positions ** (-exponents), persistent=False)

    def forward(self, noise_labels: Tensor) -> Tensor:
        angles = noise_labels.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """Noise level and class label → one conditioning vector (EDM DDPM++ mapping network).

    ``label_dropout`` is the probability, in training mode only, of replacing a label by the null
    class ``num_classes``.
    """

    def __init__(
        self, num_classes: int, noise_channels: int, emb_channels: int, label_dropout: float
    ) -> None:
        super().__init__()
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.noise = PositionalEmbedding(noise_channels)
        self.label = nn.Embedding(num_classes + 1, noise_channels)  # last row: the null class
        self.mlp = nn.Sequential(
            nn.Linear(noise_channels, emb_channels),
            nn.SiLU(),
            nn.Linear(emb_channels, emb_channels),
            nn.SiLU(),
        )

    def forward(self, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        labels = self._labels(class_labels, noise_labels)
        return self.mlp(self.noise(noise_labels) + self.label(labels))

    def _labels(self, class_labels: Tensor | None, noise_labels: Tensor) -> Tensor:
        null = torch.full_like(noise_labels, self.num_classes, dtype=torch.int64)
        if class_labels is None:
            return null
        if self.training and self.label_dropout > 0:
            dropped = torch.rand(class_labels.shape, device=class_labels.device) < self.label_dropout
            return torch.where(dropped, null, class_labels)
        return class_labels


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels (one head per 64 channels), pre-normalised."""

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (N, heads, pixels, channels per head)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class ResBlock(nn.Module):
    """DDPM++ residual block: GroupNorm-SiLU-conv, plus the conditioning vector as a per-channel
    bias, then GroupNorm-SiLU-dropout-conv; optional 2× down/up-sampling (average pooling /
    nearest neighbour, EDM's ``resample_filter=[1, 1]``) and optional self-attention after it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float = 0.0,
        resample: str | None = None,
        attention: bool = False,
    ) -> None:
        super().__init__()
        resamplers = {None: nn.Identity(), "down": nn.AvgPool2d(2), "up": nn.Upsample(scale_factor=2.0)}
        self.resample = resamplers[resample]
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb = nn.Linear(emb_channels, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.attn = SelfAttention(out_channels) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        x = (h + self.skip(self.resample(x))) * SKIP_SCALE
        if self.attn is not None:
            x = (x + self.attn(x)) * SKIP_SCALE
        return x


class Resample(nn.Module):
    """2× average pooling or nearest-neighbour upsampling, with a block's (x, emb) signature."""

    def __init__(self, direction: str) -> None:
        super().__init__()
        self.op = nn.AvgPool2d(2) if direction == "down" else nn.Upsample(scale_factor=2.0)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.op(x)


class UNet(nn.Module):
    """Class-conditional U-Net in the layout of DDPM++ (Song et al. 2021) as configured by EDM.

    Encoder: an input conv, then per resolution level (one per ``channel_mult`` entry, with
    ``model_channels·mult`` channels) a downsampling block (from the second level on) and
    ``num_blocks`` residual blocks; every encoder output is kept as a skip connection. Bottleneck:
    two blocks, the first with attention. Decoder: per level an upsampling block (but at the lowest
    resolution) and ``num_blocks + 1`` blocks, each consuming one skip by channel concatenation.
    Attention follows the blocks whose resolution is in ``attn_resolutions``. With
    ``resample_blocks=False`` the down- and upsampling blocks become plain average pooling and
    nearest-neighbour upsampling, with no parameters. The forward signature is that of a raw network
    for :class:`Precond`.
    """

    def __init__(
        self,
        *,
        img_resolution: int,
        in_channels: int,
        num_classes: int,
        label_dropout: float = 0.0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        emb_mult: int = 4,
        resample_blocks: bool = True,
    ) -> None:
        super().__init__()
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^(levels-1)")
        emb_channels = model_channels * emb_mult
        self.embed = ConditionEmbedding(num_classes, model_channels, emb_channels, label_dropout)

        def block(cin: int, cout: int, *, resample: str | None = None, attention: bool = False) -> ResBlock:
            return ResBlock(cin, cout, emb_channels, dropout=dropout, resample=resample, attention=attention)

        self.conv_in = nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)
        channels, skips = model_channels, [model_channels]
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            attention = (img_resolution >> level) in attn_resolutions
            blocks = nn.ModuleList()
            if level > 0:
                blocks.append(block(channels, channels, resample="down") if resample_blocks else Resample("down"))
                skips.append(channels)
            for _ in range(num_blocks):
                blocks.append(block(channels, model_channels * mult, attention=attention))
                channels = model_channels * mult
                skips.append(channels)
            self.encoder.append(blocks)

        bottleneck = [block(channels, channels, attention=True), block(channels, channels)]
        self.bottleneck = nn.ModuleList(bottleneck)

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            attention = (img_resolution >> level) in attn_resolutions
            stage = nn.ModuleDict()
            if level < len(channel_mult) - 1:
                stage["upsample"] = block(channels, channels, resample="up") if resample_blocks else Resample("up")
            blocks = nn.ModuleList()
            for _ in range(num_blocks + 1):
                blocks.append(block(channels + skips.pop(), model_channels * mult, attention=attention))
                channels = model_channels * mult
            stage["blocks"] = blocks
            self.decoder.append(stage)

        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.embed(noise_labels, class_labels)
        x = self.conv_in(x)
        skips = [x]
        for blocks in self.encoder:
            for blk in blocks:
                x = blk(x, emb)
                skips.append(x)
        for blk in self.bottleneck:
            x = blk(x, emb)
        for stage in self.decoder:
            if "upsample" in stage:
                x = stage["upsample"](x, emb)
            for blk in stage["blocks"]:
                x = blk(torch.cat([x, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(x)))


class MLPBlock(nn.Module):
    """Residual MLP block: SiLU-linear, plus the conditioning vector, then SiLU-linear."""

    def __init__(self, hidden: int, emb_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_channels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(F.silu(h)) + self.emb(emb)))


class MLPDenoiser(nn.Module):
    """Residual MLP raw network for flat points of any dimension (known-answer tests and benchmark)."""

    def __init__(
        self,
        *,
        img_resolution: int,
        in_channels: int,
        num_classes: int,
        label_dropout: float = 0.0,
        hidden: int = 128,
        num_blocks: int = 3,
    ) -> None:
        super().__init__()
        dim = in_channels * img_resolution**2
        self.embed = ConditionEmbedding(num_classes, hidden, hidden, label_dropout)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden) for _ in range(num_blocks))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.embed(noise_labels, class_labels)
        h = self.inp(x.flatten(1))
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(h)).reshape(x.shape)


@dataclass(frozen=True)
class DenoiserSpec:
    """A registry entry: the raw network class, its fixed architecture arguments, a description."""

    network: Callable[..., nn.Module]
    kwargs: Mapping[str, Any]
    description: str


DENOISERS: dict[str, DenoiserSpec] = {
    "unet-tiny": DenoiserSpec(
        UNet,
        MappingProxyType(
            {"model_channels": 32, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (),
             "dropout": 0.0, "resample_blocks": False}
        ),
        "small U-Net (32/64 channels, 2 resolutions, plain resampling) for CPU runs",
    ),
    "ddpmpp-cifar": DenoiserSpec(
        UNet,
        MappingProxyType(
            {"model_channels": 128, "channel_mult": (2, 2, 2), "num_blocks": 4, "attn_resolutions": (16,),
             "dropout": 0.13}
        ),
        "EDM's DDPM++ CIFAR-10 configuration (~56M parameters)",
    ),
    "mlp-2d": DenoiserSpec(
        MLPDenoiser,
        MappingProxyType({"hidden": 128, "num_blocks": 3}),
        "residual MLP for flat points of any dimension (toy data, known-distribution benchmark)",
    ),
}


def build_denoiser(
    name: str, *, img_resolution: int, in_channels: int, num_classes: int, label_dropout: float = 0.0
) -> Precond:
    """Build the registry entry ``name`` as a preconditioned denoiser D(x, sigma, class_labels)."""
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; available: {', '.join(sorted(DENOISERS))}")
    spec = DENOISERS[name]
    network = spec.network(
        img_resolution=img_resolution,
        in_channels=in_channels,
        num_classes=num_classes,
        label_dropout=label_dropout,
        **spec.kwargs,
    )
    return Precond(network)
