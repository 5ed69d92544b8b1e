"""Every path that scores or generates runs in true float32 with deterministic kernels, whatever training set.

Training turns TF32 and cuDNN's autotuner on process-wide (`training_network` on CUDA), and a caller may
hold autocast open. The flags are plain process state, readable without a GPU: a spy network records them at
every forward, and each scoring path must show TF32 off, autocast off, cuDNN deterministic and not autotuning.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dmat.config import parse_params
from dmat.core.classifiers import build_classifier
from dmat.core.denoisers import build_denoiser
from dmat.core.precision import Autocast, Decision, Setting, exact_kernels, unsupported
from dmat.core.robustness import evaluate_robustness
from dmat.data.store import ArrayStore, write_store
from dmat.distributed import World
from dmat.stage_setup import training_network
from dmat.stages import evaluate_diffusion, generate, train_reference
from dmat.stages.train import Trainer
from tests.conftest import class_image, tiny_bn_net
from tests.core.test_robustness import settings

CLASSES = ("apple", "banana", "cherry")
EXACT = {"matmul_tf32": False, "cudnn_tf32": False, "cudnn_deterministic": True, "cudnn_benchmark": False,
         "autocast_cpu": False, "autocast_cuda": False}


def kernel_flags() -> dict[str, bool]:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "autocast_cpu": torch.is_autocast_enabled("cpu"), "autocast_cuda": torch.is_autocast_enabled("cuda")}


class FlagSpy(nn.Module):
    """`module` (a classifier or a denoiser), recording the kernel flags at every call."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.seen = module, []

    def forward(self, *args):
        self.seen.append(kernel_flags())
        return self.module(*args)

    def features(self, x):
        self.seen.append(kernel_flags())
        return self.module.features(x)

    def head(self, features):
        return self.module.head(features)


@pytest.fixture
def training_flags():
    """The flags as a CUDA training stage leaves them (set on the CPU too: they are plain process state),
    restored afterwards."""
    saved = kernel_flags()
    training_network(tiny_bn_net(4, 3), Decision(Setting(), "requested"), World(0, 1, "cuda"), compile=False)
    assert kernel_flags() | {"autocast_cpu": False, "autocast_cuda": False} == {
        "matmul_tf32": True, "cudnn_tf32": True, "cudnn_deterministic": False, "cudnn_benchmark": True,
        "autocast_cpu": False, "autocast_cuda": False}
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved["matmul_tf32"], saved["cudnn_tf32"]
    torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArrayStore:
    images = np.stack([class_image(label, i, size=8) for label in range(3) for i in range(4)])
    return write_store(tmp_path_factory.mktemp("store") / "store", images, np.repeat(np.arange(3), 4), CLASSES,
                       {"kind": "test"})


def classifier() -> FlagSpy:
    return FlagSpy(tiny_bn_net(4, 3).eval())


def wide_resnet() -> FlagSpy:
    """A registry classifier: it has the `features` and `head` that feature passes use."""
    torch.manual_seed(0)
    return FlagSpy(build_classifier("wrn-16-1", num_classes=3, mean=[0.5] * 3, std=[0.25] * 3).eval())


def denoiser() -> FlagSpy:
    torch.manual_seed(0)
    return FlagSpy(build_denoiser("unet-tiny", img_resolution=8, in_channels=3, num_classes=3).eval())


def assert_exact(spy: FlagSpy) -> None:
    assert spy.seen, "the path never called the network"
    assert all(flags == EXACT for flags in spy.seen), spy.seen[0]


PARAMS = parse_params({
    "train": {"val_limit": 6, "val_attack_steps": 1},
    "evaluate_diffusion": {"n_denoiser": 4, "sigmas": [0.5], "attack_steps": 1, "batch_size": 4},
    "generate": {"steps": 2, "network_batch": 4},
})


def test_train_validation(training_flags, store: ArrayStore) -> None:
    spy = classifier()
    trainer = SimpleNamespace(cfg=PARAMS.train, world=World(0, 1, "cpu"), val=store, params=PARAMS,
                              ema=SimpleNamespace(module=spy))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Trainer.validate(trainer)
    assert_exact(spy)


def test_train_reference_checkpoint_selection_and_headline(training_flags, store: ArrayStore) -> None:
    spy = classifier()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_reference.correct_per_class(spy, store, np.arange(len(store)), "cpu")
    assert_exact(spy)


def test_generate_filter_scorer(training_flags, store: ArrayStore) -> None:
    spy = classifier()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate.conditioning_confidence(spy, store, 5, "cpu")
    assert_exact(spy)


def test_generation_in_fp32_is_true_fp32(training_flags) -> None:
    """Sampling in the recorded fp32 setting: no TF32, deterministic cuDNN (autocast is the setting's)."""
    spy = denoiser()
    network = generate.FixedBatchDenoiser(Autocast(spy, Setting("fp32"), "cpu"), 4)
    generate.sample(network, PARAMS, np.array([0, 1]), np.array([0, 0]), (3, 8, 8), "cpu")
    assert_exact(spy)


def test_evaluate_diffusion_denoiser_and_sample_quality(training_flags, store: ArrayStore) -> None:
    spy = denoiser()
    evaluate_diffusion.denoiser_metrics(spy.requires_grad_(False), store, PARAMS, "cpu")
    assert_exact(spy)
    reference = wide_resnet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluate_diffusion._feature_pass(reference, None, store, np.arange(len(store)), 5, "cpu")
    assert_exact(reference)


def test_evaluate_autoattack(training_flags, store: ArrayStore) -> None:
    spy = classifier()
    images, labels = store.read(np.arange(6))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    evaluate_robustness(spy, x, torch.from_numpy(labels), CLASSES, settings(sweep=(0.05,), sweep_steps=1))
    assert_exact(spy)


def test_the_flags_come_back_after_an_exact_section(training_flags) -> None:
    before = kernel_flags()
    with exact_kernels():
        assert kernel_flags() | {"autocast_cpu": False, "autocast_cuda": False} == EXACT
    assert kernel_flags() == before


def test_bf16_on_cuda_needs_it_in_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch counts emulated bf16 (V100, T4: slower than fp32) as supported unless asked not to."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert "no native bf16" in unsupported("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert unsupported("cuda", "bf16") is None
