"""Concurrent calls gathered into batches for one worker thread.

HELM calls a client's ``make_request`` once per request, from ``--num-threads`` threads. The
batcher lets each call wait while one worker runs the waiting requests that share a key
together (up to ``max_batch``, after waiting at most ``wait_s`` for more to arrive), so a block
of the schedule fills with many requests; the model is only ever used from the worker.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable


class _Pending:
    def __init__(self, item):
        self.item, self.result, self.error = item, None, None
        self.done = threading.Event()


class RequestBatcher:
    def __init__(self, run_batch: Callable[[Hashable, list], list], max_batch: int, wait_s: float = 0.05):
        if max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self._queues: dict[Hashable, list[_Pending]] = {}
        self._cond = threading.Condition()
        self.batch_sizes: list[int] = []  # what ran, for logs and tests
        threading.Thread(target=self._loop, name="hf_flexgen-batcher", daemon=True).start()

    def submit(self, key: Hashable, item):
        """Run ``item`` in a batch of items with the same ``key``; returns its result (or raises
        the batch's error)."""
        pending = _Pending(item)
        with self._cond:
            self._queues.setdefault(key, []).append(pending)
            self._cond.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _take_batch(self) -> tuple[Hashable, list[_Pending]]:
        with self._cond:
            while not self._queues:
                self._cond.wait()
            deadline = time.monotonic() + self.wait_s
            while max(len(q) for q in self._queues.values()) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = max(self._queues, key=lambda k: len(self._queues[k]))
            batch, rest = self._queues[key][:self.max_batch], self._queues[key][self.max_batch:]
            if rest:
                self._queues[key] = rest
            else:
                del self._queues[key]
            return key, batch

    def _loop(self) -> None:
        while True:
            key, batch = self._take_batch()
            self.batch_sizes.append(len(batch))
            try:
                results = self.run_batch(key, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
                for p, r in zip(batch, results):
                    p.result = r
            except Exception as err:  # noqa: BLE001  (every caller of the batch gets the error)
                for p in batch:
                    p.error = err
            finally:
                for p in batch:
                    p.done.set()
