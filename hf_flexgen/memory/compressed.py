"""Compressed copy of a checkpoint: the linear layers' weight matrices quantized once
(group-wise, ``CompressionConfig``) and written as safetensors to a cache directory keyed by
the source files and the config, so later runs reuse it. Everything else (token and position
embeddings, a tied embedding/lm_head tensor, biases, norms) stays in the source, as stored."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..ops.quantize import QuantizedTensor, quantize
from ..policy import CompressionConfig
from .checkpoint import CheckpointIndex

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTS = ("qdata", "qscale", "qmin")
SHARD_BYTES = 1 << 30


def linear_weight_keys(model: nn.Module, stage_keys: list[dict[str, str]]) -> list[str]:
    """Checkpoint keys whose every use is the ``weight`` of an ``nn.Linear`` in ``model``
    (stage_keys: per stage, HF parameter name -> checkpoint key). A tensor shared with an
    embedding (tied lm_head) is left out: embedding rows are looked up one token at a time
    and are often stored more precisely than the layers (8-bit in SmolLM2's Q4_1 GGUF)."""
    linear = {f"{path}.weight" for path, module in model.named_modules(remove_duplicate=False)
              if isinstance(module, nn.Linear)}
    users = defaultdict(set)
    for stage in stage_keys:
        for name, key in stage.items():
            users[key].add(name)
    return sorted(key for key, names in users.items() if names <= linear)


def compressible(index: CheckpointIndex, key: str) -> bool:
    loc = index.locations[key]
    return len(loc.shape) >= 2 and loc.dtype.is_floating_point


def cache_key(index: CheckpointIndex, keys: list[str], config: CompressionConfig) -> str:
    files = sorted({index.locations[k].path for k in keys})
    ident = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([FORMAT_VERSION, ident, sorted(keys), asdict(config)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class CompressedWeights:
    """Reads quantized weights of a compressed checkpoint (creating it on first use)."""

    def __init__(self, source: CheckpointIndex, keys: list[str], config: CompressionConfig,
                 cache_dir: Path):
        self.config = config
        self.keys = sorted(k for k in set(keys) if compressible(source, k))
        self.directory = Path(cache_dir) / cache_key(source, self.keys, config)
        if not (self.directory / "done.json").exists():
            self._write(source)
        self.index = CheckpointIndex.from_directory(self.directory)
        self.shapes = json.loads((self.directory / "done.json").read_text())["shapes"]

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def read(self, key: str) -> QuantizedTensor:
        data, scale, minimum = (self.index.read(f"{key}.{part}") for part in PARTS)
        return QuantizedTensor(data, scale, minimum, tuple(self.shapes[key]), self.config)

    def nbytes(self, key: str) -> int:
        return sum(self.index.locations[f"{key}.{part}"].nbytes for part in PARTS)

    def _write(self, source: CheckpointIndex) -> None:
        staging = self.directory.with_name(self.directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shard, shard_bytes, shapes, count = {}, 0, {}, 0
        for key in tqdm(self.keys, desc="compressing weights", unit="tensor"):
            q = quantize(source.read(key), self.config)
            shapes[key] = list(q.shape)
            for part, tensor in zip(PARTS, (q.data, q.scale, q.minimum)):
                shard[f"{key}.{part}"] = tensor
            shard_bytes += q.nbytes
            if shard_bytes >= SHARD_BYTES:
                count = self._flush(staging, shard, count)
                shard, shard_bytes = {}, 0
        if shard or not count:
            self._flush(staging, shard, count)
        (staging / "done.json").write_text(json.dumps({"config": asdict(self.config), "shapes": shapes}))
        shutil.rmtree(self.directory, ignore_errors=True)
        staging.rename(self.directory)
        logger.info("compressed %d weights into %s", len(self.keys), self.directory)

    @staticmethod
    def _flush(directory: Path, shard: dict, count: int) -> int:
        save_file(shard, directory / f"compressed-{count:05d}.safetensors")
        return count + 1

    def close(self) -> None:
        self.index.close()
