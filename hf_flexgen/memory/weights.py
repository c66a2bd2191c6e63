"""Weight store: each parameter lives in a home (device / cpu / disk) chosen by the policy,
and ``fetch(stage)`` hands one stage's weights to the compute device in the compute dtype."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.quantize import QuantizedTensor, dequantize
from ..policy import CPU, DEVICE, DISK, assign_homes
from .checkpoint import CheckpointIndex, direct_buffer, direct_span
from .compressed import CompressedWeights

logger = logging.getLogger(__name__)


TABLE_CHUNK_BYTES = 32 * 2**20  # compute-dtype scratch for one slice of a vocabulary table


def table_chunk_shape(shape: tuple[int, int], itemsize: int) -> tuple[int, int]:
    """(rows, width) of the scratch a :class:`StoredTable` of ``shape`` casts into."""
    rows, width = shape
    return min(rows, max(1, TABLE_CHUNK_BYTES // (width * itemsize))), width


def is_table(shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """A vocabulary-sized matrix: the token embedding or the LM head."""
    return vocab_size is not None and len(shape) == 2 and shape[0] == vocab_size


@dataclass(frozen=True)
class StoredTable:
    """A vocabulary table (embedding / LM head) handed to the CPU compute in its stored
    dtype. Casting all of it each step would hold a second, wider copy (412 MB for
    OPT-1.3B's table in fp32); instead a lookup casts the rows it gathers and the LM head
    casts one slice of rows at a time into ``chunk``. Same values as the cast table."""

    stored: torch.Tensor  # (vocab, hidden), checkpoint dtype
    dtype: torch.dtype    # compute dtype
    chunk: torch.Tensor   # (rows, hidden) compute-dtype scratch, reused

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.stored).to(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ table.T``: (..., hidden) -> (..., vocab)."""
        vocab, hidden = self.stored.shape
        flat = x.reshape(-1, hidden)
        out = torch.empty(flat.shape[0], vocab, dtype=x.dtype, device=x.device)
        rows = self.chunk.shape[0]
        for start in range(0, vocab, rows):
            end = min(start + rows, vocab)
            weight = self.chunk[:end - start]
            weight.copy_(self.stored[start:end])
            out[:, start:end] = flat @ weight.t()
        return out.view(*x.shape[:-1], vocab)


@dataclass(frozen=True)
class WeightSpec:
    name: str   # parameter name in the HF model
    key: str    # tensor name in the checkpoint
    shape: tuple[int, ...]
    home: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class WeightStore:
    """Holds resident weights (device / cpu homes) and reads disk-homed ones per use.
    With ``compressed``, the linear layers' weights it holds are kept, moved and read in their
    quantized form and dequantized on the compute device right before use."""

    def __init__(self, index: CheckpointIndex, stage_keys: list[dict[str, str]],
                 shares: dict[str, float], device: torch.device, dtype: torch.dtype,
                 pin_memory: bool = False, compressed: CompressedWeights | None = None,
                 vocab_size: int | None = None):
        self.index, self.device, self.dtype, self.compressed = index, device, dtype, compressed
        self.vocab_size = vocab_size  # tables of this many rows go to compute as StoredTable
        self.pin_memory = pin_memory and device.type == "cuda"
        self.stages: list[list[WeightSpec]] = []
        for names_to_keys in stage_keys:
            shapes = [index.locations[key].shape for key in names_to_keys.values()]
            sizes = [math.prod(s) for s in shapes]
            homes = assign_homes(sizes, shares)
            self.stages.append([WeightSpec(n, k, s, h) for (n, k), s, h
                                in zip(names_to_keys.items(), shapes, homes)])
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}  # CPU staging buffers
        self._holds: dict[int, str] = {}  # id(compute staging buffer) -> checkpoint key it holds
        self._staged: dict[int, tuple[str, torch.Tensor]] = {}  # id(raw buffer) -> key, tensor
        stages_using: dict[str, set[int]] = {}
        for j, stage in enumerate(self.stages):
            for spec in stage:
                stages_using.setdefault(spec.key, set()).add(j)
        self._shared = {key: len(js) > 1 for key, js in stages_using.items()}
        for spec in self.all_specs():
            if spec.home != DISK and (spec.key, spec.home) not in self._resident:
                self._resident[(spec.key, spec.home)] = self._load_resident(spec)
        logger.info("weights: %s", {h: f"{b / 2**20:.1f} MiB" for h, b in self.bytes_by_home().items()})

    def all_specs(self):
        return [spec for stage in self.stages for spec in stage]

    def bytes_by_home(self) -> dict[str, int]:
        """Bytes each home holds (tied tensors counted once per home)."""
        totals, seen = {DEVICE: 0, CPU: 0, DISK: 0}, set()
        for spec in self.all_specs():
            if (spec.key, spec.home) in seen:
                continue
            seen.add((spec.key, spec.home))
            if self._is_compressed(spec):
                totals[spec.home] += self.compressed.nbytes(spec.key)
                continue
            stored = spec.home == DISK or self._keeps_stored_dtype(spec)
            itemsize = (self.index.locations[spec.key].dtype.itemsize if stored
                        else self.dtype.itemsize)
            totals[spec.home] += spec.numel * itemsize
        return totals

    @property
    def bytes_read(self) -> int:
        """Bytes read from checkpoint files so far (source and compressed copy)."""
        return self.index.bytes_read + (self.compressed.index.bytes_read if self.compressed else 0)

    @property
    def read_s(self) -> float:
        """Seconds spent in those reads (on the I/O worker, beside the compute)."""
        return self.index.read_s + (self.compressed.index.read_s if self.compressed else 0.0)

    @property
    def reads(self) -> int:
        """Read requests behind them."""
        return self.index.reads + (self.compressed.index.reads if self.compressed else 0)

    def _is_compressed(self, spec: WeightSpec) -> bool:
        return self.compressed is not None and spec.key in self.compressed

    def _load_resident(self, spec: WeightSpec):
        if self._is_compressed(spec):
            q = self.compressed.read(spec.key)
            if spec.home == DEVICE:
                return q.to(self.device)
            if not self.pin_memory:
                return q
            return QuantizedTensor(q.data.pin_memory(), q.scale.pin_memory(),
                                   q.minimum.pin_memory(), q.shape, q.config)
        if self._keeps_stored_dtype(spec):
            return self.index.read(spec.key)
        tensor = self.index.read(spec.key).to(self.dtype)
        if spec.home == DEVICE:
            return tensor.to(self.device)
        return tensor.pin_memory() if self.pin_memory else tensor

    def _keeps_stored_dtype(self, spec: WeightSpec) -> bool:
        """On a CPU compute device the cpu home holds the checkpoint's dtype (half the RAM of
        fp32 for a half checkpoint), converted per use; the device home holds the compute dtype."""
        return self.device.type == "cpu" and spec.home == CPU

    def fetch(self, stage: int) -> dict:
        """One stage's weights, keyed by HF parameter name: on the compute device in the
        compute dtype, except on CPU, where disk and cpu homes hand over the stored dtype and
        compressed weights their ``QuantizedTensor``; :meth:`to_compute` converts them. Runs
        on the I/O worker."""
        out = {}
        for spec in self.stages[stage]:
            if self._is_compressed(spec):
                q = (self.compressed.read(spec.key) if spec.home == DISK
                     else self._resident[(spec.key, spec.home)])
                out[spec.name] = (q if self.device.type == "cpu" else
                                  dequantize(q.to(self.device, non_blocking=True), self.dtype))
            elif spec.home == DISK:
                out[spec.name] = self._read_from_disk(spec, stage)
            elif self._keeps_stored_dtype(spec):
                out[spec.name] = self._resident[(spec.key, spec.home)]
            else:
                out[spec.name] = self._resident[(spec.key, spec.home)].to(
                    self.device, self.dtype, non_blocking=True)
        return out

    def to_compute(self, stage: int, fetched: dict) -> dict[str, torch.Tensor]:
        """Convert what :meth:`fetch` handed over to the compute dtype (casting, or
        dequantizing compressed weights), on the compute thread (on CPU a conversion on the
        I/O thread would start a second OpenMP team competing for the same cores). Converted
        tensors go to one staging buffer per tensor role, reused from stage to stage; a
        buffer that already holds the tensor is not converted again. Vocabulary tables that
        need a cast go over as :class:`StoredTable`, cast where used."""
        out = {}
        for spec in self.stages[stage]:
            tensor = fetched[spec.name]
            quantized = isinstance(tensor, QuantizedTensor)
            if (not quantized and tensor.dtype != self.dtype and tensor.dtype.is_floating_point
                    and self.device.type == "cpu" and is_table(spec.shape, self.vocab_size)):
                chunk = self._buffer(("table chunk",), self.dtype,
                                     table_chunk_shape(spec.shape, self.dtype.itemsize))
                out[spec.name] = StoredTable(tensor, self.dtype, chunk)
                continue
            if quantized or (tensor.dtype != self.dtype and tensor.dtype.is_floating_point):
                buffer = self._buffer(("compute", self._role(spec, None)), self.dtype, tuple(tensor.shape))
                if self._holds.get(id(buffer)) != spec.key:
                    if quantized:
                        dequantize(tensor, self.dtype, out=buffer)
                    else:
                        buffer.copy_(tensor)
                    self._holds[id(buffer)] = spec.key
                tensor = buffer
            out[spec.name] = tensor
        return out

    def _role(self, spec: WeightSpec, slot: int | None) -> tuple:
        """Staging-buffer identity: tensors shared by several stages (tied embedding and
        LM head) get their own buffer; others share one per layer-local name (and slot)."""
        if self._shared[spec.key]:
            return (spec.key,)
        return (slot, re.sub(r"\.\d+\.", ".#.", spec.name))

    def _read_from_disk(self, spec: WeightSpec, stage: int) -> torch.Tensor:
        if self.device.type != "cpu":  # the CUDA caching allocator recycles these safely
            return self.index.read(spec.key).to(self.device, self.dtype, non_blocking=True)
        # On CPU, reuse aligned buffers that the disk fills directly (fresh 100 MB allocations
        # cost more in page faults than the read). Two slots by stage parity: stage j+1 loads
        # while stage j computes.
        nbytes = self.index.locations[spec.key].nbytes
        raw = self._buffer(("raw", self._role(spec, stage % 2)), torch.uint8, (direct_span(nbytes),),
                           make=lambda: direct_buffer(nbytes))
        held = self._staged.get(id(raw))
        if held is None or held[0] != spec.key:
            held = self._staged[id(raw)] = (spec.key, self.index.read_into(spec.key, raw))
        return held[1]

    def _buffer(self, key: tuple, dtype: torch.dtype, shape: tuple[int, ...], make=None) -> torch.Tensor:
        key = (*key, dtype, tuple(shape))
        if key not in self._buffers:
            self._buffers[key] = make() if make else torch.empty(shape, dtype=dtype)
        return self._buffers[key]

    def staging_bytes(self) -> int:
        """Bytes of the CPU staging buffers allocated so far."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
