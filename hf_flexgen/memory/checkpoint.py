"""Read tensors of a safetensors checkpoint in place, straight from disk.

Reads go through ``os.preadv`` (no mmap, so nothing stays mapped into the process). Into a
buffer from :func:`direct_buffer` they use ``O_DIRECT``: the disk writes into the buffer
itself, with no page-cache copy costing CPU time and memory. Where the file system refuses
``O_DIRECT``, and for reads into plain tensors, the file range is dropped from the page cache
after the read with ``posix_fadvise(DONTNEED)``. Either way disk-homed weights cost neither
RSS nor hidden cache memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


ALIGN = 4096  # O_DIRECT: file offset, length and memory address aligned to this


def _round_up(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def direct_span(nbytes: int) -> int:
    """Bytes of a :func:`direct_buffer` that can take a tensor of ``nbytes`` at any offset."""
    return _round_up(nbytes) + ALIGN


def direct_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``direct_span(nbytes)`` bytes starting at an ``ALIGN`` boundary."""
    span = direct_span(nbytes)
    memory = torch.empty(span + ALIGN, dtype=torch.uint8)
    start = -memory.data_ptr() % ALIGN
    return memory[start:start + span]


@dataclass(frozen=True)
class TensorLocation:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    base = 8 + header_len
    locations = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        locations[name] = TensorLocation(path, SAFETENSORS_DTYPES[info["dtype"]],
                                         tuple(info["shape"]), base + start, end - start)
    return locations


def read_exact(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise IOError(f"unexpected end of file while reading {len(buffer)} bytes at {offset}")
        done += n


def open_direct(path) -> int | None:
    """An ``O_DIRECT`` read descriptor, or None where the OS or file system has no direct I/O."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (AttributeError, OSError):
        return None


def read_direct(fd: int, buffer: memoryview, offset: int, needed: int) -> bool:
    """Read at least ``needed`` bytes at ``offset`` into ``buffer`` through an ``O_DIRECT``
    descriptor (offset, buffer and its length aligned); False when the kernel refuses."""
    done = 0
    try:
        while done < needed:
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise IOError(f"unexpected end of file while reading {needed} bytes at {offset}")
            done += n
            if done < needed and done % ALIGN:
                return False  # a short read off the alignment: O_DIRECT cannot go on
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    return True


def drop_page_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


_SYNC_RANGE_AND_WAIT = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER


def _sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_sync_range = _sync_file_range()


def write_back(fd: int, offset: int, length: int) -> None:
    """Write a just-written file range to disk now and drop it from the page cache, so dirty
    pages never pile up (inside a memory cgroup, reclaim stalls on them). Uses Linux's
    ``sync_file_range`` for just this range, else ``fdatasync``."""
    if length <= 0:
        return
    if _sync_range is None or _sync_range(fd, offset, length, _SYNC_RANGE_AND_WAIT) != 0:
        os.fdatasync(fd)
    drop_page_cache(fd, offset, length)


class CheckpointIndex:
    """Name -> location of every tensor in a set of safetensors files, with in-place reads."""

    def __init__(self, files: list[Path]):
        if not files:
            raise FileNotFoundError("no .safetensors files given")
        self.locations: dict[str, TensorLocation] = {}
        for path in files:
            self.locations.update(read_safetensors_header(Path(path)))
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}
        self.bytes_read = 0
        self.read_s = 0.0  # seconds spent reading them
        self.reads = 0     # read requests (one per tensor) behind them

    @classmethod
    def from_directory(cls, directory: Path) -> "CheckpointIndex":
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {directory}")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _direct_fd(self, path: Path) -> int | None:
        if path not in self._direct_fds:
            self._direct_fds[path] = open_direct(path)
        return self._direct_fds[path]

    def read_into(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """Read one tensor into ``buffer`` (a :func:`direct_buffer` of at least its size),
        bypassing the page cache; returns the tensor, a view of ``buffer``."""
        loc = self.locations[name]
        start = loc.offset - loc.offset % ALIGN
        head = loc.offset - start
        if head % loc.dtype.itemsize or len(buffer) < direct_span(loc.nbytes):
            return self.read(name)  # cannot be a view of the buffer: a plain read
        tensor = buffer[head:head + loc.nbytes].view(loc.dtype).view(loc.shape)
        length = _round_up(head + loc.nbytes)
        fd = self._direct_fd(loc.path) if loc.nbytes else None
        began = time.perf_counter()
        if fd is not None and read_direct(fd, memoryview(buffer[:length].numpy()), start,
                                          head + loc.nbytes):
            self.bytes_read += loc.nbytes
            self.read_s += time.perf_counter() - began
            self.reads += 1
            return tensor
        return self.read(name, out=tensor)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor from disk into ``out`` (a CPU tensor of the stored dtype and shape)
        or a new CPU tensor; the page cache for its bytes is dropped afterwards."""
        loc = self.locations[name]
        if out is None:
            out = torch.empty(loc.shape, dtype=loc.dtype)
        if loc.nbytes:
            fd, began = self._fd(loc.path), time.perf_counter()
            read_exact(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), loc.offset)
            drop_page_cache(fd, loc.offset, loc.nbytes)
            self.bytes_read += loc.nbytes
            self.read_s += time.perf_counter() - began
            self.reads += 1
        return out

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
