"""Memory limits in Hugging Face's ``max_memory`` convention, and what is free by default.

``{"cuda:0": "16GiB", "cpu": "100GiB", "disk": "500GiB"}`` (or ``{0: ...}`` for the GPU;
values in bytes or as strings, "GB" = 10^9 and "GiB" = 2^30 as in Accelerate). The cpu
limit caps the whole process (what a cgroup or a container would cap), its current
footprint included. Homes left out default to what is free now, less a safety margin.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int

from ..policy import CPU, DEVICE, DISK

SAFETY = 0.9  # of what is free, when a limit is not given
# RAM the planner leaves unplanned below the cpu limit: the process's page cache (library
# code, file-system pages) lives there. Runs planned to within 1-3% of a memory cgroup's
# limit were measured up to 2x slower than predicted while the kernel kept reclaiming those
# pages; runs planned 5% below it ran as predicted.
HEADROOM_SHARE, HEADROOM_MIN, HEADROOM_MAX = 0.05, 64 * 2**20, 2**30


def parse_max_memory(max_memory: dict | None, device: torch.device, disk_dir: Path) -> dict[str, int]:
    """Limits in bytes per home (device / cpu / disk). On a CPU-only machine the device is
    host RAM: its limit is the cpu one."""
    given: dict[str, int] = {}
    for key, value in (max_memory or {}).items():
        home = _home_of(key, device)
        try:
            size = convert_file_size_to_int(value)
        except ValueError as err:
            raise ValueError(f"max_memory[{key!r}] = {value!r} is not a size; use bytes or a "
                             "string like '16GiB'") from err
        if size <= 0:
            raise ValueError(f"max_memory[{key!r}] must be positive, got {value!r}")
        given[home] = size
    limits = {CPU: given.get(CPU) or default_cpu_limit(),
              DISK: given.get(DISK) or int(SAFETY * shutil.disk_usage(_existing(disk_dir)).free)}
    if device.type == "cpu":
        if DEVICE in given:
            raise ValueError(f"max_memory names an accelerator but the compute device is cpu; "
                             f"give only 'cpu' (and 'disk') limits, got {sorted(max_memory)}")
        limits[DEVICE] = 0
    else:
        limits[DEVICE] = given.get(DEVICE) or int(SAFETY * torch.cuda.mem_get_info(device)[0])
    return limits


def with_headroom(limits: dict[str, int]) -> dict[str, int]:
    """The limits the planner fills: the cpu one less its page-cache headroom (5%, at
    least 64 MiB and at most 1 GiB)."""
    headroom = min(max(int(HEADROOM_SHARE * limits[CPU]), HEADROOM_MIN), HEADROOM_MAX)
    return {**limits, CPU: max(0, limits[CPU] - headroom)}


def _home_of(key, device: torch.device) -> str:
    if key == "cpu":
        return CPU
    if key == "disk":
        return DISK
    if isinstance(key, int) or str(key).startswith(("cuda", "gpu")) or key == "device":
        return DEVICE
    raise ValueError(f"max_memory key {key!r} is not understood; use 'cpu', 'disk', 'cuda:0' or 0")


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def process_rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def default_cpu_limit() -> int:
    """This process's footprint plus a safety share of what it could still take: the
    smaller of the machine's available memory and its memory cgroup's headroom."""
    free = _mem_available()
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        free = min(free, cgroup)
    return process_rss() + int(SAFETY * free)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass max_memory={'cpu': ...}")


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), if it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file, usage_file = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit, usage = limit_file.read_text().strip(), int(usage_file.read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None
