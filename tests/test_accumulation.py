"""Gradient accumulation: a batch in micro-batches gives the batch's gradient, for each of the three losses.

"The same gradient" holds exactly (up to float rounding) where samples do not interact in the forward pass:
networks without BatchNorm, the same random draws (attack starts drawn in batch order, diffusion noise drawn for
the whole batch first). With BatchNorm each micro-batch normalises with its own statistics, as each process of a
DDP run does with its share: the accumulated gradient is then the mean of the micro-batches' own gradients.
Each test runs the stage's own step function.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dmat.config import parse_params
from dmat.core.accumulation import micro_batches
from dmat.core.denoisers import build_denoiser
from dmat.core.ema import WeightAverage
from dmat.core.rng import seeded_generator
from dmat.data.sampler import BatchPlan
from dmat.data.store import write_store
from dmat.distributed import World
from dmat.stage_setup import classifier_probe_passes, probe_batch
from dmat.stages import train_reference
from dmat.stages.train import Trainer
from dmat.stages.train_diffusion import DiffusionTrainer, at_config
from tests.conftest import class_image, tiny_bn_net

CPU = World(0, 1, "cpu")
BATCH = 10


def no_batchnorm_net() -> nn.Module:
    """Conv + SiLU + linear on 8×8 inputs, seeded: each sample's output depends on that sample alone."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


def images(n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    return x, torch.arange(n) % 3


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def assert_same_gradients(found: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batches_cover_the_batch_in_near_equal_parts() -> None:
    assert micro_batches(10, None) == micro_batches(10, 10) == micro_batches(10, 64) == [slice(0, 10)]
    assert micro_batches(10, 4) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert micro_batches(3, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]


def classifier_step(model: nn.Module, loss: str, micro_batch: int | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`train`'s optimiser step (Trainer.step) on one batch: the gradients it left and its statistics."""
    params = parse_params({"train": {"loss": loss, "micro_batch": micro_batch, "attack": {"steps": 3}}})
    trainer = SimpleNamespace(cfg=params.train, trained=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                              scaler=torch.amp.GradScaler("cpu", enabled=False))
    x, y = images()
    totals = Trainer.step(trainer, x, y, seeded_generator(0, 0, 0))
    return gradients(model), totals


@pytest.mark.parametrize("loss", ["trades", "pgd-at"])
def test_adversarial_losses_accumulate_to_the_batch_gradient(loss: str) -> None:
    whole, whole_totals = classifier_step(no_batchnorm_net(), loss, None)
    parts, part_totals = classifier_step(no_batchnorm_net(), loss, 4)  # micro-batches of 4, 3 and 3
    assert_same_gradients(parts, whole)
    torch.testing.assert_close(part_totals, whole_totals, rtol=1e-6, atol=0)  # loss·n, clean and adv. correct, n
    assert part_totals[3] == BATCH


def test_with_batchnorm_micro_batches_train_as_processes_of_a_ddp_run_would() -> None:
    """TRADES on a BatchNorm net, micro-batches of 5: the mean of what two processes with 5 images each compute."""
    accumulated, _ = classifier_step(tiny_bn_net(4, 3), "trades", 5)
    generator, (x, y) = seeded_generator(0, 0, 0), images()
    per_process = []
    params = parse_params({"train": {"attack": {"steps": 3}}})
    for part in (slice(0, 5), slice(5, 10)):
        model = tiny_bn_net(4, 3)
        trainer = SimpleNamespace(cfg=params.train, trained=model, optimizer=torch.optim.SGD(model.parameters(), lr=0),
                                  scaler=torch.amp.GradScaler("cpu", enabled=False))
        Trainer.step(trainer, x[part], y[part], generator)  # the generator goes on: the draws of the next part
        per_process.append(gradients(model))
    assert_same_gradients(accumulated, [(a + b) / 2 for a, b in zip(*per_process, strict=True)])
    whole, _ = classifier_step(tiny_bn_net(4, 3), "trades", None)
    assert any(not torch.allclose(a, b) for a, b in zip(accumulated, whole, strict=True))  # batch statistics differ


def test_standard_training_step_accumulates_to_the_batch_gradient() -> None:
    found = {}
    for micro_batch in (None, 3):
        model = no_batchnorm_net()
        x, y = images()
        loss, correct = train_reference.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y,
                                                   label_smoothing=0.1, micro_batch=micro_batch)
        found[micro_batch] = gradients(model), loss, correct
    assert_same_gradients(found[3][0], found[None][0])
    torch.testing.assert_close(found[3][1], found[None][1])
    assert found[3][2] == found[None][2]


def diffusion_step(micro_batch: int | None, tmp_path) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`train_diffusion`'s optimiser step (DiffusionTrainer.train_step), adversarial mode, half of each batch
    regularised (so that micro-batches hold regularised rows, a mix, and none)."""
    params = parse_params({"base": {"seed": 3}, "train_diffusion": {
        "micro_batch": micro_batch, "batch_size": 7, "augment": True,
        "adversarial": {"mode": "adversarial", "fraction": 0.5}}})
    pictures = np.stack([class_image(i % 3, i, size=8) for i in range(7)])
    store = write_store(tmp_path / f"store-{micro_batch}", pictures, np.arange(7) % 3, ("a", "b", "c"), {})
    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", img_resolution=8, in_channels=3, num_classes=3)  # no dropout
    trainer = SimpleNamespace(cfg=params.train_diffusion, params=params, world=CPU, real=store, at=at_config(params),
                              plan=lambda step: BatchPlan(np.arange(7), np.empty(0, np.int64)),
                              corrupted=np.zeros(7, bool), trained=model, model=model, ema=WeightAverage(model),
                              optimizer=torch.optim.Adam(model.parameters(), lr=0.0), step=0,
                              scaler=torch.amp.GradScaler("cpu", enabled=False))
    rows = DiffusionTrainer.train_step(trainer)
    return gradients(model), rows


def test_adversarial_diffusion_loss_accumulates_to_the_batch_gradient(tmp_path) -> None:
    whole, whole_rows = diffusion_step(None, tmp_path)
    parts, part_rows = diffusion_step(3, tmp_path)  # micro-batches of 3, 2 and 2; rows 0-3 regularised
    assert_same_gradients(parts, whole)
    torch.testing.assert_close(part_rows, whole_rows, equal_nan=True)  # per-sample σ, loss, denoise loss, R
    assert part_rows[:4, 3].isfinite().all() and part_rows[4:, 3].isnan().all()


def test_the_precision_probe_runs_at_the_micro_batch() -> None:
    seen = []
    model = no_batchnorm_net()
    model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    passes = classifier_probe_passes(model, 64, (8, 8, 3), CPU, micro_batch=16)
    from dmat.core.precision import Setting

    passes(Setting())()
    assert seen == [16]
    assert probe_batch(64, None, World(0, 2, "cpu")) == 32 and probe_batch(64, 48, World(0, 2, "cpu")) == 32


def test_micro_batch_is_validated() -> None:
    from dmat.config import ParamsError

    for section in ("train", "train_reference", "train_diffusion"):
        with pytest.raises(ParamsError, match=rf"{section}.micro_batch = 0 is not allowed"):
            parse_params({section: {"micro_batch": 0}})
        assert dataclasses.asdict(parse_params({section: {"micro_batch": 8}}))[section]["micro_batch"] == 8

