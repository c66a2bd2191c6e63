"""KV cache that implements the transformers ``Cache`` interface, one object per micro-batch,
with each layer's keys and values stored in a home: the compute device, host RAM, or a file
in the offload directory. It moves and stores tensors; attention maths lives in ops/."""
from __future__ import annotations

import errno
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops.quantize import QuantizedTensor, dequantize, quantize
from ..policy import CPU, DEVICE, DISK, CompressionConfig
from .checkpoint import drop_page_cache, read_exact, write_back
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

    def read(self, end: int, parts=None, device: torch.device | None = None) -> list[torch.Tensor]:
        """The first ``end`` tokens of every part (or of ``parts``), on ``device`` (default:
        the compute device)."""
        device = device or self.compute_device
        views = [self.buffers[i][:, :, :end] for i in (parts or range(len(self.buffers)))]
        if device != self.storage_device:
            self.bytes_read += sum(v.numel() * v.element_size() for v in views)
        return [v.to(device, non_blocking=True) for v in views]

    def gather(self, parts, index: tuple[torch.Tensor, ...], device: torch.device) -> list[torch.Tensor]:
        """Rows ``buffer[batch, head, token]`` of ``parts`` only, moved to ``device``."""
        index = tuple(i.to(self.storage_device) for i in index)
        rows = [self.buffers[i][index] for i in parts]
        if device != self.storage_device:
            self.bytes_read += sum(r.numel() * r.element_size() for r in rows)
        return [r.to(device, non_blocking=True) for r in rows]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers or [])

    def close(self) -> None:
        self.buffers = None


class DiskKVStorage:
    """All parts in one file, each in its own token-major region (capacity, batch, heads, ...)
    so that appending a token is one contiguous write per part. Writes are written back at
    once and reads drop the page cache: the cache costs no hidden memory, and every read
    comes from the disk, as the cost model prices it."""

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
            _allocate(self.fd, offset)
        for (row, dtype, region), part in zip(self.layout, parts):
            rows = part.movedim(2, 0).contiguous().cpu()  # (tokens, batch, heads, ...)
            data = rows.view(-1).view(torch.uint8).numpy()
            offset, written = region + start * _row_bytes(row, dtype), 0
            while written < data.nbytes:
                written += os.pwrite(self.fd, data[written:], offset + written)
            write_back(self.fd, offset, data.nbytes)

    def read(self, end: int, parts=None, device: torch.device | None = None) -> list[torch.Tensor]:
        out = []
        for i in parts or range(len(self.layout)):
            row, dtype, region = self.layout[i]
            rows = torch.empty(end, *row, dtype=dtype)
            read_exact(self.fd, memoryview(rows.view(-1).view(torch.uint8).numpy()), region)
            drop_page_cache(self.fd, region, end * _row_bytes(row, dtype))
            self.bytes_read += end * _row_bytes(row, dtype)
            out.append(rows.movedim(0, 2).to(device or self.compute_device))  # (batch, heads, end, ...)
        return out

    def gather(self, parts, index: tuple[torch.Tensor, ...], device: torch.device) -> list[torch.Tensor]:
        """Token-major rows hold every (batch, head): selected rows cost whole-part reads here."""
        end = int(index[2].max()) + 1
        return [full[tuple(i.to(full.device) for i in index)].to(device)
                for full in self.read(end, parts, device)]

    @property
    def nbytes(self) -> int:
        return sum(self.capacity * _row_bytes(row, dtype) for row, dtype, _ in self.layout or [])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = None


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front (appends then write data only), where the file
    system can; else just set the size. A full disk is an error now, not mid-generation."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(error.errno, f"no room for a {size / 2**20:.1f} MiB KV cache file in the "
                          "offload directory; free disk space, point offload_dir elsewhere, or "
                          "lower max_memory['disk'] so less of the cache goes to disk") from error
        os.ftruncate(fd, size)  # file systems without fallocate
    except AttributeError:
        os.ftruncate(fd, size)


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
                 compression: CompressionConfig | None = None, home: str = DEVICE,
                 delegate: bool = False, sparsity: float = 1.0):
        super().__init__()
        self.storage, self.capacity, self.io, self.length = storage, capacity, io, 0
        self.compression, self.home, self.delegate, self.sparsity = compression, home, delegate, sparsity
        self._past = None  # pending read of the stored past, from prefetch_past()
        self.values_bytes_read = 0  # bytes of V that attention read from this layer's cache
        self.is_initialized = True

    @property
    def key_parts(self) -> list[int]:
        return [0] if self.compression is None else [0, 1, 2]

    @property
    def value_parts(self) -> list[int]:
        return [1] if self.compression is None else [3, 4, 5]

    def stored(self, method: str, *args):
        """Call a storage read after every pending write of this layer has landed."""
        if self.storage.moves_on_read:
            return self.io.wait(self.io.submit(getattr(self.storage, method), *args))
        return getattr(self.storage, method)(*args)

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
        return self._decode_one(parts[:3], dtype), self._decode_one(parts[3:], dtype)

    def _decode_one(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """One tensor back from its stored part(s); rows keep their leading shape."""
        if self.compression is None:
            return parts[0]
        data, scale, minimum = parts
        shape = (*data.shape[:-2], self.head_dim)
        return dequantize(QuantizedTensor(data, scale, minimum, shape, self.compression), dtype)

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
        if start and new == 1 and (self.sparsity < 1 or (self.delegate and self.home == CPU)):
            return self._handle(start, parts, key_states, value_states)
        past = None
        if not self.storage.moves_on_read:  # resident next to compute: append in place
            self.storage.write(start, parts, self.capacity)
            self.length = start + new
            if self.compression is None:
                if start:  # attention reads the stored past (this step's token is in memory)
                    self.values_bytes_read += _nbytes(self.storage.read(start, self.value_parts))
                return tuple(self.storage.read(self.length))  # views, no copy
            if start:
                stored = self.storage.read(start)
                self.values_bytes_read += _nbytes([stored[i] for i in self.value_parts])
                past = self._decode(stored, dtype)
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

    def _handle(self, start: int, parts, key_states, value_states) -> tuple["CacheHandle", "CacheHandle"]:
        """Store the new token and let attention read the cache where it lives."""
        if self.storage.moves_on_read:
            self.io.submit(self.storage.write, start, parts, self.capacity)
        else:
            self.storage.write(start, parts, self.capacity)
        self.length = start + 1
        where = self.storage.storage_device if self.delegate and self.home == CPU else key_states.device
        handle = CacheHandle(self, start, key_states, value_states, where, self.sparsity)
        return handle, handle

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CacheHandle:
    """What a layer's ``update`` returns, as both keys and values, when attention should read
    the cache where it lives (CPU delegation) or read only some value rows (top-K sparsity).
    Attention (ops/attention.py) asks it for keys, values, or selected value rows."""

    layer: OffloadedKVLayer
    past: int                   # tokens stored before this step
    new_keys: torch.Tensor      # (batch, kv_heads, 1, head_dim), this step's token
    new_values: torch.Tensor
    where: torch.device         # where attention runs
    sparsity: float

    def keys(self) -> torch.Tensor:
        stored = self.layer.stored("read", self.past, self.layer.key_parts, self.where)
        past = self.layer._decode_one(stored, self.new_keys.dtype)
        return torch.cat([past, self.new_keys.to(self.where)], dim=-2)  # (batch, kv_heads, n, head_dim)

    def values(self) -> torch.Tensor:
        stored = self.layer.stored("read", self.past, self.layer.value_parts, self.where)
        self.layer.values_bytes_read += _nbytes(stored)
        past = self.layer._decode_one(stored, self.new_values.dtype)
        return torch.cat([past, self.new_values.to(self.where)], dim=-2)

    def value_rows(self, batch: torch.Tensor, head: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """Value rows (..., head_dim) at (batch, kv_head, token); each distinct stored row is
        read once, the newest token comes from memory."""
        out = torch.empty(*token.shape, self.new_values.shape[-1], dtype=self.new_values.dtype,
                          device=self.where)
        is_new = token >= self.past
        new = self.new_values.to(self.where)[batch[is_new], head[is_new], token[is_new] - self.past]
        out[is_new] = new
        if (~is_new).any():
            n_heads = self.new_values.shape[1]
            flat = (batch[~is_new] * n_heads + head[~is_new]) * self.past + token[~is_new]
            unique, inverse = torch.unique(flat, return_inverse=True)
            rows = (unique // self.past // n_heads, unique // self.past % n_heads, unique % self.past)
            stored = self.layer.stored("gather", self.layer.value_parts, rows, self.where)
            self.layer.values_bytes_read += _nbytes(stored)
            out[~is_new] = self.layer._decode_one(stored, out.dtype)[inverse]
        return out


class FlexKVCache(Cache):
    """The cache of one micro-batch: a list of per-layer caches, each in its own home."""

    def __init__(self, homes: list[str], capacity: int, device: torch.device,
                 directory: Path | None, io: IOWorker, compression: CompressionConfig | None = None,
                 delegate: bool = False, sparsity: float = 1.0):
        super().__init__(layers=[OffloadedKVLayer(make_storage(h, device, directory), capacity, io,
                                                  compression, h, delegate, sparsity) for h in homes])
        self.homes = list(homes)

    def nbytes_by_home(self) -> dict[str, int]:
        totals = {DEVICE: 0, CPU: 0, DISK: 0}
        for home, layer in zip(self.homes, self.layers):
            totals[home] += layer.storage.nbytes
        return totals

    @property
    def bytes_read(self) -> int:
        return sum(layer.storage.bytes_read for layer in self.layers)

    @property
    def values_bytes_read(self) -> int:
        return sum(layer.values_bytes_read for layer in self.layers)

    def close(self) -> None:
        for layer in self.layers:
            layer.storage.close()
