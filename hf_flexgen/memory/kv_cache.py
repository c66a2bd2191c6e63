"""KV cache that implements the transformers ``Cache`` interface, one object per micro-batch,
with each layer's keys and values stored in a home: the compute device, host RAM, or a file
in the offload directory. It moves and stores tensors; attention maths lives in ops/."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops.quantize import QuantizedTensor, dequantize, quantize
from ..policy import CPU, DEVICE, DISK, CompressionConfig
from .checkpoint import drop_page_cache, read_exact
from .prefetch import IOWorker


class DenseKVStorage:
    """Preallocated (batch, heads, capacity, ...) buffers, one per part, on one torch device."""

    def __init__(self, storage_device: torch.device, compute_device: torch.device, pin: bool):
        self.storage_device, self.compute_device, self.pin = storage_device, compute_device, pin
        self.buffers: list[torch.Tensor] | None = None
        self.moves_on_read = storage_device != compute_device
        self.bytes_read = 0

    def write(self, start: int, parts: list[torch.Tensor], capacity: int) -> None:
        # each part: (batch, heads, new_tokens, ...)
        if self.buffers is None:
            self.buffers = [torch.empty(*p.shape[:2], capacity, *p.shape[3:], dtype=p.dtype,
                                        device=self.storage_device, pin_memory=self.pin)
                            for p in parts]
        end = start + parts[0].shape[2]
        for buffer, part in zip(self.buffers, parts):
            buffer[:, :, start:end].copy_(part, non_blocking=True)

    def read(self, end: int) -> list[torch.Tensor]:
        """Every part's first ``end`` tokens on the compute device."""
        views = [b[:, :, :end] for b in self.buffers]
        if self.moves_on_read:
            self.bytes_read += sum(v.numel() * v.element_size() for v in views)
        return [v.to(self.compute_device, non_blocking=True) for v in views]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers or [])

    def close(self) -> None:
        self.buffers = None


class DiskKVStorage:
    """All parts in one file, each in its own token-major region (capacity, batch, heads, ...)
    so that appending a token is one contiguous write per part; reads drop the page cache."""

    def __init__(self, directory: Path, compute_device: torch.device):
        directory.mkdir(parents=True, exist_ok=True)
        handle, self.path = tempfile.mkstemp(prefix="kv_", suffix=".bin", dir=directory)
        os.close(handle)
        self.fd = os.open(self.path, os.O_RDWR)
        self.compute_device = compute_device
        self.layout: list[tuple[tuple[int, ...], torch.dtype, int]] | None = None  # row shape, dtype, offset
        self.capacity = 0
        self.moves_on_read = True
        self.bytes_read = 0

    def write(self, start: int, parts: list[torch.Tensor], capacity: int) -> None:
        if self.layout is None:
            self.capacity, offset, self.layout = capacity, 0, []
            for p in parts:
                row = (p.shape[0], p.shape[1], *p.shape[3:])
                self.layout.append((row, p.dtype, offset))
                offset += capacity * _row_bytes(row, p.dtype)
            os.ftruncate(self.fd, offset)
        for (row, dtype, region), part in zip(self.layout, parts):
            rows = part.movedim(2, 0).contiguous().cpu()  # (tokens, batch, heads, ...)
            data = rows.view(-1).view(torch.uint8).numpy()
            offset, written = region + start * _row_bytes(row, dtype), 0
            while written < data.nbytes:
                written += os.pwrite(self.fd, data[written:], offset + written)

    def read(self, end: int) -> list[torch.Tensor]:
        out = []
        for row, dtype, region in self.layout:
            rows = torch.empty(end, *row, dtype=dtype)
            read_exact(self.fd, memoryview(rows.view(-1).view(torch.uint8).numpy()), region)
            drop_page_cache(self.fd, region, end * _row_bytes(row, dtype))
            self.bytes_read += end * _row_bytes(row, dtype)
            out.append(rows.movedim(0, 2).to(self.compute_device))  # (batch, heads, end, ...)
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.capacity * _row_bytes(row, dtype) for row, dtype, _ in self.layout or [])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = None


def _row_bytes(row: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(row) * dtype.itemsize


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

    def __init__(self, storage, capacity: int, io: IOWorker,
                 compression: CompressionConfig | None = None):
        super().__init__()
        self.storage, self.capacity, self.io, self.length = storage, capacity, io, 0
        self.compression = compression
        self._past = None  # pending read of the stored past, from prefetch_past()
        self.is_initialized = True

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
        if self.compression is None:
            return [keys, values]
        parts = []
        for t in (keys, values):  # groups along head_dim: each token's row stands alone
            q = quantize(t, self.compression)
            parts += [q.data, q.scale, q.minimum]
        return parts

    def _decode(self, parts: list[torch.Tensor], dtype: torch.dtype):
        if self.compression is None:
            return parts[0], parts[1]
        out = []
        for data, scale, minimum in (parts[:3], parts[3:]):
            shape = (*data.shape[:3], self.head_dim)
            out.append(dequantize(QuantizedTensor(data, scale, minimum, shape, self.compression), dtype))
        return out[0], out[1]

    def lazy_initialization(self, key_states, value_states) -> None:  # storage allocates itself
        pass

    def prefetch_past(self) -> None:
        if self.storage.moves_on_read and self.length and self._past is None:
            self._past = self.io.submit(self.storage.read, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens; return (past + new) keys and values on the compute device.
        With compression the stored past comes back dequantized while this step's new
        tokens enter attention exactly (as FlexGen does)."""
        start, new = self.length, key_states.shape[-2]
        if start + new > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({start} + {new})")
        self.head_dim, dtype = key_states.shape[-1], key_states.dtype
        parts = self._encode(key_states, value_states)
        past = None
        if not self.storage.moves_on_read:  # resident next to compute: append in place
            self.storage.write(start, parts, self.capacity)
            self.length = start + new
            if self.compression is None:
                return tuple(self.storage.read(self.length))  # views, no copy
            if start:
                past = self._decode(self.storage.read(start), dtype)
        else:
            if start:
                self.prefetch_past()  # no-op when already prefetched
                past = self._decode(self.io.wait(self._past), dtype)
            self._past = None
            self.length = start + new
            self.io.submit(self.storage.write, start, parts, self.capacity)
        if past is None:
            return key_states, value_states
        return (torch.cat([past[0], key_states], dim=-2),
                torch.cat([past[1], value_states], dim=-2))

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
                 directory: Path | None, io: IOWorker, compression: CompressionConfig | None = None):
        super().__init__(layers=[OffloadedKVLayer(make_storage(h, device, directory), capacity, io,
                                                  compression) for h in homes])
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
