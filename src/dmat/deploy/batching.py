"""Dynamic batching: concurrent requests gathered into one model call, each answer split back to its request.

Requests join one queue. Each of `workers` threads takes the oldest request, then gathers the
next ones in arrival order until the call would exceed `max_batch` images or the first request
has waited `window_s`; requests that queued while every thread was busy join at once, without
waiting. The thread runs the model on the concatenation (onnxruntime releases the GIL meanwhile)
and hands every request exactly its own rows, in order. An exception from the model reaches every
request of that call and no other. `window_s` = 0 turns gathering off: every request is its own
model call. The queue has no bound of its own: the HTTP server bounds how many requests are open.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Pending:
    batch: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


class DynamicBatcher:
    """`await batcher.run(batch)` -> the model's output rows for `batch`, computed together with concurrent requests.

    `observe(images, seconds)`, when given, is called from the worker thread after every model call.
    """

    def __init__(self, model: Callable[[Any], Any], *, max_batch: int, window_s: float, workers: int,
                 observe: Callable[[int, float], None] | None = None) -> None:
        self._model = model
        self._max_batch = max_batch
        self._window_s = window_s
        self._observe = observe
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"dmat-batch-{index}", daemon=True)
                         for index in range(workers)]
        for thread in self._threads:
            thread.start()

    async def run(self, batch: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Pending(batch, future, loop, time.monotonic()))
        return await future

    def close(self) -> None:
        """Finish the calls in progress and stop the threads (requests still queued behind the stop are dropped)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        held = None
        while True:
            first = held if held is not None else self._queue.get()
            if first is None:
                return
            pending, held = self._gather(first)
            if pending:
                self._call(pending)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        """The requests of one call (cancelled ones left out) and a request that did not fit, kept for the next."""
        pending = [first] if not first.future.cancelled() else []
        images = len(first.batch)
        if self._window_s > 0:
            self._wait_for_company(first, images)
        while self._window_s > 0 and images < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # a stop signal: this thread takes it back after this call
                break
            if item.future.cancelled():
                continue
            if images + len(item.batch) > self._max_batch:
                return pending, item
            pending.append(item)
            images += len(item.batch)
        return pending, None

    def _wait_for_company(self, first: _Pending, images: int) -> None:
        """Sleep until `first` has waited the window, or until enough requests queue to fill the call.

        Sleeping rather than waking at every arrival keeps this thread off the GIL while the event
        loop decodes the requests that will join.
        """
        deadline = first.arrived + self._window_s
        while (remaining := deadline - time.monotonic()) > 0 and self._queue.qsize() < self._max_batch - images:
            time.sleep(min(remaining, self._window_s / 4))

    def _call(self, pending: list[_Pending]) -> None:
        import numpy as np

        batch = pending[0].batch if len(pending) == 1 else np.concatenate([item.batch for item in pending])
        started = time.perf_counter()
        try:
            outputs = self._model(batch)
        except Exception as err:  # the requests of this call answer 500; the thread serves the next call
            for item in pending:
                item.loop.call_soon_threadsafe(_fail, item.future, err)
            return
        if self._observe is not None:
            self._observe(len(batch), time.perf_counter() - started)
        rows, offset = [], 0
        for item in pending:
            rows.append(outputs[offset:offset + len(item.batch)])
            offset += len(item.batch)
        # One wake-up of each event loop per call, not one per request.
        for loop in {item.loop for item in pending}:
            mine = [(item.future, row) for item, row in zip(pending, rows, strict=True) if item.loop is loop]
            loop.call_soon_threadsafe(_deliver, mine)


def _deliver(answers: list[tuple[asyncio.Future, Any]]) -> None:
    for future, rows in answers:
        if not future.done():  # cancelled meanwhile: its client went away
            future.set_result(rows)


def _fail(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)
