"""Weight averaging: warm-up copies, decay schedules, BatchNorm statistics from the live model."""

import pytest
import torch
from torch import nn

from dmat.core.ema import WeightAverage, half_life_decay, trades_ema_decay


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _perturb(model: nn.Module) -> None:
    """A fake optimiser step plus a training forward that moves the BatchNorm statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.train()(torch.rand(8, 3, 6, 6) * 3)


def test_decay_is_zero_during_warm_up_then_follows_the_reference_schedule() -> None:
    total, tau = 1000, 0.995  # warm-up: the first 25 steps
    assert all(trades_ema_decay(step, total, tau) == 0.0 for step in range(25))
    for t in (0, 1, 10, 100):
        assert trades_ema_decay(25 + t, total, tau) == pytest.approx(min(tau, (1 + t) / (10 + t)))
    assert trades_ema_decay(25, total) == pytest.approx(0.1)
    assert trades_ema_decay(10_000, 10_000) == tau  # (1 + t) / (10 + t) passes 0.995 after t = 1790
    decays = [trades_ema_decay(step, total, tau) for step in range(1, total + 1)]
    assert decays == sorted(decays)


def test_warm_up_update_copies_the_live_weights_exactly() -> None:
    live = _net()
    average = WeightAverage(live)
    _perturb(live)
    average.update(live, trades_ema_decay(1, 1000))
    for name, value in live.state_dict().items():
        assert torch.equal(average.state_dict()[name], value), name


def test_update_averages_parameters_and_copies_batchnorm_statistics() -> None:
    live = _net()
    average = WeightAverage(live)
    start = [p.clone() for p in live.parameters()]
    _perturb(live)
    average.update(live, 0.9)
    for averaged, old, new in zip(average.module.parameters(), start, live.parameters(), strict=True):
        torch.testing.assert_close(averaged, 0.9 * old + 0.1 * new)
    for name, buffer in live.named_buffers():  # running mean/var and num_batches_tracked
        assert torch.equal(dict(average.module.named_buffers())[name], buffer), name
    assert live[1].num_batches_tracked.item() == 1


def test_average_is_a_frozen_independent_copy() -> None:
    live = _net()
    average = WeightAverage(live)
    assert not average.module.training
    assert all(not p.requires_grad for p in average.module.parameters())
    assert all(p.requires_grad for p in live.parameters())
    before = [p.clone() for p in average.module.parameters()]
    _perturb(live)
    assert all(torch.equal(a, b) for a, b in zip(average.module.parameters(), before, strict=True))


def test_state_dict_round_trip() -> None:
    live = _net()
    average = WeightAverage(live)
    _perturb(live)
    average.update(live, 0.5)
    restored = WeightAverage(_net(seed=1))
    restored.load_state_dict(average.state_dict())
    for name, value in average.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_half_life_decay_halves_the_weight_every_half_life() -> None:
    assert half_life_decay(500, 500) == pytest.approx(0.5)
    assert half_life_decay(128, 10_000) ** (10_000 / 128) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        half_life_decay(128, 0)


def test_invalid_decay_is_rejected() -> None:
    live = _net()
    with pytest.raises(ValueError):
        WeightAverage(live).update(live, 1.5)
