"""Weight averaging (exponential moving average of parameters) and its decay schedules."""

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An exponentially averaged copy of a model (Polyak averaging, as in Gowal et al. 2020).

    Parameters are averaged; buffers (BatchNorm running statistics, normalisation constants) are
    copied from the live model at every update, as the reference's `update_bn` does (DM-Improves-AT,
    gowal21uncovering/utils/watrain.py): averaged weights are evaluated with the live model's
    statistics. The copy is frozen (no `requires_grad`) and in eval mode; `module` is the model to
    evaluate and export. (Under torchrun each rank's live statistics are its own: stages that score on
    every rank first give them rank 0's, `distributed.broadcast_buffers`.)
    """

    def __init__(self, model: nn.Module) -> None:
        # Give the plain module, not a DistributedDataParallel wrapper: the wrapper must not be copied.
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """average ← decay · average + (1 − decay) · live; decay 0 copies the live weights exactly.

        One multi-tensor kernel per kind of state (`torch._foreach_*`), not one launch per tensor: a
        WRN-28-10 has a few hundred of them, and on a GPU each launch costs more than its arithmetic.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        averaged, live = _paired(self.module.parameters(), model.parameters())
        # lerp computes live − (live − averaged)·decay for weights ≥ 0.5: exact at decay 0.
        torch._foreach_lerp_(averaged, live, 1.0 - decay)
        averaged, live = _paired(self.module.buffers(), model.buffers())
        if averaged:
            torch._foreach_copy_(averaged, live)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state_dict)


def _paired(averaged, live) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pairs = list(zip(averaged, live, strict=True))
    return [a for a, _ in pairs], [b for _, b in pairs]


def trades_ema_decay(
    step: int, total_steps: int, tau: float = 0.995, warmup_fraction: float = 0.025
) -> float:
    """Decay for the update after optimiser step `step` (1-based) of `total_steps` (docs/method.md).

    The reference's `ema_update` (watrain.py): 0, i.e. a plain copy, during the first
    `warmup_fraction` of the steps, then min(τ, (1 + t) / (10 + t)) with t the steps since warm-up
    ended, so early averages forget the random initialisation quickly.
    """
    warmup_steps = warmup_fraction * total_steps
    if step < warmup_steps:
        return 0.0
    t = step - warmup_steps
    return min(tau, (1.0 + t) / (10.0 + t))


def half_life_decay(batch_size: int, half_life_images: float) -> float:
    """Per-step decay whose weight halves every `half_life_images` training images.

    EDM (Karras et al. 2022, training_loop.py: ema_beta = 0.5 ** (batch_size / ema_halflife_nimg)),
    used for the diffusion model so the average's time scale does not depend on the batch size.
    """
    if batch_size <= 0 or half_life_images <= 0:
        raise ValueError(
            f"batch_size and half_life_images must be positive, got {batch_size}, {half_life_images}"
        )
    return 0.5 ** (batch_size / half_life_images)
