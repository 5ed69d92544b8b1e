"""How a stage settles its precision: params errors, the probe for `auto`, and a resumed run keeping its choice."""

from __future__ import annotations

import time
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


def sleeping_passes(milliseconds: dict[str, float]):
    """Pass factories that take the given time per setting: a probe under a chosen, fake machine load."""
    def make(setting: Setting):
        return lambda: time.sleep(milliseconds[setting.name] / 1000)

    return lambda: make


BF16_FAST = {"fp32_contiguous": 30, "bf16_contiguous": 3}
FP32_FAST = {"fp32_contiguous": 3, "bf16_contiguous": 30}
WORKLOAD = {"stage": "train", "network": "wrn-16-1", "batch": 64}


def test_auto_decides_once_per_machine_whatever_the_later_load() -> None:
    requested = base(memory_format="contiguous")
    first = choose_setting(requested, CPU, sleeping_passes(BF16_FAST), workload=WORKLOAD)
    assert first.setting == Setting("bf16", "contiguous") and first.source == "probe" and first.key
    # A later run on the same machine, measured under a load that would favour fp32, keeps the first choice
    # without probing; it reports the probe that decided it.
    again = choose_setting(requested, CPU, must_not_probe, workload=WORKLOAD)
    assert again.setting == first.setting and again.source == "machine" and again.key == first.key
    assert again.timings == first.timings
    # Another workload (batch) is another decision: probed, and here the fake load favours fp32.
    other = choose_setting(requested, CPU, sleeping_passes(FP32_FAST), workload={**WORKLOAD, "batch": 128})
    assert other.setting == Setting("fp32", "contiguous") and other.source == "probe" and other.key != first.key
    assert other.summary()["precision_key"] == other.key


def test_two_processes_deciding_at_once_both_use_the_first_kept_decision() -> None:
    from dmat import precision_decisions as decisions

    names = ["fp32_contiguous", "bf16_contiguous"]
    machine = decisions.machine("cpu")
    key = decisions.decision_key(machine, {**WORKLOAD, "world_size": 1}, names)
    winner = Decision(Setting("bf16", "contiguous"), "probe", {"fp32_contiguous": [0.03], "bf16_contiguous": [0.003]})
    decisions.keep(key, winner.record(), machine, WORKLOAD, names)
    # The second process probed too, and its load favoured fp32: its choice is not kept, it adopts the first.
    late = choose_setting(base(memory_format="contiguous"), CPU, sleeping_passes(FP32_FAST), workload=WORKLOAD)
    assert late.setting == winner.setting and late.source == "machine"


def test_dmat_precision_shows_and_clears_the_kept_decisions(tmp_path: Path) -> None:
    choose_setting(base(memory_format="contiguous"), CPU, sleeping_passes(BF16_FAST), workload=WORKLOAD)
    shown = run_dmat("precision", "show", cwd=tmp_path)
    assert shown.returncode == 0 and "1 decision(s)" in shown.stdout
    assert "train wrn-16-1 batch 64 x1 -> bf16 contiguous" in shown.stdout, shown.stdout
    cleared = run_dmat("precision", "clear", cwd=tmp_path)
    assert cleared.returncode == 0 and "removed 1 decision(s)" in cleared.stderr
    again = choose_setting(base(memory_format="contiguous"), CPU, sleeping_passes(FP32_FAST), workload=WORKLOAD)
    assert again.source == "probe" and again.setting == Setting("fp32", "contiguous")


def test_evaluation_runs_float32_in_the_layout_asked_for_by_name() -> None:
    from dmat.stage_setup import evaluation_network

    model = tiny_bn_net(4, 3).eval()
    x = torch.rand(5, 3, 8, 8)
    assert evaluation_network(model, base(), "cpu") is model  # auto: the layout evaluation always had
    assert evaluation_network(model, base(precision="bf16"), "cpu") is model  # precision never applies
    wrapped = evaluation_network(tiny_bn_net(4, 3).eval(), base(precision="bf16", memory_format="channels_last"), "cpu")
    with torch.no_grad():
        out = wrapped(x)
    assert out.dtype == torch.float32 and not wrapped.training
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # fp32: only the kernels differ
