#!/usr/bin/env python
"""Write random-weight OPT checkpoints with the exact shapes of the real models.

The real facebook/opt-* weights cannot be downloaded here, but offloading
benchmarks only need tensors of the right names, shapes and dtypes.  This
module writes a Hugging Face-format checkpoint (``config.json``,
``generation_config.json``, sharded ``model-0000X-of-0000N.safetensors`` files
and ``model.safetensors.index.json``) that ``OPTForCausalLM.from_pretrained``
loads with no missing or unexpected keys.

Properties:

* Parameter names/shapes come from ``OPTForCausalLM(config)`` built on the
  ``meta`` device, so nothing is allocated for the model itself.
  ``lm_head.weight`` is omitted: OPT ties it to ``model.decoder.embed_tokens``.
* Tensors are generated chunk by chunk (16 Mi values) and streamed into the
  safetensors files (header first, computed from the shapes), so the peak
  memory is a few hundred MB whatever the model or shard size: opt-30b and
  opt-66b can be written on a 24 GB machine.
* Values: matrices ~ N(0, 0.02) (like OPT's ``init_std``), layer-norm weights 1,
  biases 0.  Each tensor has its own generator seeded with the CRC32 of
  ``f"{seed}:{name}"``, so the values are deterministic and independent of the
  sharding (and, up to rounding, of the dtype).
* A marker file is written last; a later call with the same
  (name, dtype, seed) on a complete directory returns immediately.  A
  directory without a valid marker (e.g. an interrupted run) is rewritten.

CLI::

    python benchmarks/make_checkpoint.py opt-1.3b --out /tmp/ckpt/opt-1.3b \
        [--dtype float16|bfloat16|float32] [--seed 0] [--max-shard-bytes N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("make_checkpoint")

__all__ = ["SHAPES", "make_checkpoint", "checkpoint_is_complete", "NotEnoughDiskSpaceError"]

# Hyper-parameters shared by every facebook/opt-* config.json.
_COMMON = dict(
    vocab_size=50272,
    max_position_embeddings=2048,
    activation_function="relu",
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    layerdrop=0.0,
    init_std=0.02,
    enable_bias=True,
    layer_norm_elementwise_affine=True,
    do_layer_norm_before=True,
    use_cache=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
    tie_word_embeddings=True,
)


def _opt(hidden: int, layers: int, heads: int, ffn: int, **extra) -> dict:
    kw = dict(_COMMON)
    kw.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        word_embed_proj_dim=hidden,
    )
    kw.update(extra)
    return kw


#: name -> ``OPTConfig`` kwargs, the real hyper-parameters of facebook/<name>.
SHAPES: dict[str, dict] = {
    "opt-125m": _opt(768, 12, 12, 3072),
    # The only OPT with post-LayerNorm (and hence no final layer norm) and a
    # projected 512-wide word embedding.
    "opt-350m": _opt(1024, 24, 16, 4096, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "opt-6.7b": _opt(4096, 32, 32, 16384),
    "opt-13b": _opt(5120, 40, 40, 20480),
    "opt-30b": _opt(7168, 48, 56, 28672),
    "opt-66b": _opt(9216, 64, 72, 36864),
}

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

MARKER_NAME = ".make_checkpoint.json"
INDEX_NAME = "model.safetensors.index.json"
_MARKER_FORMAT = 1
_STD = 0.02
_CHUNK = 1 << 22  # elements generated per normal_() call (16 MiB of fp32 scratch)
_SPACE_MARGIN = 16 << 20  # headers, json files, filesystem slack


class NotEnoughDiskSpaceError(OSError):
    """Raised before writing anything when the target file system is too full."""


def _canonical_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    elif dtype in (torch.float16, torch.bfloat16, torch.float32):
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}; use float16, bfloat16 or float32")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_name(name: str) -> None:
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(SHAPES)}")


def make_config(name: str, dtype=torch.float16):
    """The ``OPTConfig`` of ``name`` with ``dtype`` recorded in it."""
    from transformers import OPTConfig

    _check_name(name)
    config = OPTConfig(**SHAPES[name])
    config.dtype = _canonical_dtype(dtype)
    config.architectures = ["OPTForCausalLM"]
    return config


def _tensor_specs(config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every tensor to store, in state-dict order.

    Built from HF's own model class on the meta device (no memory allocated).
    Tied parameters (``lm_head.weight``) are stored once, under their first name.
    ``init`` is "normal", "ones" or "zeros".
    """
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(config)
    init: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            prefix = f"{mod_name}." if mod_name else ""
            init[prefix + "weight"] = "ones"
            init[prefix + "bias"] = "zeros"
    specs, seen = [], set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied weight, e.g. lm_head.weight
            continue
        seen.add(id(tensor))
        kind = init.get(key) or ("normal" if tensor.dim() >= 2 else "zeros")
        specs.append((key, tuple(tensor.shape), kind))
    if getattr(config, "tie_word_embeddings", True):
        assert all(k != "lm_head.weight" for k, _, _ in specs), "lm_head should be tied"
    return specs


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _plan_shards(specs, itemsize: int, max_shard_bytes: int) -> list[list[int]]:
    """Greedy split (in order) like HF: a tensor larger than the limit gets its own shard."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, _) in enumerate(specs):
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    # torch's CPU generator (mt19937) only uses the low 32 bits of its seed, so
    # mix the base seed and the name into one 32-bit value.
    return zlib.crc32(f"{seed}:{name}".encode("utf-8"))


class _Scratch:
    """Reusable chunk buffers, so that generation allocates nothing per tensor."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.f32 = torch.empty(0)
        self.out = torch.empty(0, dtype=dtype)

    def get(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.f32.numel() < n:
            self.f32 = torch.empty(n)
            self.out = self.f32 if self.dtype == torch.float32 else torch.empty(n, dtype=self.dtype)
        return self.f32[:n], self.out[:n]


def _tensor_chunks(name: str, shape, kind: str, dtype: torch.dtype, seed: int, scratch: _Scratch):
    """Yield the flattened tensor as contiguous 1-D chunks of ``dtype``.

    Each chunk is only valid until the next one is requested.  Random values
    are drawn in fixed-size fp32 chunks from a generator seeded by (seed,
    name): deterministic, independent of sharding, and the same (up to
    rounding) whatever the target dtype.
    """
    numel = _numel(shape)
    if kind in ("ones", "zeros"):  # 1-D layer-norm / bias vectors: small
        yield (torch.ones if kind == "ones" else torch.zeros)(numel, dtype=dtype)
        return
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    for start in range(0, numel, _CHUNK):
        n = min(_CHUNK, numel - start)
        f32, out = scratch.get(n)
        f32.normal_(0.0, _STD, generator=gen)
        if out is not f32:
            out.copy_(f32)
        yield out


def _make_tensor(name: str, shape, kind: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The whole tensor ``name`` as written to the checkpoint (for tests/debugging)."""
    out = torch.empty(_numel(shape), dtype=dtype)
    pos = 0
    for chunk in _tensor_chunks(name, shape, kind, dtype, seed, _Scratch(dtype)):
        out[pos : pos + chunk.numel()] = chunk
        pos += chunk.numel()
    return out.view(shape)


def _write_shard(path: Path, specs, dtype: torch.dtype, seed: int, bar) -> None:
    """Stream a safetensors file: header first (known from the shapes), then
    each tensor chunk by chunk.  Peak memory is one chunk, not one shard."""
    if sys.byteorder != "little":  # safetensors stores little-endian data
        raise RuntimeError("writing safetensors needs a little-endian machine")
    st_dtype = _ST_DTYPES[dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, _ in specs:
        nbytes = _numel(shape) * itemsize
        header[key] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)  # safetensors pads the header to 8 bytes
    scratch = _Scratch(dtype)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for key, shape, kind in specs:
            for chunk in _tensor_chunks(key, shape, kind, dtype, seed, scratch):
                f.write(chunk.view(torch.uint8).numpy().data)
            bar.update(1)
        written = f.tell()
    if written != 8 + len(hbytes) + offset:
        raise RuntimeError(f"{path}: wrote {written} bytes, expected {8 + len(hbytes) + offset}")


def _read_marker(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / MARKER_NAME) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def checkpoint_is_complete(out_dir, name: str, dtype=torch.float16, seed: int = 0) -> bool:
    """True when ``out_dir`` holds a finished checkpoint of (name, dtype, seed)."""
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if marker is None:
        return False
    if (
        marker.get("format") != _MARKER_FORMAT
        or marker.get("name") != name
        or marker.get("dtype") != _dtype_name(_canonical_dtype(dtype))
        or marker.get("seed") != seed
    ):
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for fname, size in files.items():
        try:
            if (out_dir / fname).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _is_ours(path: Path) -> bool:
    n = path.name
    return n == INDEX_NAME or n == "model.safetensors" or (
        n.startswith("model-") and (n.endswith(".safetensors") or n.endswith(".safetensors.tmp"))
    )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _fmt_gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def make_checkpoint(
    name: str,
    out_dir,
    dtype=torch.float16,
    seed: int = 0,
    max_shard_bytes: int = 2**30,
    *,
    progress: bool | None = None,
) -> Path:
    """Write a random-weight HF checkpoint of facebook/``name`` to ``out_dir``.

    Args:
        name: a key of ``SHAPES`` ("opt-125m" ... "opt-66b").
        out_dir: target directory (created if needed).
        dtype: torch.float16, torch.bfloat16 or torch.float32 (or their names).
        seed: base seed; each tensor is seeded from it and its name.
        max_shard_bytes: size limit of one safetensors shard (a larger tensor
            gets a shard of its own).  Memory use does not depend on it.
        progress: show a tqdm bar over tensors; None = only on a terminal.

    Returns ``Path(out_dir)``.  Returns at once when ``out_dir`` already holds a
    complete checkpoint with the same (name, dtype, seed).

    Raises:
        ValueError: unknown ``name`` or dtype, or a non-positive ``max_shard_bytes``.
        NotEnoughDiskSpaceError: the file system lacks the room for the shards.
    """
    from transformers import GenerationConfig

    _check_name(name)
    dtype = _canonical_dtype(dtype)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out_dir = Path(out_dir)

    if checkpoint_is_complete(out_dir, name, dtype, seed):
        logger.info("%s (%s, seed %d) already complete in %s; skipping", name, _dtype_name(dtype), seed, out_dir)
        return out_dir

    config = make_config(name, dtype)
    specs = _tensor_specs(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total_size = sum(_numel(shape) for _, shape, _ in specs) * itemsize
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    n_shards = len(shards)
    fnames = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]

    # Room check before touching anything; stale shards we are about to delete count as free.
    reclaim = 0
    if out_dir.is_dir():
        reclaim = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file() and _is_ours(p))
    needed = total_size + _SPACE_MARGIN
    free = shutil.disk_usage(_existing_ancestor(out_dir)).free + reclaim
    if free < needed:
        raise NotEnoughDiskSpaceError(
            f"not enough disk space for {name} in {_dtype_name(dtype)} at {out_dir}: "
            f"needs {_fmt_gb(needed)} ({needed:,} bytes) but only {_fmt_gb(free)} is available"
        )

    # Invalidate any previous (partial or different) checkpoint before writing.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).unlink(missing_ok=True)
    for p in out_dir.iterdir():
        if p.is_file() and _is_ours(p):
            p.unlink()

    logger.info(
        "writing %s (%s, seed %d): %d tensors, %s in %d shard(s) to %s",
        name, _dtype_name(dtype), seed, len(specs), _fmt_gb(total_size), n_shards, out_dir,
    )
    t0 = time.perf_counter()
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)

    weight_map: dict[str, str] = {}
    files: dict[str, int] = {}
    bar = tqdm(
        total=len(specs), unit="tensor", desc=name, disable=(None if progress is None else not progress),
        file=sys.stderr,
    )
    with bar:
        for fname, idx in zip(fnames, shards):
            bar.set_postfix_str(fname, refresh=False)
            shard_specs = [specs[i] for i in idx]
            tmp = out_dir / (fname + ".tmp")
            _write_shard(tmp, shard_specs, dtype, seed, bar)
            os.replace(tmp, out_dir / fname)
            files[fname] = (out_dir / fname).stat().st_size
            for key, _, _ in shard_specs:
                weight_map[key] = fname

    with open(out_dir / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")

    marker = {
        "format": _MARKER_FORMAT,
        "name": name,
        "dtype": _dtype_name(dtype),
        "seed": seed,
        "max_shard_bytes": max_shard_bytes,
        "total_size": total_size,
        "num_tensors": len(specs),
        "files": files,
    }
    tmp = out_dir / (MARKER_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
    os.replace(tmp, out_dir / MARKER_NAME)
    logger.info(
        "wrote %s: %d shard(s), %s in %.1f s", out_dir, n_shards, _fmt_gb(total_size), time.perf_counter() - t0
    )
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"one of: {', '.join(SHAPES)}")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-bytes", type=int, default=2**30, help="shard size limit (default 1 GiB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        make_checkpoint(args.name, args.out, args.dtype, args.seed, args.max_shard_bytes, progress=True)
    except (ValueError, NotEnoughDiskSpaceError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
