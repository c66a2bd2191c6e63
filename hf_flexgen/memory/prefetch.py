"""Background I/O: one worker thread runs fetches and stores in submission order (so a read
submitted after a write to the same file sees it), while the caller computes. On CUDA the
worker copies on its own stream and the consumer waits on an event, not on the host."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class _Done:
    """A finished 'future' for the serial path."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class IOWorker:
    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hf_flexgen_io") if enabled else None
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.wait_s = 0.0

    def submit(self, fn, *args):
        if self.pool is None:
            start = time.perf_counter()
            value = fn(*args)
            self.wait_s += time.perf_counter() - start  # serial I/O is all waiting
            return _Done((value, None))
        return self.pool.submit(self._run, fn, *args)

    def _run(self, fn, *args):
        if self.stream is None:
            return fn(*args), None
        with torch.cuda.stream(self.stream):
            value = fn(*args)
            event = torch.cuda.Event()
            event.record(self.stream)
        return value, event

    def wait(self, future: Future | _Done):
        start = time.perf_counter()
        value, event = future.result()
        if self.pool is not None:
            self.wait_s += time.perf_counter() - start
        if event is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(event)
            _record_stream(value, compute)
        return value

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _record_stream(value, stream) -> None:
    """Tell the caching allocator that tensors made on the copy stream are used on ``stream``."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record_stream(v, stream)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _record_stream(v, stream)
