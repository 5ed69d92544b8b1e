"""Precision and memory format: the `auto` decision on given timings, the probe's bookkeeping, autocast wrappers."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dmat.core.precision import (
    BASELINE,
    Autocast,
    Decision,
    Setting,
    candidates,
    choose,
    full_precision,
    network_passes,
    probe,
    unsupported,
)
from tests.conftest import tiny_bn_net

BF16 = Setting("bf16", "contiguous")
BF16_CL = Setting("bf16", "channels_last")
FP32_CL = Setting("fp32", "channels_last")


@pytest.mark.parametrize(("timings", "expected"), [
    ({BASELINE: [1.0, 1.0, 1.0], BF16: [0.5, 0.5, 0.5], BF16_CL: [0.4, 0.4, 0.4]}, BF16_CL),  # the fastest wins
    ({BASELINE: [1.0, 1.0, 1.0], BF16: [0.95, 0.95, 0.95]}, BASELINE),  # 5% faster: inside the margin
    ({BASELINE: [1.0, 1.0, 1.0], BF16: [0.9, 0.9, 0.9]}, BF16),  # exactly the margin counts
    ({BASELINE: [0.5, 0.5, 0.5], BF16: [0.7, 0.7, 0.7]}, BASELINE),  # no native bf16: slower, stays fp32
    ({BASELINE: [1.0, 1.0], BF16: [1.0, 1.0], FP32_CL: [1.0, 1.0]}, BASELINE),  # ties stay
    ({BASELINE: [1.0, 1.0, 1.0], BF16: [0.5, 9.0, 0.5]}, BF16),  # the median ignores one disturbed pass
    ({BASELINE: [1.0, 0.1, 1.0], BF16: [0.6, 0.6, 0.6]}, BF16),  # ... on either side
])
def test_choose_keeps_the_baseline_unless_a_candidate_beats_it_by_the_margin(timings, expected) -> None:
    assert choose(timings, BASELINE, margin=0.1) == expected


def test_among_equally_fast_candidates_the_first_listed_wins() -> None:
    assert choose({BASELINE: [1.0], FP32_CL: [0.5], BF16: [0.5]}, BASELINE) == FP32_CL


def test_choose_compares_against_the_given_baseline() -> None:
    """With the precision forced to bf16, only the memory format is free: contiguous bf16 is the baseline."""
    assert choose({BF16: [1.0], BF16_CL: [0.95]}, BF16) == BF16
    assert choose({BF16: [1.0], BF16_CL: [0.5]}, BF16) == BF16_CL


def test_auto_candidates_on_the_cpu_and_pinned_knobs() -> None:
    assert candidates("cpu") == [BASELINE, FP32_CL, BF16, BF16_CL]
    assert candidates("cpu", "fp32", "auto") == [BASELINE, FP32_CL]
    assert candidates("cpu", "auto", "channels_last") == [FP32_CL, BF16_CL]
    assert candidates("cpu", "bf16", "contiguous") == [BF16]
    assert all(setting.precision != "fp16" for setting in candidates("cpu"))  # fp16 only when asked for


def test_fp16_needs_cuda() -> None:
    assert "CUDA" in unsupported("cpu", "fp16")
    assert unsupported("cpu", "bf16") is None and unsupported("cpu", "fp32") is None


def test_probe_warms_up_then_times_interleaved_rounds() -> None:
    calls = []
    timings = probe(lambda setting: lambda: calls.append(setting.name), [BASELINE, BF16], warmup=2, repeats=3)
    assert calls[:4] == ["fp32_contiguous"] * 2 + ["bf16_contiguous"] * 2  # warm-up, untimed
    assert calls[4:] == ["fp32_contiguous", "bf16_contiguous"] * 3  # rounds alternate between candidates
    assert {s: len(t) for s, t in timings.items()} == {BASELINE: 3, BF16: 3}


def test_network_passes_run_in_the_setting_and_leave_the_model_untouched() -> None:
    model = tiny_bn_net(4, 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def record(module, args, output):
        seen.append((output.dtype, module.weight.is_contiguous(memory_format=torch.channels_last)))

    model[0].register_forward_hook(record)
    make = network_passes(model, [torch.rand(8, 3, 8, 8)], "cpu", backward=True)
    make(BF16_CL)()
    make(BASELINE)()
    assert seen == [(torch.bfloat16, True), (torch.float32, False)]  # the hook was copied with the model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters()) and model[0].weight.is_contiguous()


def test_autocast_wrapper_returns_float32_and_feeds_channels_last() -> None:
    inner = nn.Conv2d(3, 4, 3)
    seen = []
    inner.register_forward_pre_hook(lambda m, args: seen.append((torch.is_autocast_enabled("cpu"),
                                                                  args[0].is_contiguous(memory_format=torch.channels_last))))
    out = Autocast(inner, BF16_CL, "cpu")(torch.rand(2, 3, 8, 8))
    assert out.dtype == torch.float32 and seen == [(True, True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 means fp32, even inside a caller's autocast
        assert Autocast(inner, BASELINE, "cpu")(torch.rand(2, 3, 8, 8)).dtype == torch.float32
    assert seen[-1] == (False, False)


def test_full_precision_switches_off_a_callers_autocast() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision():
            assert not torch.is_autocast_enabled("cpu")
            assert nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")  # restored on exit


def test_decision_record_survives_a_weights_only_checkpoint() -> None:
    decision = Decision(BF16_CL, "probe", {"fp32_contiguous": [0.2, 0.3, 0.25], "bf16_channels_last": [0.1, 0.1, 0.2]})
    buffer = io.BytesIO()
    torch.save({"precision": decision.record()}, buffer)
    buffer.seek(0)
    restored = Decision.from_record(torch.load(buffer, weights_only=True)["precision"])
    assert restored.setting == BF16_CL and restored.source == "checkpoint" and restored.timings == decision.timings
    assert decision.summary()["probe_ms"] == {"fp32_contiguous": pytest.approx(250), "bf16_channels_last": 100}


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        Setting("fp8", "contiguous")
