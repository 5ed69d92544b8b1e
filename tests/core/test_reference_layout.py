"""The reference's WideResNet checkpoints load into DMAT's networks with identical logits, whatever wrappers its trainer
added, and anything else is refused naming the keys and shapes. Checkpoints here are built with DMAT's own networks
in the reference's key layout (docs/published.md); benchmarks/reference_checkpoint_check.py checks the same against
the reference's own code."""

from __future__ import annotations

import pytest
import torch

from dmat.core.classifiers import DATASET_STATS, build_classifier, wide_resnet
from dmat.core.reference_layout import (
    NORMALIZATION_BUFFERS,
    REFERENCE_INPUT_NORMALIZATION,
    LayoutMismatch,
    load_reference_weights,
    reference_name,
)

MEAN, STD = DATASET_STATS["cifar10"]


def trained_like(name: str = "wrn-16-1", num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A registry network with every weight and BatchNorm statistic random (so a swapped BatchNorm would show)."""
    torch.manual_seed(seed)
    model = build_classifier(name, num_classes=num_classes, mean=MEAN, std=STD)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif key.endswith(("running_mean", "bias")) or (".bn" in f".{key}" and key.endswith("weight")):
                tensor.uniform_(-0.5, 0.5) if not key.endswith("weight") else tensor.uniform_(0.75, 1.25)
    return model.eval()


def in_reference_layout(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + reference_name(key): value.clone() for key, value in model.state_dict().items()
            if key not in NORMALIZATION_BUFFERS}


def documented_reference_keys(depth: int, width: int) -> set[str]:
    """The reference's state-dict keys of WRN-depth-width, from the layout facts in docs/published.md."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"init_conv.weight", "logits.weight", "logits.bias", *(f"batchnorm.{p}" for p in bn)}
    channels = [16, 16 * width, 32 * width, 64 * width]
    for group in range(3):
        for block in range((depth - 4) // 6):
            stem = f"layer.{group}.block.{block}"
            keys |= {f"{stem}.conv_0.weight", f"{stem}.conv_1.weight",
                     *(f"{stem}.batchnorm_{i}.{p}" for i in (0, 1) for p in bn)}
            if block == 0 and channels[group] != channels[group + 1]:
                keys.add(f"{stem}.shortcut.weight")
    return keys


@pytest.mark.parametrize(("name", "depth", "width"), [("wrn-16-1", 16, 1), ("wrn-28-10", 28, 10),
                                                      ("wrn-70-16", 70, 16)])
def test_dmat_names_map_onto_the_documented_reference_keys(name: str, depth: int, width: int) -> None:
    with torch.device("meta"):
        model = build_classifier(name, num_classes=10, mean=MEAN, std=STD)
    names = [reference_name(k) for k in model.state_dict() if k not in NORMALIZATION_BUFFERS]
    assert len(names) == len(set(names)) and set(names) == documented_reference_keys(depth, width)


@pytest.mark.parametrize("prefix", ["module.0.", "0.", "module.", ""])
def test_reference_weights_give_identical_logits_with_or_without_wrappers(prefix: str) -> None:
    source = trained_like()
    imported = build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD).eval()
    layout = load_reference_weights(imported, in_reference_layout(source, prefix))
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(imported(x), source(x))
    assert layout.prefix == prefix and layout.data_parallel == prefix.startswith("module.")
    assert not layout.input_normalization


def test_a_normalization_module_before_the_network_is_folded_in() -> None:
    """`--normalize`: Sequential(Normalization(dataset table), network): the input is normalised twice."""
    source = trained_like(seed=1)
    outer_mean, outer_std = (torch.tensor(v).view(1, 3, 1, 1) for v in REFERENCE_INPUT_NORMALIZATION["cifar10"])
    imported = build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD).eval()
    state = in_reference_layout(source, "module.1.")
    with pytest.raises(LayoutMismatch, match="Normalization module before the network"):
        load_reference_weights(imported, state)
    layout = load_reference_weights(imported, state, REFERENCE_INPUT_NORMALIZATION["cifar10"])
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(imported(x), source((x - outer_mean) / outer_std), rtol=0, atol=1e-5)
    assert layout.input_normalization and layout.sequential_index == 1


@pytest.mark.parametrize(("weights", "target", "message"), [
    (lambda: trained_like("wrn-16-4"), lambda: build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD),
     r"^1 unexpected: layer\.0\.block\.0\.shortcut\.weight; 63 with another shape: batchnorm\.bias \(256,\) "
     r"\(expected \(64,\)\)"),
    (lambda: wide_resnet(10, 1, num_classes=10, mean=MEAN, std=STD),
     lambda: build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD),
     r"^\d+ missing: layer\.0\.block\.1\.batchnorm_0\.bias"),
    (lambda: build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD),
     lambda: wide_resnet(10, 1, num_classes=10, mean=MEAN, std=STD), r"^\d+ unexpected: layer\.0\.block\.1\."),
    (lambda: trained_like(num_classes=100), lambda: build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD),
     r"logits\.bias \(100,\) \(expected \(10,\)\), logits\.weight \(100, 64\) \(expected \(10, 64\)\)"),
], ids=["wider", "shallower", "deeper", "other class count"])
def test_another_architecture_is_refused_naming_keys_and_shapes(weights, target, message: str) -> None:
    model = target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayoutMismatch, match=message):
        load_reference_weights(model, in_reference_layout(weights(), "module.0."))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused load changed the model"


def test_mixed_wrapper_prefixes_and_non_tensors_are_refused() -> None:
    source = trained_like()
    model = build_classifier("wrn-16-1", num_classes=10, mean=MEAN, std=STD)
    state = in_reference_layout(source, "module.0.")
    state["module.1.extra"] = torch.zeros(1)
    with pytest.raises(LayoutMismatch, match="different wrapper prefixes"):
        load_reference_weights(model, state)
    state = in_reference_layout(source, "")
    state["logits.bias"] = [0.0] * 10
    with pytest.raises(LayoutMismatch, match="not tensors"):
        load_reference_weights(model, state)
