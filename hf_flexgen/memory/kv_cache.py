"""KV cache that implements the transformers ``Cache`` interface, one object per micro-batch,
with each layer's keys and values stored in a home: the compute device, host RAM, or a file
in the offload directory. It moves and stores tensors; attention maths lives in ops/."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..policy import CPU, DEVICE, DISK
from .checkpoint import drop_page_cache, read_exact
from .prefetch import IOWorker


class DenseKVStorage:
    """Preallocated (batch, heads, capacity, head_dim) buffers on one torch device."""

    def __init__(self, storage_device: torch.device, compute_device: torch.device, pin: bool):
        self.storage_device, self.compute_device, self.pin = storage_device, compute_device, pin
        self.keys = self.values = None
        self.moves_on_read = storage_device != compute_device
        self.bytes_read = 0

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        if self.keys is None:
            b, h, _, d = keys.shape
            self.keys, self.values = (
                torch.empty(b, h, capacity, d, dtype=keys.dtype, device=self.storage_device,
                            pin_memory=self.pin)
                for _ in range(2))
        end = start + keys.shape[2]
        self.keys[:, :, start:end].copy_(keys, non_blocking=True)
        self.values[:, :, start:end].copy_(values, non_blocking=True)

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (batch, heads, end, head_dim) on the compute device
        if self.moves_on_read:
            self.bytes_read += 2 * self.keys[:, :, :end].numel() * self.keys.element_size()
        return (self.keys[:, :, :end].to(self.compute_device, non_blocking=True),
                self.values[:, :, :end].to(self.compute_device, non_blocking=True))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def close(self) -> None:
        self.keys = self.values = None


class DiskKVStorage:
    """Keys and values in one file, token-major (capacity, batch, heads, head_dim) so that
    appending a token is one contiguous write; reads drop the page cache afterwards."""

    def __init__(self, directory: Path, compute_device: torch.device):
        directory.mkdir(parents=True, exist_ok=True)
        handle, self.path = tempfile.mkstemp(prefix="kv_", suffix=".bin", dir=directory)
        os.close(handle)
        self.fd = os.open(self.path, os.O_RDWR)
        self.compute_device = compute_device
        self.row_shape = self.dtype = None
        self.capacity = 0
        self.moves_on_read = True
        self.bytes_read = 0

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        if self.row_shape is None:
            b, h, _, d = keys.shape
            self.row_shape, self.dtype, self.capacity = (b, h, d), keys.dtype, capacity
            os.ftruncate(self.fd, 2 * capacity * self.row_bytes)
        for region, tensor in enumerate((keys, values)):
            rows = tensor.permute(2, 0, 1, 3).contiguous().cpu()  # (tokens, batch, heads, head_dim)
            offset = region * self.capacity * self.row_bytes + start * self.row_bytes
            data = rows.view(-1).view(torch.uint8).numpy()
            written = 0
            while written < data.nbytes:
                written += os.pwrite(self.fd, data[written:], offset + written)

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for region in range(2):
            rows = torch.empty(end, *self.row_shape, dtype=self.dtype)
            offset = region * self.capacity * self.row_bytes
            read_exact(self.fd, memoryview(rows.view(-1).view(torch.uint8).numpy()), offset)
            drop_page_cache(self.fd, offset, end * self.row_bytes)
            self.bytes_read += end * self.row_bytes
            out.append(rows.permute(1, 2, 0, 3).to(self.compute_device))  # (batch, heads, end, head_dim)
        return out[0], out[1]

    @property
    def row_bytes(self) -> int:
        b, h, d = self.row_shape
        return b * h * d * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 0 if self.row_shape is None else 2 * self.capacity * self.row_bytes

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = None


def make_storage(home: str, device: torch.device, directory: Path | None):
    if home == DEVICE:
        return DenseKVStorage(device, device, pin=False)
    if home == CPU:
        return DenseKVStorage(torch.device("cpu"), device, pin=device.type == "cuda")
    if directory is None:
        raise ValueError("a KV cache homed on disk needs an offload directory (offload_dir=...)")
    return DiskKVStorage(Path(directory), device)


class OffloadedKVLayer(CacheLayerMixin):
    """One decoder layer's cache of one micro-batch, kept in its storage home.

    For homes whose reads move data (disk; host RAM when computing on a GPU) the stored past
    can be read ahead with ``prefetch_past()`` and new tokens are stored in the background;
    both go through the same FIFO I/O worker, so a read always sees earlier writes."""

    is_sliding = False
    is_compileable = False

    def __init__(self, storage, capacity: int, io: IOWorker):
        super().__init__()
        self.storage, self.capacity, self.io, self.length = storage, capacity, io, 0
        self._past = None  # pending read of the stored past, from prefetch_past()
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage allocates itself
        pass

    def prefetch_past(self) -> None:
        if self.storage.moves_on_read and self.length and self._past is None:
            self._past = self.io.submit(self.storage.read, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, new = self.length, key_states.shape[-2]
        if start + new > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({start} + {new})")
        if not self.storage.moves_on_read:  # resident next to compute: append in place, view
            self.storage.write(start, key_states, value_states, self.capacity)
            self.length = start + new
            return self.storage.read(self.length)
        if start:
            self.prefetch_past()  # no-op when already prefetched
            past_keys, past_values = self.io.wait(self._past)
        self._past = None
        self.length = start + new
        self.io.submit(self.storage.write, start, key_states, value_states, self.capacity)
        if not start:
            return key_states, value_states
        return torch.cat([past_keys, key_states], dim=-2), torch.cat([past_values, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0


class FlexKVCache(Cache):
    """The cache of one micro-batch: a list of per-layer caches, each in its own home."""

    def __init__(self, homes: list[str], capacity: int, device: torch.device,
                 directory: Path | None, io: IOWorker):
        super().__init__(layers=[OffloadedKVLayer(make_storage(h, device, directory), capacity, io)
                                 for h in homes])
        self.homes = list(homes)

    def nbytes_by_home(self) -> dict[str, int]:
        totals = {DEVICE: 0, CPU: 0, DISK: 0}
        for home, layer in zip(self.homes, self.layers):
            totals[home] += layer.storage.nbytes
        return totals

    @property
    def bytes_read(self) -> int:
        return sum(layer.storage.bytes_read for layer in self.layers)

    def close(self) -> None:
        for layer in self.layers:
            layer.storage.close()
