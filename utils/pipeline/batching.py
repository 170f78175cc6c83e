"""Dynamic micro-batching: requests that arrive within a few milliseconds share one batched model pass.

Each model gets one worker thread that owns it, so the CPU is not oversubscribed by many request threads each
running their own small forward/backward (a model would be safe to share: its passes keep no state on it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

import numpy as np

from male_boneage.inference import BoneAgeModel, ModelEstimate

logger = logging.getLogger(__name__)
_STOP = object()  # queued by `stop`: the worker finishes the batch in hand and exits
_Item = tuple[np.ndarray, Future[ModelEstimate]]


class MicroBatcher:
    """Collects images for one model and runs them in batches of at most `max_batch` images."""

    def __init__(self, model: BoneAgeModel, name: str, max_batch: int = 8, max_wait_ms: float = 2.0) -> None:
        self.model = model
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self.batches = 0
        self.images = 0
        self._observers: list[Callable[[int], None]] = []

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker thread is running (started and not stopped or dead)."""
        return self._thread.is_alive()

    def observe_batches(self, observer: Callable[[int], None]) -> None:
        """Call `observer(batch size)` on the worker thread for every batch, before its pass; an observer's error
        is logged and never reaches the requests."""
        self._observers.append(observer)

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def submit(self, pixels: np.ndarray) -> Future[ModelEstimate]:
        """Queue one preprocessed image; the future gets its estimate (with heatmap)."""
        future: Future[ModelEstimate] = Future()
        self._queue.put((pixels, future))
        return future

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(cast(_Item, item))
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch, stopping = self._collect(cast(_Item, item))
            self._notify(len(batch))
            futures = [future for _, future in batch]
            try:
                estimates = self.model.predict_batch([pixels for pixels, _ in batch], with_heatmap=True)
            except Exception as exc:  # the requests get the error; the worker lives on
                logger.exception("batched inference failed for %d images", len(batch))
                for future in futures:
                    future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            for future, estimate in zip(futures, estimates, strict=True):
                future.set_result(estimate)

    def _notify(self, size: int) -> None:
        for observer in self._observers:
            try:
                observer(size)
            except Exception:
                logger.exception("batch observer failed")
