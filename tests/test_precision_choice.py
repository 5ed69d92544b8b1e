"""How a stage settles its precision: params errors, the probe for `auto`, and a resumed run keeping its choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmat.config import ParamsError, parse_params
from dmat.core.precision import Decision, Setting, network_passes
from dmat.distributed import World
from dmat.stage_setup import check_precision, choose_setting
from tests.conftest import run_dmat, tiny_bn_net, write_params

CPU = World(0, 1, "cpu")
RECORDED = Decision(Setting("bf16", "channels_last"), "probe", {"fp32_contiguous": [0.3], "bf16_channels_last": [0.1]})


def base(**values):
    return parse_params({"base": values}).base


def must_not_probe():
    raise AssertionError("the probe ran although nothing was left to measure")


def test_auto_probes_every_candidate_and_restores_the_random_state() -> None:
    x = torch.rand(16, 3, 8, 8)
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    decision = choose_setting(base(), CPU, lambda: network_passes(tiny_bn_net(4, 3), [x], "cpu", backward=True))
    assert torch.equal(torch.rand(3), expected_next)  # the probe drew nothing from torch's generator
    assert decision.source == "probe"
    assert set(decision.timings) == {"fp32_contiguous", "fp32_channels_last", "bf16_contiguous",
                                     "bf16_channels_last"}
    assert all(len(times) == 3 and min(times) > 0 for times in decision.timings.values())


def test_fully_requested_settings_are_not_probed() -> None:
    decision = choose_setting(base(precision="fp32", memory_format="contiguous"), CPU, must_not_probe)
    assert decision == Decision(Setting("fp32", "contiguous"), "requested") and decision.timings == {}


def test_a_resumed_auto_run_keeps_its_recorded_choice_without_probing() -> None:
    decision = choose_setting(base(), CPU, must_not_probe, RECORDED.record())
    assert decision.setting == RECORDED.setting and decision.source == "checkpoint"
    assert decision.timings == RECORDED.timings


def test_a_resumed_run_follows_a_knob_the_params_now_fix() -> None:
    decision = choose_setting(base(precision="fp32"), CPU, must_not_probe, RECORDED.record())
    assert decision == Decision(Setting("fp32", "channels_last"), "requested")


def test_fp16_on_the_cpu_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match="base.precision = 'fp16' is not allowed on cpu: fp16 needs a CUDA device"):
        check_precision(base(precision="fp16"), "cpu")


@pytest.mark.parametrize("stage", ["train", "train-reference", "train-diffusion", "generate"])
def test_stages_refuse_fp16_on_the_cpu_before_writing(tmp_path: Path, stage: str) -> None:
    write_params(tmp_path / "params.yaml", "base: {device: cpu, precision: fp16}\n")
    result = run_dmat(stage, cwd=tmp_path)
    assert result.returncode == 2 and "base.precision = 'fp16' is not allowed on cpu" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
