"""Group-wise asymmetric min/max quantization (FlexGen style), as pure tensor functions.

Groups are ``group_size`` contiguous elements along ``config.group_dim``; that dimension is
padded up to a multiple of ``group_size`` by replicating its last element (so padding never
changes a group's min/max). Each group stores an fp16 ``minimum`` and ``scale``; codes are
``round((x - minimum) / scale)`` in ``[0, 2**num_bits - 1]``, two codes per byte at 4 bits.

The fp16 minimum is rounded *down* and the fp16 scale *up*, and codes are computed from these
stored values, so every element satisfies ``|x - dequantize(quantize(x))| <= scale / 2`` (up to
fp32 rounding) for its group's stored scale. Inputs must lie within the fp16 range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_flexgen.policy import CompressionConfig


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed codes plus per-group fp16 scale/minimum of a tensor of shape ``shape``.

    With ``d = group_dim`` moved last, ``data`` is ``(..., n_groups, group_size)`` uint8 at 8 bits
    or ``(..., n_groups, group_size // 2)`` at 4 bits; ``scale`` and ``minimum`` are
    ``(..., n_groups)``.
    """

    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    shape: tuple
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.minimum))

    def to(self, device, non_blocking: bool = False) -> "QuantizedTensor":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedTensor(move(self.data), move(self.scale), move(self.minimum),
                               self.shape, self.config)


def _group_dim(ndim: int, config: CompressionConfig) -> int:
    if ndim < 1:
        raise ValueError("quantize needs a tensor with at least one dimension")
    if not -ndim <= config.group_dim < ndim:
        raise IndexError(f"group_dim {config.group_dim} out of range for a {ndim}-d tensor")
    return config.group_dim % ndim


def _fp16_toward(v: torch.Tensor, direction: float) -> torch.Tensor:
    """fp32 ``v`` -> fp16, rounded toward ``direction`` (-inf: down, +inf: up)."""
    h = v.to(torch.float16)
    off = h.float() < v if direction > 0 else h.float() > v
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction)), h)


def quantize(x: torch.Tensor, config: CompressionConfig) -> QuantizedTensor:
    """Quantize a floating tensor group-wise along ``config.group_dim``."""
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    dim, g = _group_dim(x.dim(), config), config.group_size
    levels = 2 ** config.num_bits - 1

    v = x.movedim(dim, -1).float()                                  # (..., n)
    n = v.shape[-1]
    pad = -n % g
    if pad:
        v = torch.cat([v, v[..., -1:].expand(*v.shape[:-1], pad)], dim=-1)
    v = v.reshape(*v.shape[:-1], (n + pad) // g, g)                 # (..., n_groups, g)

    minimum = _fp16_toward(v.amin(dim=-1), float("-inf"))           # (..., n_groups)
    lo = minimum.float()
    scale = _fp16_toward((v.amax(dim=-1) - lo) / levels, float("inf"))
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))                   # constant group: codes 0

    codes = ((v - lo[..., None]) / s[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    if config.num_bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)          # (..., n_groups, g // 2)
    return QuantizedTensor(codes.contiguous(), scale, minimum, tuple(x.shape), config)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: a ``q.shape`` tensor of ``dtype`` on ``q.data``'s device,
    written into ``out`` (contiguous, ``q.shape``) when given. Groups along the last
    dimension dequantize in place in an fp32 ``out``, with no temporary of its size."""
    dim = _group_dim(len(q.shape), q.config)
    codes = q.data                                                  # (..., n_groups, g or g // 2)
    grouped = (*codes.shape[:-1], codes.shape[-1] * (2 if q.config.num_bits == 4 else 1))
    in_place = (out is not None and out.dtype == torch.float32 and out.is_contiguous()
                and dim == len(q.shape) - 1 and math.prod(grouped) == out.numel())
    v = out.view(grouped) if in_place else torch.empty(grouped, dtype=torch.float32, device=codes.device)
    if q.config.num_bits == 4:  # unpack straight into the fp32 result (no stacked temporaries)
        v[..., 0::2] = codes & 0x0F
        v[..., 1::2] = codes >> 4
    else:
        v.copy_(codes)
    torch.addcmul(q.minimum.float()[..., None], v, q.scale.float()[..., None], out=v)
    if in_place:
        return out
    v = v.flatten(-2)[..., : q.shape[dim]].movedim(-1, dim)        # q.shape, maybe strided
    if out is None:
        return v.to(dtype).contiguous()
    return out.copy_(v)
