"""Placement policy and compression settings: frozen, validated configuration.

Field names follow FlexGen's so its users feel at home. Percentages split a tensor class
(weights, KV cache, activations) over three homes: the compute device ("gpu" in FlexGen's
names; the CPU itself on a machine without an accelerator), host RAM ("cpu"), and disk
(what remains: 100 - gpu - cpu).
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEVICE, CPU, DISK = "device", "cpu", "disk"
HOMES = (DEVICE, CPU, DISK)


@dataclass(frozen=True)
class CompressionConfig:
    """Group-wise min/max quantization (FlexGen's fields)."""

    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0
    symmetric: bool = False

    def __post_init__(self):
        if self.num_bits not in (4, 8):
            raise ValueError(f"CompressionConfig.num_bits must be 4 or 8, got {self.num_bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(
                f"CompressionConfig.group_size must be an even integer >= 2, got {self.group_size!r}"
            )
        if not isinstance(self.group_dim, int):
            raise ValueError(f"CompressionConfig.group_dim must be an int, got {self.group_dim!r}")
        if self.symmetric:
            raise NotImplementedError(
                "CompressionConfig.symmetric=True is not supported yet; use symmetric=False (min/max)"
            )


def _check_percent(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"Policy.{name} must be a number in [0, 100], got {value!r}")


@dataclass(frozen=True)
class Policy:
    """Where tensors live and how the block schedule is shaped.

    A block holds ``gpu_batch_size * num_gpu_batches`` sequences; each layer's weights are
    fetched once per token step and used for every micro-batch of the block. The weight
    percentages place tensors by FlexGen's rule (see :func:`assign_homes`), except that
    biases and norms stay in the cpu home when the rule sends them to disk.
    """

    gpu_batch_size: int = 8
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100
    w_cpu_percent: float = 0
    cache_gpu_percent: float = 100
    cache_cpu_percent: float = 0
    act_gpu_percent: float = 100
    act_cpu_percent: float = 0
    overlap: bool = False
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    attn_sparsity: float = 1.0
    compress_weight: bool = False
    # linear weights are (out, in): group along the input dimension (FlexGen grouped along the
    # output one). Measured on SmolLM2: +35% perplexity against +50%, and on a CPU it
    # dequantizes in place, without the transposing copy the output dimension needs
    comp_weight_config: CompressionConfig = field(default_factory=lambda: CompressionConfig(group_dim=1))
    compress_cache: bool = False
    # KV cache tensors are (batch, heads, tokens, head_dim): group along head_dim
    comp_cache_config: CompressionConfig = field(default_factory=lambda: CompressionConfig(group_dim=-1))

    def __post_init__(self):
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Policy.{name} must be a positive integer, got {value!r}")
        for prefix in ("w", "cache", "act"):
            gpu, cpu = f"{prefix}_gpu_percent", f"{prefix}_cpu_percent"
            _check_percent(gpu, getattr(self, gpu))
            _check_percent(cpu, getattr(self, cpu))
            if getattr(self, gpu) + getattr(self, cpu) > 100 + 1e-9:
                raise ValueError(
                    f"Policy.{gpu} + Policy.{cpu} must be at most 100 (the rest goes to disk), "
                    f"got {getattr(self, gpu)} + {getattr(self, cpu)}"
                )
        if self.act_gpu_percent + self.act_cpu_percent < 100 - 1e-9:
            raise ValueError(
                "Policy.act_gpu_percent + Policy.act_cpu_percent must be 100: activations cannot "
                f"live on disk, got {self.act_gpu_percent} + {self.act_cpu_percent}"
            )
        for name in ("overlap", "pin_weight", "cpu_cache_compute", "compress_weight", "compress_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Policy.{name} must be True or False, got {getattr(self, name)!r}")
        s = self.attn_sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise ValueError(f"Policy.attn_sparsity must be in (0, 1], got {s!r}")
        for name in ("comp_weight_config", "comp_cache_config"):
            if not isinstance(getattr(self, name), CompressionConfig):
                raise ValueError(f"Policy.{name} must be a CompressionConfig, got {getattr(self, name)!r}")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def shares(self, kind: str) -> dict[str, float]:
        """Fractions (summing to 1) of a tensor class over device / cpu / disk."""
        gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
        return {DEVICE: gpu / 100, CPU: cpu / 100, DISK: max(0.0, (100 - gpu - cpu) / 100)}

    @classmethod
    def from_percent(cls, percent, **kwargs) -> "Policy":
        """FlexGen's ``--percent w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu``."""
        values = [float(p) for p in (percent.split() if isinstance(percent, str) else percent)]
        if len(values) != 6:
            raise ValueError(
                "percent takes six numbers: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu, "
                f"got {len(values)}"
            )
        names = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                 "act_gpu_percent", "act_cpu_percent")
        return cls(**dict(zip(names, values)), **kwargs)


# Tensors this small against their stage (biases, norms) never live on disk: each would cost
# a read request (on the VMs measured, about as long as reading a megabyte) for a few
# kilobytes, and all of them together are a fraction of a percent of a model.
SMALL_TENSOR_SHARE = 1 / 256


def assign_homes(sizes: list[int], shares: dict[str, float]) -> list[str]:
    """FlexGen's rule: a tensor goes to the home whose percent range holds the midpoint of
    its cumulative size within the group (device first, then cpu, then disk); a tensor
    smaller than ``SMALL_TENSOR_SHARE`` of the group headed for disk stays in the cpu home."""
    total = sum(sizes) or 1
    used = [h for h in HOMES if shares[h] > 0]
    homes, seen = [], 0
    for size in sizes:
        mid, acc = (seen + size / 2) / total, 0.0
        seen += size
        for home in used:
            acc += shares[home]
            if mid < acc:
                break
        homes.append(CPU if home == DISK and size < SMALL_TENSOR_SHARE * total else home)
    return homes


def spread_units(count: int, shares: dict[str, float]) -> list[str]:
    """Interleave ``count`` equal units over homes so every prefix follows the shares."""
    taken = {h: 0 for h in HOMES}
    out = []
    for unit in range(count):
        home = max(HOMES, key=lambda h: (shares[h] * (unit + 1) - taken[h], -HOMES.index(h)))
        taken[home] += 1
        out.append(home)
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Policy", "CompressionConfig", "DEVICE", "CPU", "DISK", "HOMES", "assign_homes",
           "spread_units", "ceil_div"]
