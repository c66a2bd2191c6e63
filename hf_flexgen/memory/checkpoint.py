"""Read tensors of a safetensors checkpoint in place, straight from disk.

Reads go through ``os.preadv`` into fresh buffers (no mmap, so nothing stays mapped into the
process), and the file range is then dropped from the page cache with
``posix_fadvise(DONTNEED)`` so disk-homed weights cost neither RSS nor hidden cache memory.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


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


def drop_page_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class CheckpointIndex:
    """Name -> location of every tensor in a set of safetensors files, with in-place reads."""

    def __init__(self, files: list[Path]):
        if not files:
            raise FileNotFoundError("no .safetensors files given")
        self.locations: dict[str, TensorLocation] = {}
        for path in files:
            self.locations.update(read_safetensors_header(Path(path)))
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

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

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor from disk into ``out`` (a CPU tensor of the stored dtype and shape)
        or a new CPU tensor; the page cache for its bytes is dropped afterwards."""
        loc = self.locations[name]
        if out is None:
            out = torch.empty(loc.shape, dtype=loc.dtype)
        if loc.nbytes:
            fd = self._fd(loc.path)
            read_exact(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), loc.offset)
            drop_page_cache(fd, loc.offset, loc.nbytes)
            self.bytes_read += loc.nbytes
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
