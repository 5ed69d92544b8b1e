"""The reference's TRADES training step, re-implemented here as the speed baseline (not used by DMAT itself).

Semantics of `trades_loss` in DM-Improves-AT (gowal21uncovering/utils/trades.py, Linf branch) and the
step around it (watrain.py), written afresh: the model in training mode with BatchNorm's running
statistics frozen for the attack (`track_running_stats = False`); the start is uniform noise in the
eps-ball; the clean target softmax(f(x)) is computed with gradients and then detached; 10 signed
steps on KL(p_clean ‖ p_adv) with batch-mean reduction, projected onto the ball and [0, 1]; then
the running statistics are tracked again and loss = smoothed CE(f(x), y) + β·KL(softmax f(x) ‖
softmax f(x_adv)) (batch mean, target not detached), backward, optimiser step. float32, NCHW, no
autocast: the reference trains that way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _track_running_stats(model: nn.Module, track: bool) -> None:
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.track_running_stats = track


def smoothed_cross_entropy(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """(1 − s)·NLL of the label + s·mean over classes of −log p, averaged over the batch."""
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, y[:, None]).squeeze(1)
    return ((1 - smoothing) * nll + smoothing * -log_probs.mean(dim=1)).mean()


def reference_trades_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
                          eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10, beta: float = 5.0,
                          label_smoothing: float = 0.1) -> Tensor:
    """One optimiser step of the reference's TRADES training; returns the (detached) loss."""
    model.train()
    _track_running_stats(model, False)
    x_adv = (x.detach() + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    p_clean = F.softmax(model(x), dim=1).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            attack_loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="batchmean")
        (grad,) = torch.autograd.grad(attack_loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    _track_running_stats(model, True)
    optimizer.zero_grad()
    logits_clean, logits_adv = model(x), model(x_adv.detach())
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    loss = smoothed_cross_entropy(logits_clean, y, label_smoothing) + beta * robust
    loss.backward()
    optimizer.step()
    return loss.detach()
