"""Every registered classifier: shapes, logits, gradients, normalisation buffers, parameter counts."""

import pytest
import torch

from dmat.core.classifiers import CLASSIFIERS, DATASET_STATS, build_classifier

MEAN, STD = DATASET_STATS["cifar10"]
SLOW = {"wrn-70-16"}
REGISTRY = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in CLASSIFIERS]


def _build(name: str, num_classes: int = 10) -> torch.nn.Module:
    return build_classifier(name, num_classes=num_classes, mean=MEAN, std=STD)


def _build_on_meta(name: str) -> torch.nn.Module:
    """Structure without memory or initialisation cost: enough to count parameters and list keys."""
    with torch.device("meta"):
        return _build(name)


@pytest.mark.parametrize("name", REGISTRY)
def test_forward_gives_logits_and_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name, num_classes=7).train()
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    # Logits, not probabilities: unconstrained sign, rows do not sum to one.
    assert (logits < 0).any() and not torch.allclose(logits.sum(dim=1), torch.ones(2))
    logits.square().sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", ["wrn-16-1", "preact-resnet18"])
def test_forward_is_head_of_features(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name).eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (3, model.feature_dim)
    torch.testing.assert_close(model(x), model.head(features))


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_normalisation_buffers_are_in_state_dict(name: str) -> None:
    state = _build_on_meta(name).state_dict()
    assert state["normalize.mean"].shape == (1, 3, 1, 1)
    assert state["normalize.std"].shape == (1, 3, 1, 1)


def test_normalisation_uses_given_constants_and_moves_with_the_model() -> None:
    model = _build("wrn-16-1")
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(STD))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(
        model.normalize(x), (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    )
    model.to(torch.float64)
    assert model.normalize.mean.dtype == torch.float64 and model.normalize.std.dtype == torch.float64
    assert model(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrn-28-10", 36.5e6),
        ("wrn-70-16", 267e6),
        ("wrn-16-1", 0.175e6),
        ("wrn-16-4", 2.75e6),
        ("preact-resnet18", 11.2e6),
    ],
)
def test_parameter_counts(name: str, expected: float) -> None:
    # Paper figures: WRN-28-10 36.5M, WRN-70-16 267M (Wang et al. 2023, table 1).
    count = sum(p.numel() for p in _build_on_meta(name).parameters())
    assert count == pytest.approx(expected, rel=0.005)


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="wrn-16-1"):
        _build("wrn-99-1")
