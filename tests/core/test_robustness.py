"""Robustness evaluation: agreement with a bare pyautoattack call, and sanity checks that catch broken models."""

from __future__ import annotations

from pathlib import Path

import pyautoattack
import pytest
import torch
from torch import nn

from dmat.core.robustness import (
    ContractError,
    EvaluationSettings,
    autoattack_plan,
    batch_seed,
    check_contract,
    evaluate_robustness,
    run_autoattack,
    run_pgd,
)
from tests.conftest import REPO_ROOT, run_torchrun

CLASSES = ("red", "green", "blue", "grey")


def colour_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8×8 images whose mean colour says the class, plus noise: a linear model learns it in a second."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    base = torch.tensor([[0.7, 0.3, 0.3], [0.3, 0.7, 0.3], [0.3, 0.3, 0.7], [0.5, 0.5, 0.5]])[y]
    x = base[:, :, None, None] + 0.08 * torch.randn(n, 3, 8, 8, generator=generator)
    return x.clamp(0, 1), y


def train_colour_model(hidden: int, steps: int) -> nn.Module:
    """A small MLP trained (full batch, Adam) on colour_data: > 90% accurate in well under a second."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, hidden), nn.ReLU(), nn.Linear(hidden, len(CLASSES)))
    x, y = colour_data(512, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return train_colour_model(hidden=32, steps=150)


@pytest.fixture(scope="module")
def points() -> tuple[torch.Tensor, torch.Tensor]:
    return colour_data(48, seed=2)


class SoftmaxOutput(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


class AlwaysDropout(nn.Module):
    """Stays random in eval mode: like a model left in train mode whose eval() does not switch dropout off."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(nn.functional.dropout(x, 0.3, training=True))


class RoundsInput(nn.Module):
    """Quantises its input: zero gradients everywhere, the classic gradient masking."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)


def settings(**overrides) -> EvaluationSettings:
    values = dict(norm="Linf", eps=0.1, version="custom", attacks=("apgd-ce",), seed=0, batch_size=64,
                  sweep=(0.05, 0.2), large_eps=0.5, sweep_steps=10)
    return EvaluationSettings(**{**values, **overrides})


def test_matches_bare_pyautoattack_calls_with_each_batchs_seed_and_points(trained, points) -> None:
    """Each batch of 16 is one AutoAttack run seeded by (seed, its global batch index)."""
    x, y = points
    ours = run_autoattack(trained, x, y, norm="Linf", eps=0.1, version="custom", attacks=("apgd-ce", "apgd-dlr"),
                          seed=7, batch_size=16)
    x_adv, y_adv = [], []
    for batch, start in enumerate(range(0, len(x), 16)):
        adversary = pyautoattack.AutoAttack(trained, attacks=["apgd-ce", "apgd-dlr"], device="cpu", eps=0.1,
                                            norm="Linf", seed=batch_seed(7, batch), version="custom")
        adv, pred = adversary.run_standard_evaluation(x[start:start + 16], y[start:start + 16], batch_size=16)
        x_adv.append(adv)
        y_adv.append(pred)
    x_adv, y_adv = torch.cat(x_adv), torch.cat(y_adv)
    assert ours.correct.double().mean().item() == (y_adv == y).double().mean().item()
    assert torch.equal(ours.x_adv, x_adv)
    assert list(ours.per_attack) == ["clean", "apgd-ce", "apgd-dlr"]
    assert ours.per_attack["apgd-dlr"] == ours.correct.double().mean().item() <= ours.per_attack["clean"]


def test_l2_attacks_work_on_non_contiguous_input(trained, points) -> None:
    x, y = points
    channels_last_view = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # not contiguous
    result = run_autoattack(trained, channels_last_view, y, norm="L2", eps=0.5, version="custom",
                            attacks=("apgd-ce",), seed=0, batch_size=48)
    assert (result.x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_a_normal_model_passes_every_sanity_check(trained, points) -> None:
    x, y = points
    report, x_adv = evaluate_robustness(trained, x, y, CLASSES, settings(pgd_steps=5))
    assert report["sanity_passed"], report["sanity"]
    assert report["flags"] == []
    assert 0 <= report["robust_acc"] <= report["clean_acc"] and report["clean_acc"] > 0.9
    assert [row["eps"] for row in report["sweep"]] == [0.0, 0.05, 0.1, 0.2]
    assert report["per_attack"]["pgd-cw"] == report["robust_acc"]
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_softmax_outputs_are_flagged_and_fail_the_checks(trained, points) -> None:
    x, y = points
    report, _ = evaluate_robustness(SoftmaxOutput(trained), x, y, CLASSES, settings())
    assert "softmax_output" in report["flags"]
    assert not report["sanity"]["outputs_are_logits"]["passed"] and not report["sanity_passed"]


def test_a_model_that_stays_random_is_flagged_nondeterministic(trained, points) -> None:
    x, y = points
    report, _ = evaluate_robustness(AlwaysDropout(trained), x, y, CLASSES, settings())
    assert "nondeterministic" in report["flags"] and "randomized" in report["flags"]  # ours and AutoAttack's
    assert not report["sanity"]["deterministic"]["passed"] and not report["sanity_passed"]


def test_gradient_masking_by_rounding_fails_the_large_eps_check(trained, points) -> None:
    x, y = points
    report, _ = evaluate_robustness(RoundsInput(trained), x, y, CLASSES, settings())
    assert not report["sanity"]["large_eps_at_most_chance"]["passed"]
    assert "zero_gradients" in report["flags"]
    assert not report["sanity_passed"]


def test_model_in_train_mode_is_put_in_eval_mode(points) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 64, 4)).train()
    assert check_contract(model, points[0]) == []
    assert not model.training


def test_wrong_output_shape_is_a_contract_error(points) -> None:
    with pytest.raises(ContractError, match="one row of logits per image"):
        check_contract(nn.Flatten(0), points[0])
    with pytest.raises(ContractError, match="expected 10 classes"):
        check_contract(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 4)), points[0], num_classes=10)


def test_pgd_restarts_only_break_more_points(trained, points) -> None:
    x, y = points
    once = run_pgd(trained, x, y, norm="Linf", eps=0.15, steps=3, restarts=1)
    thrice = run_pgd(trained, x, y, norm="Linf", eps=0.15, steps=3, restarts=3)
    assert not (thrice.correct & ~once.correct).any()  # a point broken once stays broken
    assert (thrice.x_adv - x).abs().max() <= 0.15 + 1e-6


def test_dlr_attacks_are_dropped_below_four_classes() -> None:
    assert autoattack_plan("standard", None, 10) == (["apgd-ce", "apgd-t", "fab-t", "square"], [])
    assert autoattack_plan("standard", None, 3) == (["apgd-ce", "fab-t", "square"], ["reduced_attack_set"])


def test_evaluation_runs_in_float32_even_inside_a_callers_autocast(trained, points) -> None:
    """AutoAttack, the extra PGD and the sweep all see float32 inputs and weights with autocast off."""
    x, y = points
    seen = set()

    def record(module, args):
        seen.add((args[0].dtype, torch.is_autocast_enabled("cpu"),
                  all(p.dtype == torch.float32 for p in module.parameters())))

    hook = trained.register_forward_pre_hook(record)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            evaluate_robustness(trained, x, y, CLASSES, settings(pgd_steps=2))
    finally:
        hook.remove()
    assert seen == {(torch.float32, False, True)}


@pytest.mark.slow
def test_sharded_over_two_processes_every_point_gets_the_single_process_outcome(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes vs 1 (one thread each): same adversarial examples, bit for bit, same report."""
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.pt"
        result = run_torchrun(str(out), cwd=REPO_ROOT, nproc=nproc, module="tests.core.sharded_evaluation")
        assert result.returncode == 0, result.stderr[-3000:]
        results[nproc] = torch.load(out, weights_only=False)  # written by this test's own helper
    one, two = results[1], results[2]
    assert two["processes"] == 2
    assert torch.equal(one["x_adv"], two["x_adv"])
    timing = ("seconds_autoattack", "images_per_s")
    assert {k: v for k, v in one["report"].items() if k not in timing} == {
        k: v for k, v in two["report"].items() if k not in timing}
    assert one["report"]["robust_acc"] < one["report"]["clean_acc"]  # the attacks did break points
