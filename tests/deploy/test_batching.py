"""The dynamic batcher in process, around a real onnxruntime session of the tiny classifier."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from dmat.deploy.batching import DynamicBatcher
from tests.deploy.helpers import save_tiny_classifier


class RecordingModel:
    """The tiny classifier's logits, recording the size of every call (optionally failing on a marked input)."""

    def __init__(self, path: Path, fail_above: float | None = None) -> None:
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.fail_above = fail_above
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append(len(batch))
        if self.fail_above is not None and batch.max() > self.fail_above:
            raise RuntimeError("marked input")
        return self.session.run(["logits"], {"image": batch})[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("model") / "tiny.onnx")


def batches(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size, 3, 8, 8), dtype=np.float32) * 0.5 for size in sizes]


async def run_all(batcher: DynamicBatcher, inputs: list[np.ndarray]) -> list:
    return await asyncio.gather(*(batcher.run(batch) for batch in inputs), return_exceptions=True)


def serve(model: RecordingModel, inputs: list[np.ndarray], **options) -> list:
    batcher = DynamicBatcher(model, **options)
    try:
        return asyncio.run(run_all(batcher, inputs))
    finally:
        batcher.close()


def test_concurrent_requests_share_calls_and_get_their_own_rows(tiny_model: Path) -> None:
    model = RecordingModel(tiny_model)
    inputs = batches([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    results = serve(model, inputs, max_batch=8, window_s=0.05, workers=1)
    for batch, logits in zip(inputs, results, strict=True):
        np.testing.assert_allclose(logits, model.session.run(["logits"], {"image": batch})[0], rtol=1e-6, atol=1e-6)
    assert sum(model.calls) == 24 and max(model.calls) <= 8
    assert len(model.calls) <= 4  # 24 images in calls of at most 8, none split across calls


def test_window_zero_is_one_call_per_request(tiny_model: Path) -> None:
    model = RecordingModel(tiny_model)
    serve(model, batches([1, 2, 3, 4]), max_batch=8, window_s=0, workers=2)
    assert sorted(model.calls) == [1, 2, 3, 4]


def test_a_request_that_would_overflow_the_call_waits_for_the_next(tiny_model: Path) -> None:
    model = RecordingModel(tiny_model)
    results = serve(model, batches([3, 3, 3]), max_batch=4, window_s=0.05, workers=1)
    assert model.calls == [3, 3, 3] and all(len(r) == 3 for r in results)


def test_a_model_failure_reaches_only_the_requests_of_its_call(tiny_model: Path) -> None:
    model = RecordingModel(tiny_model, fail_above=0.9)
    good = batches([2, 2])
    marked = np.full((4, 3, 8, 8), 0.95, dtype=np.float32)  # fills a call of max_batch 4 on its own
    results = serve(model, [marked, *good], max_batch=4, window_s=0.05, workers=1)
    assert isinstance(results[0], RuntimeError)
    assert [r.shape for r in results[1:]] == [(2, 3), (2, 3)]


def test_a_cancelled_request_does_not_disturb_the_others(tiny_model: Path) -> None:
    model = RecordingModel(tiny_model)
    inputs = batches([1, 1, 1])

    async def cancel_one() -> list:
        batcher = DynamicBatcher(model, max_batch=8, window_s=0.05, workers=1)
        try:
            tasks = [asyncio.ensure_future(batcher.run(batch)) for batch in inputs]
            await asyncio.sleep(0)
            tasks[1].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            batcher.close()

    results = asyncio.run(cancel_one())
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[0].shape == results[2].shape == (1, 3)
