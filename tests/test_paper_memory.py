"""The paper profile fits an 80 GB GPU: every training stage's per-GPU memory estimate, on one GPU (the most images
per forward), from the activation memory per image measured on the CPU (benchmarks/results/memory.json, made by
`python -m benchmarks.bench_memory --save`)."""

from __future__ import annotations

import json

import pytest
from benchmarks.bench_memory import (
    GPU_MEMORY_GB,
    RESULTS,
    estimate_gb,
    images_per_forward,
    paper_estimates,
    paper_params,
)

MEASURED = json.loads(RESULTS.read_text())["measured"]


@pytest.mark.parametrize("stage", ["train_diffusion", "train", "train_reference"])
def test_each_training_stage_fits_one_80_gb_gpu(stage: str) -> None:
    params = paper_params()
    assert MEASURED[stage]["model"] == params.section(stage).model
    assert estimate_gb(MEASURED[stage], images_per_forward(params, stage, processes=1)) <= GPU_MEMORY_GB


def test_without_micro_batches_the_diffusion_model_would_not_fit() -> None:
    """The reason for train_diffusion.micro_batch: batch 512 of adversarial DDPM++ in one forward needs ~190 GB."""
    assert estimate_gb(MEASURED["train_diffusion"], 512) > 2 * GPU_MEMORY_GB


def test_committed_estimates_follow_the_profile() -> None:
    """The README quotes benchmarks/results/memory.json: it must describe the committed profile."""
    assert json.loads(RESULTS.read_text())["paper_profile"] == paper_estimates(MEASURED, paper_params())
