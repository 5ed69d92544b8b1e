"""TRADES and PGD-AT against hand-written references, BatchNorm handling, optimiser recipe."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmat.core.attacks import pgd
from dmat.core.losses import (
    bn_batch_stats_frozen,
    one_cycle_lr,
    param_groups_without_bn_decay,
    pgd_at_loss,
    trades_loss,
)
from tests.conftest import tiny_bn_net

EPS, STEP, STEPS, BETA, SMOOTHING, SEED = 8 / 255, 2 / 255, 3, 5.0, 0.1, 7


def _tiny_bn_net() -> nn.Module:
    return tiny_bn_net(6, 4).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def _bn(model: nn.Module) -> nn.BatchNorm2d:
    return model[1]


def _reference_trades(model, x, y, *, detach_target=False):
    """TRADES written out step by step as in the reference (DM-Improves-AT trades.py), train mode."""
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(SEED)) * 2 - 1) * EPS
    _bn(model).track_running_stats = False  # the reference's track_bn_stats(model, False)
    with torch.no_grad():
        p_natural = F.softmax(model(x), dim=1)
    x_adv = (x + noise).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        log_q = F.log_softmax(model(x_adv), dim=1)
        attack_kl = (p_natural * (p_natural.log() - log_q)).sum()
        (grad,) = torch.autograd.grad(attack_kl, x_adv)
        x_adv = x_adv.detach() + STEP * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    _bn(model).track_running_stats = True
    logits_natural, logits_adv = model(x), model(x_adv)
    log_p = F.log_softmax(logits_natural, dim=1)
    smooth_ce = (
        (1 - SMOOTHING) * -log_p.gather(1, y[:, None]).squeeze(1) - SMOOTHING * log_p.mean(dim=1)
    ).mean()
    p = log_p.exp().detach() if detach_target else log_p.exp()
    log_p_target = p.log()
    kl = (p * (log_p_target - F.log_softmax(logits_adv, dim=1))).sum(dim=1).mean()
    return smooth_ce + BETA * kl, x_adv


def _ours(model, x, y):
    return trades_loss(
        model,
        x,
        y,
        beta=BETA,
        label_smoothing=SMOOTHING,
        eps=EPS,
        step_size=STEP,
        steps=STEPS,
        generator=torch.Generator().manual_seed(SEED),
    )


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_trades_matches_hand_written_reference() -> None:
    model, x_y = _tiny_bn_net(), _batch()
    reference = copy.deepcopy(model)
    loss, stats = _ours(model, *x_y)
    expected, _ = _reference_trades(reference, *x_y)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    # atol 1e-6 against gradients up to ~0.4: the conv bias ahead of BatchNorm has an exactly zero
    # gradient in exact arithmetic, so there both sides are float32 rounding noise (~1e-7, varying
    # with the thread count).
    for ours, theirs in zip(_grads(model), _grads(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Running statistics: same two training-forward updates, nothing from the attack or clean target.
    assert _bn(model).num_batches_tracked.item() == 2
    torch.testing.assert_close(_bn(model).running_mean, _bn(reference).running_mean)
    torch.testing.assert_close(_bn(model).running_var, _bn(reference).running_var)
    torch.testing.assert_close(stats["loss"], loss.detach())
    assert set(stats) == {"loss", "clean_loss", "robust_loss", "clean_acc", "adv_acc"}


def test_trades_kl_target_is_not_detached() -> None:
    model, x_y = _tiny_bn_net(), _batch()
    detached = copy.deepcopy(model)
    _ours(model, *x_y)[0].backward()
    _reference_trades(detached, *x_y, detach_target=True)[0].backward()
    # A detached target would drop the KL's gradient through f(x): the gradients must then differ.
    assert any(
        not torch.allclose(a, b, atol=1e-6) for a, b in zip(_grads(model), _grads(detached), strict=True)
    )


def test_label_smoothing_applies_to_the_clean_term_only() -> None:
    x, y = _batch()
    results = {}
    for smoothing in (0.0, 0.3):
        model = _tiny_bn_net()
        gen = torch.Generator().manual_seed(SEED)
        results[smoothing] = trades_loss(
            model, x, y, beta=BETA, label_smoothing=smoothing, steps=STEPS, generator=gen
        )
        with torch.no_grad():  # train mode: batch statistics, so the clean logits are reproducible
            expected_clean = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        loss, stats = results[smoothing]
        torch.testing.assert_close(stats["clean_loss"], expected_clean)
        torch.testing.assert_close(loss.detach(), stats["clean_loss"] + BETA * stats["robust_loss"])
    torch.testing.assert_close(results[0.0][1]["robust_loss"], results[0.3][1]["robust_loss"])
    assert results[0.0][1]["clean_loss"] != results[0.3][1]["clean_loss"]


def test_bn_batch_stats_frozen_uses_batch_statistics_and_updates_nothing() -> None:
    model = _tiny_bn_net()
    with torch.no_grad():
        model(torch.rand(32, 3, 8, 8))
    model.eval()
    bn = _bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        batch_stat_output = copy.deepcopy(model).train()(x)
        with bn_batch_stats_frozen(model):
            frozen_output = model(x)
        running_stat_output = model(x)
    torch.testing.assert_close(frozen_output, batch_stat_output)
    assert not torch.allclose(frozen_output, running_stat_output)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not bn.training and bn.track_running_stats


def test_bn_batch_stats_frozen_restores_flags_after_an_error() -> None:
    model = _tiny_bn_net()
    with pytest.raises(RuntimeError), bn_batch_stats_frozen(model):
        raise RuntimeError
    assert _bn(model).training and _bn(model).track_running_stats


def _reference_trades_l2(model, x, y, *, eps, steps):
    """TRADES under L2 written out as the reference trains it (DM-Improves-AT trades.py, 'l2-pgd'): SGD
    on δ with lr 2·eps/steps from 0.001·randn, gradient renormalised per example, clip then renorm."""
    delta = (0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED))).requires_grad_(True)
    optimizer = torch.optim.SGD([delta], lr=2 * eps / steps)
    _bn(model).track_running_stats = False
    with torch.no_grad():
        p_natural = F.softmax(model(x), dim=1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -F.kl_div(F.log_softmax(model(x + delta), dim=1), p_natural, reduction="batchmean")
        loss.backward()
        delta.grad.div_(delta.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        optimizer.step()
        with torch.no_grad():
            delta.copy_((x + delta).clamp(0, 1) - x)
            delta.copy_(delta.renorm(p=2, dim=0, maxnorm=eps))
    _bn(model).track_running_stats = True
    model.zero_grad()  # as the reference's optimizer.zero_grad(): the attack's backward filled parameter grads
    x_adv = (x + delta.detach()).clamp(0, 1)
    logits_natural, logits_adv = model(x), model(x_adv)
    clean = F.cross_entropy(logits_natural, y, label_smoothing=SMOOTHING)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1), reduction="batchmean")
    return clean + BETA * kl, x_adv


def test_trades_l2_uses_the_reference_solver_with_its_default_step() -> None:
    model, (x, y) = _tiny_bn_net(), _batch()
    reference = copy.deepcopy(model)
    eps, steps = 0.5, 4
    loss, _ = trades_loss(model, x, y, beta=BETA, label_smoothing=SMOOTHING, norm="L2", eps=eps, steps=steps,
                          generator=torch.Generator().manual_seed(SEED))  # step_size None: lr 2·eps/steps
    expected, x_adv = _reference_trades_l2(reference, x, y, eps=eps, steps=steps)
    # torch's renorm scales by maxnorm / (norm + 1e-7): a relative difference of ~2e-7 per rescaling.
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert (x_adv - x).flatten(1).norm(dim=1).max() > 0.9 * eps  # the solver reaches the ball's surface
    loss.backward()
    expected.backward()
    for ours, theirs in zip(_grads(model), _grads(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _trained_bn_net() -> nn.Module:
    """The tiny net in train mode, with running statistics far from any one batch's."""
    model = _tiny_bn_net()
    with torch.no_grad():
        model(3 * torch.rand(64, 3, 8, 8) - 1)
    return model


def test_pgd_at_attacks_in_eval_mode_and_trains_on_plain_ce_in_train_mode() -> None:
    model, (x, y) = _trained_bn_net(), _batch()
    attacked = copy.deepcopy(model).eval()
    before = _bn(model).num_batches_tracked.item()
    loss, stats = pgd_at_loss(model, x, y, steps=STEPS, generator=torch.Generator().manual_seed(SEED))
    # The reference: PGD-CE on the eval-mode model (running statistics), uniform start, step 2.5·eps/steps.
    x_adv = pgd(attacked, x, y, norm="Linf", eps=EPS, step_size=2.5 * EPS / STEPS, steps=STEPS, loss="ce",
                generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(loss, F.cross_entropy(copy.deepcopy(attacked).train()(x_adv), y))
    with bn_batch_stats_frozen(attacked):  # the former policy (batch statistics) finds other points
        x_batch_stats = pgd(attacked, x, y, norm="Linf", eps=EPS, step_size=2.5 * EPS / STEPS, steps=STEPS,
                            loss="ce", generator=torch.Generator().manual_seed(SEED))
    assert not torch.allclose(x_adv, x_batch_stats)
    assert all(m.training for m in model.modules())  # the model's own mode is back
    assert _bn(model).num_batches_tracked.item() == before + 1  # only the trained forward counts
    with torch.no_grad():
        torch.testing.assert_close(stats["clean_loss"], F.cross_entropy(attacked(x), y))
    assert stats["loss"] == stats["robust_loss"] and stats["clean_loss"] < stats["loss"]


def test_pgd_at_restores_each_module_mode_after_an_error() -> None:
    model, (x, y) = _trained_bn_net(), _batch()
    model[2].eval()  # a mixed-mode model: one module already in eval mode
    with pytest.raises(ValueError, match="norm"):
        pgd_at_loss(model, x, y, norm="L1", step_size=0.1)
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True]


def test_one_cycle_lr_warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    total, peak = 1000, 0.2
    lrs = [one_cycle_lr(step, total, peak) for step in range(total)]
    warmup = 25  # 2.5 % of the steps
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[:warmup] == sorted(lrs[:warmup])
    assert lrs[warmup:] == sorted(lrs[warmup:], reverse=True)
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx(peak / 2, rel=0.01)
    assert 0 < lrs[-1] < 1e-4 * peak
    with pytest.raises(ValueError):
        one_cycle_lr(total, total, peak)


def test_batchnorm_parameters_get_no_weight_decay() -> None:
    model = _tiny_bn_net()
    decayed, exempt = param_groups_without_bn_decay(model, 5e-4)
    assert decayed["weight_decay"] == 5e-4 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in exempt["params"]} == {id(_bn(model).weight), id(_bn(model).bias)}
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    torch.optim.SGD([decayed, exempt], lr=0.1, momentum=0.9, nesterov=True)  # valid groups for SGD
