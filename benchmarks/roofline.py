#!/usr/bin/env python
"""Hardware ceilings of this machine and the roofline throughput of a generation workload.

Measures (a) matmul FLOP/s (large square torch.matmul, best of a few reps), (b) sequential
disk read bandwidth with the page cache bypassed (caches dropped, then preadv with
posix_fadvise(DONTNEED) behind the reader), (c) memory copy bandwidth (tensor.copy_).

For a workload (model shape, prompts, prompt/generation length, memory budget) it derives
two lower bounds on the generation time and the roofline throughput::

    compute-bound time = matmul FLOPs of the workload / matmul FLOP/s
    I/O-bound time     = weight passes x weight bytes that must come from disk / disk bandwidth
    roofline tok/s     = generated tokens / max(compute-bound, I/O-bound)   (perfect overlap)

FLOPs: 2 x (decoder-layer matmul params) per token, plus the LM head (2 x vocab x hidden)
for the one position per sequence and step whose logits are needed, plus causal attention
(2 x 2 x hidden x attended positions per token and layer).
I/O: a weight pass per token step per block; the best case is one block holding every
prompt (generation length passes in all). Weights that fit in the budget next to the KV
cache (compute dtype) and a runtime floor stay resident; the rest is read at its stored size.
Memory: each pass the matmuls stream every weight, in the compute dtype, from RAM at the
measured copy bandwidth. The roofline is the smallest of the three limits.

    python benchmarks/roofline.py --model opt-1.3b --checkpoint /tmp/ckpt/opt-1.3b \
        --budget 2GiB --prompt-len 64 --gen-len 32 --num-prompts 64
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cgroup import drop_caches, parse_bytes  # noqa: E402

logger = logging.getLogger("roofline")


# -- hardware -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    matmul_flops: float            # fp32 (or the measured dtype) FLOP/s
    matmul_dtype: str
    disk_read_Bps: float           # sequential, page cache bypassed
    memcpy_Bps: float              # bytes copied per second (each byte read once, written once)
    threads: int
    extra: dict                    # e.g. half-precision matmul FLOP/s, file measured


# torch is imported by the measurements only: vs_accelerate.py's parent uses the rest and
# must stay torch-free (see cgroup.py); it measures through a subprocess
def measure_matmul(n: int = 4096, reps: int = 3, dtype=None) -> float:
    import torch
    dtype = dtype or torch.float32
    # nn.Linear's layout, x @ W.T, which both peers run: on some CPUs a half a @ b takes a
    # path 100x slower than a half x @ W.T (AVX2 EPYC: 0.3 against 27 GFLOP/s)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.nn.functional.linear(a, b)  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure_disk_read(path: Path, limit_bytes: int = 2**30, chunk: int = 64 * 2**20,
                      drop: bool = True) -> float:
    """Bytes/s reading ``path`` (up to ``limit_bytes``) sequentially from a cold cache."""
    if drop:
        drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(chunk)
        view, done = memoryview(buf), 0
        size = min(os.fstat(fd).st_size, limit_bytes)
        start = time.perf_counter()
        while done < size:
            n = os.preadv(fd, [view[:min(chunk, size - done)]], done)
            if n <= 0:
                break
            os.posix_fadvise(fd, done, n, os.POSIX_FADV_DONTNEED)
            done += n
        return done / (time.perf_counter() - start)
    finally:
        os.close(fd)


def measure_memcpy(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    import torch
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_hardware(disk_file: Path, half_matmul: bool = True) -> Hardware:
    import torch
    extra = {"disk_file": str(disk_file)}
    flops = measure_matmul()
    if half_matmul:  # small size: half-precision matmuls can be very slow on CPUs
        for dtype in (torch.bfloat16, torch.float16):
            extra[f"matmul_flops_{str(dtype).removeprefix('torch.')}"] = measure_matmul(1024, 2, dtype)
    hw = Hardware(matmul_flops=flops, matmul_dtype="float32", disk_read_Bps=measure_disk_read(disk_file),
                  memcpy_Bps=measure_memcpy(), threads=torch.get_num_threads(), extra=extra)
    logger.info("hardware: %.1f GFLOP/s fp32 matmul, %.2f GB/s disk read, %.2f GB/s memcpy (%d threads)",
                hw.matmul_flops / 1e9, hw.disk_read_Bps / 1e9, hw.memcpy_Bps / 1e9, hw.threads)
    return hw


# -- workload -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    ffn: int
    vocab: int
    weight_bytes_stored: int     # all tensors of the checkpoint at their stored dtype
    layer_matmul_params: int     # q,k,v,out + fc1,fc2 weights of one decoder layer

    @classmethod
    def from_checkpoint(cls, directory: Path) -> "ModelShape":
        config = json.loads((Path(directory) / "config.json").read_text())
        h, f = config["hidden_size"], config.get("ffn_dim", config.get("intermediate_size"))
        stored = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
        return cls(hidden=h, layers=config["num_hidden_layers"], ffn=f, vocab=config["vocab_size"],
                   weight_bytes_stored=stored, layer_matmul_params=4 * h * h + 2 * h * f)


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    prompt_len: int
    gen_len: int

    @property
    def generated_tokens(self) -> int:
        return self.num_prompts * self.gen_len


def workload_flops(m: ModelShape, w: Workload) -> float:
    """Matmul FLOPs of prefill + decode (causal attention counted once per pair)."""
    per_token_layers = 2 * m.layers * m.layer_matmul_params
    head = 2 * m.vocab * m.hidden
    attn_per_pos = 4 * m.layers * m.hidden  # QK^T and AV, per attended position
    p, n = w.prompt_len, w.num_prompts
    prefill = n * (p * per_token_layers + head + attn_per_pos * p * (p + 1) / 2)
    decode = sum(n * (per_token_layers + head + attn_per_pos * (p + t + 1)) for t in range(1, w.gen_len))
    return prefill + decode


def kv_cache_bytes(m: ModelShape, w: Workload, itemsize: int = 4) -> int:
    return 2 * m.layers * m.hidden * w.num_prompts * (w.prompt_len + w.gen_len) * itemsize


@dataclass(frozen=True)
class Roofline:
    flops: float
    compute_bound_s: float
    weight_bytes_from_disk_per_pass: int
    weight_passes: int
    io_bound_s: float
    memory_bound_s: float          # the matmuls stream the compute-dtype weights from RAM
    compute_limit_tok_s: float
    io_limit_tok_s: float | None
    memory_limit_tok_s: float
    io_limit_all_on_disk_tok_s: float  # reference: every weight read from disk per pass
    roofline_tok_s: float
    bound: str
    assumptions: str


def roofline(m: ModelShape, w: Workload, hw: Hardware, budget_bytes: int | None,
             runtime_floor_bytes: int = 512 * 2**20, kv_itemsize: int = 4,
             compute_itemsize: int = 4, stored_itemsize: int = 2) -> Roofline:
    flops = workload_flops(m, w)
    compute_s = flops / hw.matmul_flops
    resident = 0
    if budget_bytes is not None:
        spare = budget_bytes - runtime_floor_bytes - kv_cache_bytes(m, w, kv_itemsize)
        resident = max(0, min(m.weight_bytes_stored, spare))
    from_disk = m.weight_bytes_stored - resident if budget_bytes is not None else 0
    passes = w.gen_len  # one block holding every prompt: one pass per token step
    io_s = passes * from_disk / hw.disk_read_Bps
    memory_s = passes * m.weight_bytes_stored * compute_itemsize / stored_itemsize / hw.memcpy_Bps
    tokens = w.generated_tokens
    limits = {"compute": tokens / compute_s, "disk I/O": tokens / io_s if io_s else None,
              "memory bandwidth": tokens / memory_s}  # None: no disk reads needed
    bound = min((k for k in limits if limits[k] is not None), key=limits.get)
    return Roofline(
        flops=flops, compute_bound_s=compute_s, weight_bytes_from_disk_per_pass=from_disk,
        weight_passes=passes, io_bound_s=io_s, memory_bound_s=memory_s,
        compute_limit_tok_s=limits["compute"], io_limit_tok_s=limits["disk I/O"],
        memory_limit_tok_s=limits["memory bandwidth"],
        io_limit_all_on_disk_tok_s=tokens / (passes * m.weight_bytes_stored / hw.disk_read_Bps),
        roofline_tok_s=limits[bound], bound=bound,
        assumptions=(f"one block of {w.num_prompts} prompts; KV cache ({kv_itemsize}-byte items) + "
                     f"{runtime_floor_bytes / 2**20:.0f} MiB runtime floor in RAM; "
                     f"{resident / 2**30:.2f} GiB of weights resident at stored size (upcast per "
                     f"use), the rest read from disk per pass; matmuls stream the weights in the "
                     f"{compute_itemsize}-byte compute dtype from RAM once per pass; perfect overlap"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/ckpt/opt-1.3b")
    parser.add_argument("--budget", default="2GiB")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ckpt = Path(args.checkpoint)
    hw = measure_hardware(max(ckpt.glob("*.safetensors"), key=lambda p: p.stat().st_size))
    shape = ModelShape.from_checkpoint(ckpt)
    work = Workload(args.num_prompts, args.prompt_len, args.gen_len)
    roof = roofline(shape, work, hw, parse_bytes(args.budget))
    result = {"hardware": asdict(hw), "model": asdict(shape), "workload": asdict(work),
              "roofline": asdict(roof)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
