"""Weight store: each parameter lives in a home (device / cpu / disk) chosen by the policy,
and ``fetch(stage)`` hands one stage's weights to the compute device in the compute dtype."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..policy import CPU, DEVICE, DISK, assign_homes
from .checkpoint import CheckpointIndex

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
    """Holds resident weights (device / cpu homes) and reads disk-homed ones per use."""

    def __init__(self, index: CheckpointIndex, stage_keys: list[dict[str, str]],
                 shares: dict[str, float], device: torch.device, dtype: torch.dtype,
                 pin_memory: bool = False):
        self.index, self.device, self.dtype = index, device, dtype
        self.pin_memory = pin_memory and device.type == "cuda"
        self.stages: list[list[WeightSpec]] = []
        for names_to_keys in stage_keys:
            shapes = [index.locations[key].shape for key in names_to_keys.values()]
            sizes = [math.prod(s) for s in shapes]
            homes = assign_homes(sizes, shares)
            self.stages.append([WeightSpec(n, k, s, h) for (n, k), s, h
                                in zip(names_to_keys.items(), shapes, homes)])
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
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
            itemsize = (self.index.locations[spec.key].dtype.itemsize if spec.home == DISK
                        else self.dtype.itemsize)
            totals[spec.home] += spec.numel * itemsize
        return totals

    def _load_resident(self, spec: WeightSpec) -> torch.Tensor:
        tensor = self.index.read(spec.key).to(self.dtype)
        if spec.home == DEVICE:
            return tensor.to(self.device)
        return tensor.pin_memory() if self.pin_memory else tensor

    def fetch(self, stage: int) -> dict[str, torch.Tensor]:
        """One stage's weights on the compute device, keyed by HF parameter name."""
        out = {}
        for spec in self.stages[stage]:
            if spec.home == DISK:
                tensor = self.index.read(spec.key)
            else:
                tensor = self._resident[(spec.key, spec.home)]
            out[spec.name] = tensor.to(self.device, self.dtype, non_blocking=True)
        return out
