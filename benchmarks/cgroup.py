"""Run a command in a fresh cgroup v1 memory cgroup: RSS + page cache capped at a budget.

Needs root and the v1 memory controller at /sys/fs/cgroup/memory. The child joins the
cgroup before it execs (so imports count too); swap is ruled out by setting
``memory.memsw.limit_in_bytes`` to the same budget (where present) and swappiness 0.

A parent that starts capped runs must not import torch itself: the pages of shared libraries
it maps stay resident and are charged to its own cgroup, so a child mapping the same pages
would hold them in its RSS without its cap ever seeing them (about 100 MB). Such parents do
that work through ``run_python`` and ``make_checkpoint_outside`` and call
``assert_torch_free`` before their runs.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '1.5G', '512MiB' or a plain int -> bytes (binary units throughout)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    if unit not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {text!r}")
    return int(float(number) * _UNITS[unit])


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter and return what it printed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"helper interpreter failed (exit {done.returncode}) running "
                           f"{code[:80]!r}...:\n{done.stderr[-2000:]}")
    return done.stdout


def make_checkpoint_outside(model: str, out: Path) -> Path:
    """``make_checkpoint.py MODEL --out OUT`` in a subprocess (it imports torch)."""
    script = Path(__file__).resolve().parent / "make_checkpoint.py"
    subprocess.run([sys.executable, str(script), model, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def assert_torch_free() -> None:
    assert "torch" not in sys.modules, "a parent of capped runs must not import torch (see cgroup.py)"


def format_gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"


def cgroup_available() -> bool:
    return CGROUP_ROOT.is_dir() and os.access(CGROUP_ROOT, os.W_OK)


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache so no run reads another's cached bytes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass(frozen=True)
class CgroupRun:
    returncode: int
    killed_by: str | None      # "oom" (memory cgroup OOM killer), "timeout", or None
    wall_s: float
    child_maxrss_bytes: int    # ru_maxrss of the child (from wait4)
    cgroup_peak_bytes: int     # memory.max_usage_in_bytes (RSS + page cache + kernel)
    oom_kills: int


class MemoryCgroup:
    """A temporary child cgroup with a hard memory limit; remove() deletes it."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        self.path = CGROUP_ROOT / (name or f"bench_{uuid.uuid4().hex[:8]}")
        self.path.mkdir()
        self.limit_bytes = limit_bytes
        self._write("memory.limit_in_bytes", limit_bytes)
        if (self.path / "memory.memsw.limit_in_bytes").exists():
            self._write("memory.memsw.limit_in_bytes", limit_bytes)
        if (self.path / "memory.swappiness").exists():
            self._write("memory.swappiness", 0)

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(f"{value}\n")

    def read_int(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def join(self) -> None:
        """Called in the child between fork and exec."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def remove(self) -> None:
        for _ in range(50):  # the last task may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        logger.warning("could not remove cgroup %s", self.path)


def run_in_cgroup(argv: list[str], limit_bytes: int, timeout_s: float | None,
                  log_path: Path, drop: bool = True) -> CgroupRun:
    """Run ``argv`` in a fresh memory cgroup (stdout+stderr to ``log_path``); never raises
    on the child's failure: the outcome is in the returned record."""
    if drop:
        drop_caches()
    group = MemoryCgroup(limit_bytes)
    timed_out = threading.Event()
    try:
        with open(log_path, "wb") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=group.join)

            def kill():
                timed_out.set()
                os.kill(proc.pid, signal.SIGKILL)

            timer = threading.Timer(timeout_s, kill) if timeout_s else None
            if timer:
                timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            if timer:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
        oom = group.oom_kills()
        killed_by = None
        if proc.returncode == -signal.SIGKILL:
            killed_by = "timeout" if timed_out.is_set() and not oom else "oom" if oom else "sigkill"
        return CgroupRun(returncode=proc.returncode, killed_by=killed_by, wall_s=wall,
                         child_maxrss_bytes=usage.ru_maxrss * 1024,
                         cgroup_peak_bytes=group.read_int("memory.max_usage_in_bytes"),
                         oom_kills=oom)
    finally:
        group.remove()
