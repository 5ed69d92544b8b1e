"""torch.compile of the classifier's training step (`base.compile`): compile time and step speed against eager.

WRN-16-1 at batch 128, DMAT's TRADES-10 step as `train` runs it (`dmat.stage_setup.training_network`),
in the setting `auto` picks on this machine. Compile time is the wall time of the first compiled
step (graph capture, code generation, and the recompiles that the attack's BatchNorm mode switch
and no-grad clean target trigger) minus an eager step's. Step speed: eager and compiled steps in
interleaved rounds after one more warm-up step each; the baseline is eager. Slow: compiling takes
minutes on a CPU.
"""

from __future__ import annotations

import time

import torch

from benchmarks.bench_train import classifier, sgd
from benchmarks.measure import interleaved_seconds, machine, speed_table
from dmat.config import BaseConfig
from dmat.core.losses import trades_loss
from dmat.core.precision import Decision, network_passes
from dmat.distributed import World
from dmat.stage_setup import choose_setting, training_network

NETWORK, BATCH, ROUNDS = "wrn-16-1", 128, 3


def step_fn(decision: Decision, x: torch.Tensor, y: torch.Tensor, device: str, compile: bool):
    model = classifier(NETWORK, device)
    optimizer = sgd(model)
    network, _ = training_network(model, decision, World(0, 1, device), compile=compile)

    def step() -> None:
        loss, _ = trades_loss(network, x, y, steps=10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
    decision = choose_setting(BaseConfig(), World(0, 1, device),
                              lambda: network_passes(classifier(NETWORK, device), [x], device, backward=True))
    steps = {"eager": step_fn(decision, x, y, device, compile=False),
             "compiled": step_fn(decision, x, y, device, compile=True)}
    first = {}
    for label, step in steps.items():
        started = time.perf_counter()
        step()
        first[label] = time.perf_counter() - started
    table = speed_table(interleaved_seconds(steps, ROUNDS), BATCH, "eager")
    return {"machine": machine(), "device": device, "network": NETWORK, "batch": BATCH,
            "setting": decision.setting.name, "compile_s": round(first["compiled"] - first["eager"], 1),
            "images_per_s": table}
