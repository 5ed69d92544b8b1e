"""Classifier-free guidance (Ho & Salimans 2022), optionally limited to an interval of noise levels.

D_w(x; σ, y) = D(x; σ, ∅) + w·(D(x; σ, y) − D(x; σ, ∅)), where ∅ is the null class that label
dropout trains (see :mod:`dmat.core.denoisers`). w = 1 is the plain conditional denoiser; w > 1
pushes samples towards what makes class y differ from the others. Kynkäänniemi et al. (2024,
"Applying guidance in a limited interval improves sample and distribution quality in diffusion
models") apply it only for σ in (σ_lo, σ_hi]: at high noise guidance collapses diversity, at low
noise it does little but cost, and in between it shapes each image's class-typical layout.

The wrapper has the denoiser signature, so every sampler takes it unchanged. The paper we follow
(Wang et al. 2023) samples without guidance (w = 1); the CPU profile uses it because a denoiser
trained for minutes otherwise draws class colours without class shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GuidedDenoiser(nn.Module):
    """D_w as above, for σ in (interval[0], interval[1]]; the conditional D elsewhere.

    Conditional and unconditional evaluations go through one call of the wrapped denoiser (one
    batch of up to 2N images, better for GPUs); the unconditional one only for the samples whose σ
    lies in the interval.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scale: float,
        null_label: int,
        interval: tuple[float, float] = (0.0, math.inf),
    ) -> None:
        super().__init__()
        if scale < 0 or not 0 <= interval[0] < interval[1]:
            raise ValueError(f"need scale >= 0 and 0 <= interval[0] < interval[1], got {scale}, {interval}")
        self.denoiser, self.scale, self.null_label, self.interval = denoiser, scale, null_label, interval

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        guided = (sigma > self.interval[0]) & (sigma <= self.interval[1]) if self.scale != 1 else sigma < 0
        if not guided.any():
            return self.denoiser(x, sigma, class_labels)
        null = torch.full_like(class_labels[guided], self.null_label)
        both = self.denoiser(torch.cat([x, x[guided]]), torch.cat([sigma, sigma[guided]]),
                             torch.cat([class_labels, null]))
        conditional, unconditional = both[: len(x)], both[len(x):]
        out = conditional.clone()
        out[guided] = unconditional + self.scale * (conditional[guided] - unconditional)
        return out
