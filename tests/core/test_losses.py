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


def test_pgd_at_is_cross_entropy_on_pgd_examples() -> None:
    model, (x, y) = _tiny_bn_net(), _batch()
    attacked = copy.deepcopy(model)
    loss, stats = pgd_at_loss(model, x, y, steps=STEPS, generator=torch.Generator().manual_seed(SEED))
    generator = torch.Generator().manual_seed(SEED)
    with bn_batch_stats_frozen(attacked):
        x_adv = pgd(
            attacked, x, y, norm="Linf", eps=EPS, step_size=STEP, steps=STEPS, loss="ce", generator=generator
        )
    torch.testing.assert_close(loss, F.cross_entropy(attacked(x_adv), y))
    assert _bn(model).num_batches_tracked.item() == 1  # only the training forward counts
    assert stats["loss"] == stats["robust_loss"] and stats["clean_loss"] < stats["loss"]


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
