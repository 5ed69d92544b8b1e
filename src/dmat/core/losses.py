"""Adversarial training objectives (TRADES, PGD-AT) and the optimiser recipe of the reference.

Reference: Wang et al. 2023, "Better Diffusion Models Further Improve Adversarial Training"
(github.com/wzekai99/DM-Improves-AT: gowal21uncovering/utils/trades.py and watrain.py; PGD-AT in
core/utils/train.py).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dmat.core.attacks import default_step_size, l2_sgd, pgd


@contextmanager
def bn_batch_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Inside: every BatchNorm normalises with the current batch's statistics and updates nothing.

    As the reference's `track_bn_stats(model, False)`: a BatchNorm in training mode with
    `track_running_stats=False` hands no running buffers to `F.batch_norm`, so it uses batch statistics
    and writes neither the running mean/var nor `num_batches_tracked`. (Setting momentum to 0 instead
    would still count batches, which corrupts the cumulative average of `momentum=None` layers.) BatchNorm
    layers are put in training mode too, so an eval-mode model also gets batch statistics; each
    layer's mode and flag are restored on exit, also after an exception.
    """
    saved = [(m, m.training, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    for module, _, _ in saved:
        module.training = True
        module.track_running_stats = False
    try:
        yield
    finally:
        for module, training, tracking in saved:
            module.training = training
            module.track_running_stats = tracking


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Inside: every module in eval mode (as the reference's `ctx_eval`); each module's own mode is
    restored on exit, also after an exception."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def trades_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 5.0,
    label_smoothing: float = 0.1,
    norm: str = "Linf",
    eps: float = 8 / 255,
    step_size: float | None = None,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRADES (Zhang et al. 2019, eq. 5) as trained by the reference (docs/method.md).

    x_adv maximises KL(p(x) ‖ p(x_adv)): under Linf by PGD from uniform noise in the eps-ball, under L2
    by the reference's own solver (`attacks.l2_sgd`); `step_size` None takes `attacks.default_step_size`.
    Then loss = CE_smooth(f(x), y) + β · KL(softmax f(x) ‖ softmax f(x_adv)) (batch mean). The attack and
    its clean target use batch statistics without touching BatchNorm's running statistics; the two
    training forwards run in the model's own mode (train, normally) and do update them. Label smoothing
    applies to the clean term only, and the KL target f(x) is not detached, so the KL also trains f(x).
    Returns the loss and detached per-batch statistics (no host sync is forced).
    """
    step_size = default_step_size(norm, eps, steps) if step_size is None else step_size
    with bn_batch_stats_frozen(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        attack = dict(eps=eps, step_size=step_size, steps=steps, loss="kl", target_probs=p_clean, generator=generator)
        x_adv = l2_sgd(model, x, y, **attack) if norm == "L2" else pgd(model, x, y, norm=norm, **attack)
    logits_clean = model(x).float()
    logits_adv = model(x_adv).float()
    clean = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    loss = clean + beta * robust
    return loss, _batch_stats(loss, clean, robust, logits_clean, logits_adv, y)


def pgd_at_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "Linf",
    eps: float = 8 / 255,
    step_size: float | None = None,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PGD adversarial training (Madry et al. 2018, eq. 2) as the reference runs it (core/utils/train.py,
    `adversarial_loss`): plain CE on PGD-CE examples from a uniform start.

    The attack runs with every module in eval mode (BatchNorm on its running statistics, nothing
    updated); the clean forward, only for the statistics, too. The trained forward on x_adv runs in the
    model's own mode. Neither the attack nor the loss smooths labels, as in the reference.
    `step_size` None takes `attacks.default_step_size`.
    """
    step_size = default_step_size(norm, eps, steps) if step_size is None else step_size
    with eval_mode(model):
        with torch.no_grad():
            logits_clean = model(x).float()
        x_adv = pgd(
            model, x, y, norm=norm, eps=eps, step_size=step_size, steps=steps, loss="ce", generator=generator
        )
    logits_adv = model(x_adv).float()
    loss = F.cross_entropy(logits_adv, y)
    clean = F.cross_entropy(logits_clean, y)
    return loss, _batch_stats(loss, clean, loss, logits_clean, logits_adv, y)


def _batch_stats(
    loss: Tensor, clean: Tensor, robust: Tensor, logits_clean: Tensor, logits_adv: Tensor, y: Tensor
) -> dict[str, Tensor]:
    return {
        "loss": loss.detach(),
        "clean_loss": clean.detach(),
        "robust_loss": robust.detach(),
        "clean_acc": (logits_clean.detach().argmax(dim=1) == y).float().mean(),
        "adv_acc": (logits_adv.detach().argmax(dim=1) == y).float().mean(),
    }


def param_groups_without_bn_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: weight decay on everything except BatchNorm weights and biases.

    The reference (watrain.py, `group_weight`) exempts BatchNorm parameters only; the classifier's
    linear bias keeps its decay.
    """
    bn_ids = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
    params = list(model.parameters())
    return [
        {"params": [p for p in params if id(p) not in bn_ids], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in bn_ids], "weight_decay": 0.0},
    ]


def one_cycle_lr(step: int, total_steps: int, peak_lr: float, warmup_fraction: float = 0.025) -> float:
    """Learning rate for 0-based optimiser step `step`: linear warm-up to `peak_lr` over the first
    `warmup_fraction` of the steps, then cosine decay to 0 at `total_steps` (docs/method.md).

    The first warm-up step already gets peak_lr / warmup_steps, so no step is wasted at lr 0.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, {total_steps}), got {step}")
    warmup_steps = max(1, round(warmup_fraction * total_steps))
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
