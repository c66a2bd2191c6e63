"""Weight store: each parameter lives in a home (device / cpu / disk) chosen by the policy,
and ``fetch(stage)`` hands one stage's weights to the compute device in the compute dtype."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from ..ops.quantize import QuantizedTensor, dequantize
from ..policy import CPU, DEVICE, DISK, assign_homes
from .checkpoint import CheckpointIndex
from .compressed import CompressedWeights

logger = logging.getLogger(__name__)


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
                 pin_memory: bool = False, compressed: CompressedWeights | None = None):
        self.index, self.device, self.dtype, self.compressed = index, device, dtype, compressed
        self.pin_memory = pin_memory and device.type == "cuda"
        self.stages: list[list[WeightSpec]] = []
        for names_to_keys in stage_keys:
            shapes = [index.locations[key].shape for key in names_to_keys.values()]
            sizes = [math.prod(s) for s in shapes]
            homes = assign_homes(sizes, shares)
            self.stages.append([WeightSpec(n, k, s, h) for (n, k), s, h
                                in zip(names_to_keys.items(), shapes, homes)])
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
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
            itemsize = (self.index.locations[spec.key].dtype.itemsize if spec.home == DISK
                        else self.dtype.itemsize)
            totals[spec.home] += spec.numel * itemsize
        return totals

    @property
    def bytes_read(self) -> int:
        """Bytes read from checkpoint files so far (source and compressed copy)."""
        return self.index.bytes_read + (self.compressed.index.bytes_read if self.compressed else 0)

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
        tensor = self.index.read(spec.key).to(self.dtype)
        if spec.home == DEVICE:
            return tensor.to(self.device)
        return tensor.pin_memory() if self.pin_memory else tensor

    def fetch(self, stage: int) -> dict[str, torch.Tensor]:
        """One stage's weights on the compute device, keyed by HF parameter name."""
        out = {}
        for spec in self.stages[stage]:
            if self._is_compressed(spec):
                q = (self.compressed.read(spec.key) if spec.home == DISK
                     else self._resident[(spec.key, spec.home)])
                out[spec.name] = dequantize(q.to(self.device, non_blocking=True), self.dtype)
            elif spec.home == DISK:
                out[spec.name] = self._read_from_disk(spec, slot=stage % 2)
            else:
                out[spec.name] = self._resident[(spec.key, spec.home)].to(
                    self.device, self.dtype, non_blocking=True)
        return out

    def _read_from_disk(self, spec: WeightSpec, slot: int) -> torch.Tensor:
        if self.device.type != "cpu":  # the CUDA caching allocator recycles these safely
            return self.index.read(spec.key).to(self.device, self.dtype, non_blocking=True)
        # On CPU, reuse buffers (fresh 100 MB allocations cost more in page faults than the
        # copy itself). Two slots by stage parity: stage j+1 loads while stage j computes.
        loc = self.index.locations[spec.key]
        role = (slot, re.sub(r"\.\d+\.", ".#.", spec.name), loc.shape)
        raw = self._buffer(("raw", *role), loc.dtype)
        self.index.read(spec.key, out=raw)
        if loc.dtype == self.dtype:
            return raw
        return self._buffer(("compute", *role), self.dtype).copy_(raw)

    def _buffer(self, key: tuple, dtype: torch.dtype) -> torch.Tensor:
        if key not in self._buffers:
            self._buffers[key] = torch.empty(key[-1], dtype=dtype)
        return self._buffers[key]
