"""Hardware profile: the bandwidths and FLOP rates the cost model needs, measured once on
this machine and cached as JSON (``<cache>/hardware/<machine>.json``); refresh or override.

Rates are what the engine's own operations reach: big fp32/half matmuls (compute-bound
limit), a plain copy (the memory-bound limit of small-batch matmuls and attention), the
storage-to-compute dtype cast of streamed weights, cold disk reads with the page cache
dropped (as the engine reads), and pinned host<->device copies when a GPU is present.

The disk read rate is then learned from the engine's own runs: each run that streamed enough
weights from disk records the rate its reads reached, and the profile's ``disk_read_bw`` is
the median of the last few such observations. A short probe cannot tell a VM's burst rate or
a host-cached file from the sustained rate a whole model streams at (one VM measured 2.9 GB/s
with the probe and streamed SmolLM2 at 1.2 GB/s minutes later); the engine's reads can.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..memory.checkpoint import direct_buffer, drop_page_cache, open_direct, read_direct, read_exact
from ..memory.resolve import cache_root
from .profile_store import observe, read_json, write_json

logger = logging.getLogger(__name__)

PROFILE_VERSION = 4
OBSERVED_KEY = "observed_disk_read_bw"  # the engine's measured read rates, newest last
SAMPLED_KEY = "sampled_disk_read_bw"    # a checkpoint's sampled rate: stands in until then
OBSERVATIONS = 5             # how many are kept; the median is used
MIN_OBSERVED_BYTES = 256 * 2**20  # runs reading less say too little about the sustained rate


@dataclass(frozen=True)
class HardwareProfile:
    """Measured rates (bytes/s, FLOP/s). ``device`` is the compute device: ``cpu`` on a
    machine without an accelerator, where its rates equal the CPU's and copies are free."""

    device: str
    disk_read_bw: float          # disk -> host RAM, page cache dropped (request time apart)
    disk_request_s: float        # fixed time of one read request (the engine reads per tensor)
    disk_write_bw: float         # host RAM -> disk, fsync'd
    cpu_to_device_bw: float      # pinned host -> device (inf when the device is the CPU)
    device_to_cpu_bw: float
    device_flops: float          # large matmul in the compute dtype on the device
    device_mem_bw: float         # device memory copy (bounds small-batch matmuls, attention)
    cpu_flops: float             # large fp32 matmul on the CPU (delegated attention)
    cpu_mem_bw: float            # host memory copy
    cast_bw: float               # half -> compute dtype cast, bytes of output per second
    disk_cache_op_s: float       # one decode step of a disk-homed KV cache layer: append + read
    torch_threads: int

    @property
    def is_cpu_only(self) -> bool:
        return self.device == "cpu"

    def to_json(self) -> dict:
        return {"version": PROFILE_VERSION, **{k: (None if v == float("inf") else v)
                                               for k, v in asdict(self).items()}}

    @classmethod
    def from_json(cls, data: dict) -> "HardwareProfile":
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"hardware profile lacks {sorted(missing)}; measure it again "
                             "(refresh=True, or `hf-flexgen plan --refresh-profile`)")
        return cls(**{k: (float("inf") if data[k] is None else data[k]) for k in names})


def machine_key(device: torch.device) -> str:
    """Identifies what the profile was measured on: host, device, threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    raw = f"{platform.node()}-{name}-t{torch.get_num_threads()}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


def profile_path(device: torch.device) -> Path:
    return cache_root() / "hardware" / f"{machine_key(device)}.json"


def load_or_measure(device: torch.device, dtype: torch.dtype, disk_dir: Path | None = None,
                    refresh: bool = False, **overrides) -> HardwareProfile:
    """The cached profile for this machine (measured and saved the first time, or when
    ``refresh``), with ``overrides`` (field=value) applied on top. Its disk rate is the
    median of the runs' observed rates, else the checkpoint sample's, else the probe's."""
    path = profile_path(device)
    data = None if refresh else _read_profile(path)
    if data is None:
        logger.info("measuring this machine's bandwidths and FLOP rates (once; cached in %s)", path)
        data = measure(device, dtype, disk_dir or cache_root()).to_json()
        write_json(path, data)
    profile = HardwareProfile.from_json(data)
    observed = data.get(OBSERVED_KEY) or []
    learned = statistics.median(observed) if observed else data.get(SAMPLED_KEY)
    if learned:
        profile = replace(profile, disk_read_bw=learned)
    return replace(profile, **overrides) if overrides else profile


def observe_disk_reads(device: torch.device, nbytes: int, seconds: float, requests: int) -> None:
    """Record the rate at which a run's weight reads from disk went (``nbytes`` in
    ``requests`` read in ``seconds``, the profile's time per request taken out) into this
    machine's cached profile, if the run read at least ``MIN_OBSERVED_BYTES`` and a profile
    exists."""
    path = profile_path(device)
    rate = _transfer_rate(_read_profile(path), nbytes, seconds, requests, MIN_OBSERVED_BYTES)
    kept = rate and observe(path, OBSERVED_KEY, rate, OBSERVATIONS)
    if kept:
        logger.info("disk reads ran at %.2f GB/s (%.2f GB in %d requests); profile rate now "
                    "%.2f GB/s", rate / 1e9, nbytes / 1e9, requests, statistics.median(kept) / 1e9)


def _transfer_rate(data: dict | None, nbytes: int, seconds: float, requests: int,
                   min_bytes: int) -> float | None:
    """Bytes per second of transfer, the profile's request time taken out; None when there
    is no profile, too few bytes, or the request time explains nearly all of it."""
    if data is None or nbytes < min_bytes or seconds <= 0:
        return None
    transfer_s = seconds - requests * data["disk_request_s"]
    return nbytes / transfer_s if transfer_s >= seconds / 4 else None


SAMPLE_BYTES, SAMPLE_TENSOR_MAX, SAMPLE_TENSOR_MIN = 256 * 2**20, 16 * 2**20, 2**20


def sample_checkpoint_reads(index, device: torch.device) -> None:
    """Before any run has taught the profile its disk rate, give it one from the file the
    engine will stream: read up to ``SAMPLE_BYTES`` of the checkpoint's tensors as the engine
    reads them (one request per tensor, O_DIRECT into an aligned buffer, from a background
    thread while the cores compute). A probe file just written can be served from a host's
    cache (on one VM the probe read 3.1 GB/s, the engine 1.5). The sample stands in only
    until a run's own rate is observed: a part of a file can be cached where the whole is not
    (the first 256 MiB of SmolLM2 read at 3.0 GB/s, the whole model streamed at 0.9-1.2)."""
    path = profile_path(device)
    data = _read_profile(path)
    if data is None or data.get(OBSERVED_KEY) or data.get(SAMPLED_KEY):
        return
    picks, total = [], 0
    for name, loc in index.locations.items():
        if SAMPLE_TENSOR_MIN <= loc.nbytes <= SAMPLE_TENSOR_MAX and total < SAMPLE_BYTES:
            picks.append(name)
            total += loc.nbytes
    if total < SAMPLE_BYTES // 4:
        return  # too little of the model to tell: the probe stays
    buffer = direct_buffer(SAMPLE_TENSOR_MAX)
    nbytes, seconds, requests = index.bytes_read, index.read_s, index.reads
    _beside_compute(lambda: [index.read_into(name, buffer) for name in picks], device)
    rate = _transfer_rate(data, index.bytes_read - nbytes, index.read_s - seconds,
                          index.reads - requests, SAMPLE_BYTES // 4)
    if rate:
        write_json(path, {**data, SAMPLED_KEY: rate})
        logger.info("a sample of the checkpoint read at %.2f GB/s", rate / 1e9)


def _beside_compute(read_all, device: torch.device) -> None:
    """Run ``read_all``; on a CPU device on a background thread while this one keeps the
    cores busy with matmuls, as the engine computes while its I/O worker reads: on a 2-core
    VM, OPT-1.3B's tensors read at 2.1-2.3 GB/s idle and at 1.45 beside matmuls."""
    if device.type != "cpu":  # an accelerator computes: the host's cores stay free
        read_all()
        return
    done, errors = threading.Event(), []

    def worker():
        try:
            read_all()
        except BaseException as err:  # re-raised on the calling thread
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=worker, name="hf-flexgen-disk-sample", daemon=True)
    a, b = torch.randn(64, 2048), torch.randn(2048, 4096)
    thread.start()
    while not done.is_set():
        torch.mm(a, b)
    thread.join()
    if errors:
        raise errors[0]


def _read_profile(path: Path) -> dict | None:
    """The cached profile's JSON, or None when absent, unreadable or of an older version."""
    data = read_json(path)
    if data is None or data.get("version") != PROFILE_VERSION:
        return None
    try:
        HardwareProfile.from_json(data)
    except (ValueError, TypeError) as err:
        logger.warning("ignoring unreadable hardware profile %s (%s)", path, err)
        return None
    return data


def measure(device: torch.device, dtype: torch.dtype, disk_dir: Path) -> HardwareProfile:
    cpu = torch.device("cpu")
    cpu_flops = matmul_flops(cpu, torch.float32)
    cpu_mem = copy_bw(cpu)
    if device.type == "cpu":
        device_flops, device_mem, to_dev, from_dev = cpu_flops, cpu_mem, float("inf"), float("inf")
        if dtype != torch.float32:
            device_flops = matmul_flops(cpu, dtype)
    else:
        device_flops, device_mem = matmul_flops(device, dtype), copy_bw(device)
        to_dev, from_dev = transfer_bw(cpu, device), transfer_bw(device, cpu)
    read_bw, request_s, write_bw = disk_bw(Path(disk_dir))
    cache_op = disk_cache_op(Path(disk_dir))
    return HardwareProfile(
        device=str(device.type), disk_read_bw=read_bw, disk_request_s=request_s,
        disk_write_bw=write_bw,
        cpu_to_device_bw=to_dev, device_to_cpu_bw=from_dev, device_flops=device_flops,
        device_mem_bw=device_mem, cpu_flops=cpu_flops, cpu_mem_bw=cpu_mem,
        cast_bw=cast_bw(device, dtype), disk_cache_op_s=cache_op,
        torch_threads=torch.get_num_threads())


def time_once(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Best seconds per call of ``fn`` over ``repeats`` after one warm-up."""
    fn()
    return min(time_once(fn, device) for _ in range(repeats))


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 2048 if device.type == "cpu" else 8192
    if device.type == "cpu" and dtype != torch.float32:
        n = 256  # half matmuls can be orders of magnitude slower on CPUs
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    # nn.Linear's layout (x @ W.T): on some CPUs a half a @ b is 100x slower than this
    return 2 * n**3 / _timed(lambda: torch.nn.functional.linear(a, b), device, 3)


def copy_bw(device: torch.device) -> float:
    """Bytes read + written per second by a large copy."""
    src = torch.ones(64 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), device, 5)


def cast_bw(device: torch.device, dtype: torch.dtype) -> float:
    """fp16 -> compute dtype, bytes of output per second (the upcast of streamed weights)."""
    src = torch.ones(32 * 2**20, dtype=torch.float16, device=device)
    dst = torch.empty(src.shape, dtype=dtype, device=device)
    return dst.numel() * dst.element_size() / _timed(lambda: dst.copy_(src), device, 5)


def transfer_bw(src_device: torch.device, dst_device: torch.device) -> float:
    n = 256 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=src_device,
                      pin_memory=src_device.type == "cpu")
    dst = torch.empty(n, dtype=torch.uint8, device=dst_device,
                      pin_memory=dst_device.type == "cpu")
    sync = dst_device if dst_device.type == "cuda" else src_device
    return n / _timed(lambda: dst.copy_(src, non_blocking=True), sync, 3)


# Disk-homed weights are read one tensor at a time. On the VMs measured, one 256 MiB O_DIRECT
# request ran at 1.5-1.9 GB/s (the kernel splits it into parallel block requests), while
# 16 MiB requests in sequence, as the engine issues them, ran at 0.8 GB/s, and the engine's
# own streaming at 0.9-1.1 GB/s: the probe issues the engine's requests.
READ_REQUEST = 16 * 2**20


SMALL_REQUEST, SMALL_REQUESTS = 4096, 64


def disk_bw(directory: Path, size: int = 256 * 2**20) -> tuple[float, float, float]:
    """(read bytes/s, seconds per read request, write bytes/s) of a temporary file: a
    sequential fsync'd write, then cold reads (page cache dropped or bypassed), the median of
    three, and the median time of single-block reads scattered over the file (the fixed cost
    of a request, taken out of the sequential reads' rate)."""
    directory.mkdir(parents=True, exist_ok=True)
    chunk = torch.ones(READ_REQUEST, dtype=torch.uint8).numpy()
    handle, name = tempfile.mkstemp(prefix="hw_probe_", dir=directory)
    try:
        start = time.perf_counter()
        for offset in range(0, size, READ_REQUEST):
            done = 0
            while done < READ_REQUEST:
                done += os.pwrite(handle, chunk[done:], offset + done)
        os.fsync(handle)
        write = size / (time.perf_counter() - start)
        buffer = direct_buffer(READ_REQUEST)
        drop_page_cache(handle, 0, size)
        request_s = _request_time(name, handle, buffer, size)
        reads = []
        for _ in range(3):
            drop_page_cache(handle, 0, size)
            start = time.perf_counter()
            _read_like_weights(name, handle, buffer, size)
            elapsed = time.perf_counter() - start
            requests = -(-size // READ_REQUEST)
            reads.append(size / max(elapsed - requests * request_s, elapsed / 2))
        drop_page_cache(handle, 0, size)
        return statistics.median(reads), request_s, write
    finally:
        os.close(handle)
        os.unlink(name)


def _request_time(name: str, handle: int, buffer: torch.Tensor, size: int) -> float:
    """Median seconds of one ``SMALL_REQUEST`` read at offsets spread over the file."""
    direct = open_direct(name)
    view = memoryview(buffer.numpy())[:SMALL_REQUEST]
    times = []
    try:
        for i in range(SMALL_REQUESTS):
            offset = (i * 7919 % SMALL_REQUESTS) * (size // SMALL_REQUESTS)
            start = time.perf_counter()
            if direct is None or not read_direct(direct, view, offset, SMALL_REQUEST):
                read_exact(handle, view, offset)
                drop_page_cache(handle, offset, SMALL_REQUEST)
            times.append(time.perf_counter() - start)
    finally:
        if direct is not None:
            os.close(direct)
    return statistics.median(times)


def _read_like_weights(name: str, handle: int, buffer: torch.Tensor, size: int) -> None:
    """Read the file as disk-homed weights are read: ``READ_REQUEST`` bytes at a time, in
    sequence, with O_DIRECT into an aligned buffer where the file system allows it, else
    through the page cache."""
    direct = open_direct(name)
    view = memoryview(buffer.numpy())[:READ_REQUEST]
    try:
        for offset in range(0, size, READ_REQUEST):
            n = min(READ_REQUEST, size - offset)
            if direct is None or not read_direct(direct, view, offset, n):
                read_exact(handle, view[:n], offset)
    finally:
        if direct is not None:
            os.close(direct)


def disk_cache_op(directory: Path, steps: int = 8) -> float:
    """Seconds per decode step of one disk-homed KV-cache layer as the engine stores it
    (append a token's rows, read the stored past back with the page cache dropped): on
    small caches this latency, not the bandwidth, is the cost."""
    from ..memory.kv_cache import DiskKVStorage

    storage = DiskKVStorage(directory, torch.device("cpu"))
    try:
        parts = [torch.ones(8, 4, 32, 64), torch.ones(8, 4, 32, 64)]  # (batch, heads, tokens, dim)
        storage.write(0, parts, 32 + steps)
        row = [p[:, :, :1] for p in parts]
        start = time.perf_counter()
        for i in range(steps):
            storage.write(32 + i, row, 32 + steps)
            storage.read(32 + i + 1)
        return (time.perf_counter() - start) / steps
    finally:
        storage.close()
