"""Projected gradient ascent attacks with interchangeable losses.

PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks", eq. 2):
start uniformly inside the eps-ball, take steepest-ascent steps on an attack loss (the gradient's
sign under Linf, the L2-normalised gradient under L2) and project back onto the ball and onto the
image range [0, 1] after every step. `l2_sgd` is the reference's L2 solver for TRADES training, a
variant with a small Gaussian start and the other projection order. Every attack loss maps (logits,
labels, clean probabilities) to a scalar summed over the batch; a sum keeps each example's gradient
independent of batch size.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttackLoss = Callable[[Tensor, Tensor, Tensor | None], Tensor]

# Guards divisions by a per-example norm that can be exactly zero (zero gradient, eps = 0).
_TINY = 1e-12


def ce_loss(logits: Tensor, y: Tensor, target_probs: Tensor | None = None) -> Tensor:
    """Cross-entropy of the true label, summed over the batch (Madry et al. 2018)."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


def kl_loss(logits: Tensor, y: Tensor, target_probs: Tensor | None = None) -> Tensor:
    """KL(p_clean ‖ p_adv) summed over the batch: TRADES' inner maximisation (Zhang et al. 2019, eq. 5)."""
    if target_probs is None:
        raise ValueError("attack loss 'kl' needs target_probs, the clean softmax")
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target_probs, reduction="sum")


def cw_loss(logits: Tensor, y: Tensor, target_probs: Tensor | None = None) -> Tensor:
    """Margin max_{j≠y} z_j − z_y summed over the batch (Carlini & Wagner 2017, f_6 without the clamp)."""
    logits = logits.float()
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    best_other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (best_other - true_logit).sum()


ATTACK_LOSSES: dict[str, AttackLoss] = {"ce": ce_loss, "kl": kl_loss, "cw": cw_loss}

# Per-norm rule for the step size of a training attack, as a multiple of eps / steps. Linf: Madry et al.'s
# 2.5, which gives the reference's 2/255 at eps 8/255 and 10 steps; L2: 2, the learning rate of the
# reference's L2 solver (DM-Improves-AT trades.py: lr = epsilon / perturb_steps * 2).
STEP_FRACTION = {"Linf": 2.5, "L2": 2.0}


def default_step_size(norm: str, eps: float, steps: int) -> float:
    """The step size of a `steps`-step training attack of radius `eps` under `norm` (`STEP_FRACTION`)."""
    if norm not in STEP_FRACTION:
        raise ValueError(f"norm must be one of {sorted(STEP_FRACTION)}, got {norm!r}")
    return STEP_FRACTION[norm] * eps / max(steps, 1)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    loss: str,
    random_start: bool = True,
    target_probs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial examples for `x` (float NCHW in [0, 1]) inside the `norm` ball of radius `eps`.

    The model is used as given: its mode decides BatchNorm behaviour (a train-mode BatchNorm updates
    its running statistics; see `losses.bn_batch_stats_frozen`). Only input gradients are taken, so
    parameter `.grad`s and `requires_grad` flags are untouched. `generator` (on any device) draws
    the random start, so a CPU generator gives the same start on every device. Returns a detached tensor.
    """
    if norm not in _STEEPEST_ASCENT:
        raise ValueError(f"norm must be one of {sorted(_STEEPEST_ASCENT)}, got {norm!r}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"loss must be one of {sorted(ATTACK_LOSSES)}, got {loss!r}")
    x = x.detach()
    x_adv = _random_start(x, norm, eps, generator) if random_start else x.clone()
    for _ in range(steps):
        grad = _input_gradient(model, x_adv, y, ATTACK_LOSSES[loss], target_probs)
        x_adv = _project(x, x_adv + step_size * _STEEPEST_ASCENT[norm](grad), norm, eps)
    return x_adv.detach()


def l2_sgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str,
    target_probs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L2 adversarial examples as the reference's TRADES training finds them (DM-Improves-AT
    gowal21uncovering/utils/trades.py, attack 'l2-pgd'; the original TRADES code's L2 branch).

    δ starts at 0.001·N(0, I) (the first gradient is taken at x + δ, unclipped); each step is plain SGD
    ascent on δ with learning rate `step_size` along the L2-normalised gradient, δ += step·g/‖g‖, then
    x + δ is clipped to [0, 1] and δ rescaled into the eps-ball, in that order (PGD projects in the other
    order). Where an example's gradient is exactly zero it steps along a random unit direction instead,
    so it still moves (the reference takes an unnormalised Gaussian step there, which its rescaling then
    mostly cuts back to the ball's surface). `generator` draws the start and those directions. The
    model is used as given (see `pgd`). Returns clip(x + δ, 0, 1), detached.
    """
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"loss must be one of {sorted(ATTACK_LOSSES)}, got {loss!r}")
    x = x.detach()
    delta = 0.001 * _randn(x, generator)
    for _ in range(steps):
        grad = _input_gradient(model, x + delta, y, ATTACK_LOSSES[loss], target_probs)
        norms = _per_example_l2(grad)
        if bool((norms == 0).any()):
            random = _randn(x, generator)
            grad = torch.where(norms == 0, random / _per_example_l2(random).clamp_min(_TINY), grad)
            norms = _per_example_l2(grad)
        delta = delta + step_size * grad / norms
        delta = (x + delta).clamp(0.0, 1.0) - x
        delta = delta * (eps / _per_example_l2(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0).detach()


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like `x`, drawn on the generator's device, returned on x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x)


def _input_gradient(
    model: nn.Module, x_adv: Tensor, y: Tensor, loss: AttackLoss, target_probs: Tensor | None
) -> Tensor:
    # autograd.grad w.r.t. the input alone: no parameter .grad is written, even if parameters require grad.
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(model(x_adv), y, target_probs), x_adv)
    return grad


def _per_example_l2(t: Tensor) -> Tensor:
    """L2 norm of each example, shaped (N, 1, …, 1) to broadcast against `t`."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _sign(grad: Tensor) -> Tensor:
    return grad.sign()


def _l2_direction(grad: Tensor) -> Tensor:
    return grad / _per_example_l2(grad).clamp_min(_TINY)


_STEEPEST_ASCENT: dict[str, Callable[[Tensor], Tensor]] = {"Linf": _sign, "L2": _l2_direction}


def _project(x: Tensor, x_adv: Tensor, norm: str, eps: float) -> Tensor:
    """Onto the eps-ball around `x`, then onto [0, 1]; clipping to [0, 1] only shrinks every
    coordinate of the perturbation, so the result stays inside the ball."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_example_l2(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: Tensor, norm: str, eps: float, generator: torch.Generator | None) -> Tensor:
    """x plus a perturbation uniform in the eps-ball, clipped to [0, 1]."""
    device = generator.device if generator is not None else x.device
    if norm == "Linf":
        delta = torch.rand(x.shape, generator=generator, device=device) * 2 - 1
    else:
        # Uniform in the d-ball: a uniform direction times a radius distributed as U^(1/d).
        direction = torch.randn(x.shape, generator=generator, device=device)
        radius = torch.rand(x.shape[0], generator=generator, device=device) ** (1.0 / x[0].numel())
        delta = direction / _per_example_l2(direction) * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + eps * delta.to(x)).clamp(0.0, 1.0)
