"""Group-wise min/max quantization, checked against plain numpy references and the error bound."""
import math

import numpy as np
import pytest
import torch

from hf_flexgen.ops.quantize import QuantizedTensor, dequantize, quantize
from hf_flexgen.policy import CompressionConfig


def ref_groups(x: np.ndarray, dim: int, g: int):
    """Reference per-group min/max over the *real* elements, laid out (..., n_groups)."""
    x = np.moveaxis(x.astype(np.float64), dim, -1)
    n = x.shape[-1]
    groups = [x[..., k : min(k + g, n)] for k in range(0, n, g)]
    return np.stack([a.min(-1) for a in groups], -1), np.stack([a.max(-1) for a in groups], -1)


def per_element(stat: np.ndarray, dim: int, g: int, n: int) -> np.ndarray:
    """Broadcast a (..., n_groups) statistic back onto the elements, in the original layout."""
    return np.moveaxis(np.repeat(stat, g, axis=-1)[..., :n], -1, dim)


def f16_ulp_up(a: np.ndarray) -> np.ndarray:
    return np.nextafter(a.astype(np.float16), np.float16(np.inf)).astype(np.float64)


CASES = [((37, 50), 0), ((37, 50), 1), ((37, 50), -1), ((3, 5, 129), -1), ((3, 5, 129), 1),
         ((3, 5, 129), 0), ((1000,), 0), ((1000,), -1)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 64])
@pytest.mark.parametrize("shape,dim", CASES)
def test_round_trip_within_half_stored_scale(shape, dim, bits, group_size):
    cfg = CompressionConfig(num_bits=bits, group_size=group_size, group_dim=dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + bits)) * 3 + 1
    q = quantize(x, cfg)
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == torch.float32

    xn, yn = x.double().numpy(), y.double().numpy()
    scale = per_element(q.scale.double().numpy(), dim, group_size, shape[dim])
    err = np.abs(xn - yn)
    assert np.all(err <= scale / 2 + 1e-6 * (scale + np.abs(xn)))
    assert err.max() > 0.3 * scale.max() / 2  # non-trivial: real quantization happened

    # Stored statistics bracket the reference group range and are tight to one fp16 step.
    mn, mx = ref_groups(xn, dim, group_size)
    smin, sscale = q.minimum.double().numpy(), q.scale.double().numpy()
    assert np.all(smin <= mn) and np.all(f16_ulp_up(smin) > mn)
    levels = 2**bits - 1
    assert np.all(smin + levels * sscale >= mx - 1e-6 * np.abs(mx))
    assert np.all(sscale <= f16_ulp_up((mx - smin) / levels))  # at most one fp16 step over


@pytest.mark.parametrize("bits", [4, 8])
def test_bound_when_fp16_cannot_represent_min(bits):
    # Narrow groups far from zero: fp16 min rounding is much larger than the group range, so a
    # round-to-nearest min (or scale) would break the bound.
    base = torch.tensor([100.0, -1000.0, 3.14159, 60000.0]).repeat_interleave(64)
    x = base + torch.rand(256, generator=torch.Generator().manual_seed(0)) * 0.01
    q = quantize(x, CompressionConfig(num_bits=bits, group_size=64, group_dim=0))
    err = (x.double() - dequantize(q).double()).abs()
    scale = q.scale.double().repeat_interleave(64)
    assert torch.all(err <= scale / 2 + 1e-6 * (scale + x.double().abs()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_groups_and_zeros_round_trip_exactly(bits, dtype):
    cfg = CompressionConfig(num_bits=bits, group_size=8, group_dim=1)
    consts = torch.tensor([0.0, 1.5, -3.25, 1024.0, -0.0078125])  # exact in fp16 and bf16
    x = consts[:, None].expand(5, 20).to(dtype)  # 20 = 2.5 groups: padding path too
    for t in (x, torch.zeros(4, 13, dtype=dtype)):
        q = quantize(t, cfg)
        assert torch.all(q.scale == 0)
        assert torch.equal(dequantize(q, dtype), t)


def test_hand_checked_stats_codes_and_packing():
    # Two groups of 4 along dim 1 in each of 2 rows.
    x = torch.tensor([[0.0, 1.0, 2.0, 3.75, -1.0, -1.0, 0.5, 2.0],
                      [4.0, 4.0, 4.0, 4.0, 0.0, 7.0, 15.0, 3.0]])
    q = quantize(x, CompressionConfig(num_bits=4, group_size=4, group_dim=1))
    assert q.scale.shape == q.minimum.shape == (2, 2)
    assert q.scale.dtype == q.minimum.dtype == torch.float16
    assert q.minimum.tolist() == [[0.0, -1.0], [4.0, 0.0]]
    # (max - min) / 15: 0.25, 0.2 (not exact in fp16: rounded up one step), 0, 1.
    assert q.scale[0, 0].item() == 0.25 and q.scale[1].tolist() == [0.0, 1.0]
    assert q.scale[0, 1].item() == 0.2000732421875  # smallest fp16 >= 0.2 (nearest: 0.19995...)
    # round((x - min) / scale); (0.5 + 1) / 0.20007 = 7.497 -> 7
    codes = [[0, 4, 8, 15], [0, 0, 7, 15], [0, 0, 0, 0], [0, 7, 15, 3]]
    packed = [[c[0] | c[1] << 4, c[2] | c[3] << 4] for c in codes]  # even element in low nibble
    assert q.data.dtype == torch.uint8
    assert q.data.reshape(-1, 2).tolist() == packed

    # 8 bits, groups down the columns (group_dim 0): codes are the values themselves.
    xt = torch.tensor([[0.0, 10.0], [255.0, 10.0], [7.0, 10.0], [128.0, 10.0]])
    q8 = quantize(xt, CompressionConfig(num_bits=8, group_size=4, group_dim=0))
    assert q8.scale.tolist() == [[1.0], [0.0]] and q8.minimum.tolist() == [[0.0], [10.0]]
    assert q8.data.tolist() == [[[0, 255, 7, 128]], [[0, 0, 0, 0]]]
    assert torch.equal(dequantize(q8), xt)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,dim", CASES)
def test_packed_size_and_nbytes(shape, dim, bits):
    g = 64
    q = quantize(torch.randn(shape), CompressionConfig(num_bits=bits, group_size=g, group_dim=dim))
    padded_n = math.ceil(shape[dim] / g) * g
    padded_numel = math.prod(shape) // shape[dim] * padded_n
    n_groups = padded_numel // g
    assert q.data.numel() == (math.ceil(padded_numel / 2) if bits == 4 else padded_numel)
    assert q.scale.numel() == q.minimum.numel() == n_groups
    assert q.nbytes == q.data.numel() + 2 * 2 * n_groups
    assert q.shape == shape


def test_deterministic():
    x = torch.randn(33, 70, dtype=torch.float16)
    cfg = CompressionConfig(num_bits=4, group_size=32, group_dim=-1)
    a, b = quantize(x, cfg), quantize(x.clone(), cfg)
    for f in ("data", "scale", "minimum"):
        assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(in_dtype, out_dtype):
    x = torch.randn(6, 100).to(in_dtype)
    q = quantize(x, CompressionConfig(num_bits=8, group_size=64, group_dim=1))
    y = dequantize(q, dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    y32 = dequantize(q)  # fp32: the bound holds exactly against the low-precision input
    scale = per_element(q.scale.double().numpy(), 1, 64, 100)
    assert np.all(np.abs(x.double().numpy() - y32.double().numpy()) <= scale / 2 + 1e-6)
    assert torch.allclose(y.float(), y32, rtol=1e-2, atol=1e-2)


def test_to_moves_and_dequantizes():
    x = torch.randn(3, 5, 129)
    q = quantize(x, CompressionConfig(num_bits=4, group_size=64, group_dim=2))
    moved = q.to("cpu", non_blocking=True)
    assert isinstance(moved, QuantizedTensor) and moved.config == q.config
    assert all(t.device.type == "cpu" for t in (moved.data, moved.scale, moved.minimum))
    y = dequantize(moved)
    assert y.device.type == "cpu" and torch.equal(y, dequantize(q))


def test_empty_and_bad_inputs():
    cfg = CompressionConfig(num_bits=4, group_size=8, group_dim=1)
    assert dequantize(quantize(torch.zeros(0, 10), cfg)).shape == (0, 10)
    with pytest.raises(ValueError):
        quantize(torch.tensor(1.0), cfg)
    with pytest.raises(IndexError):
        quantize(torch.zeros(4), cfg)
    with pytest.raises(TypeError):
        quantize(torch.zeros(4, 4, dtype=torch.int32), cfg)


def reference_dequantize(q: QuantizedTensor) -> np.ndarray:
    """Plain numpy: unpack each byte's low then high nibble, code * scale + minimum per group,
    drop the padding, move the grouped dimension back."""
    codes = q.data.numpy()
    if q.config.num_bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    values = codes.astype(np.float32) * q.scale.numpy().astype(np.float32)[..., None] \
        + q.minimum.numpy().astype(np.float32)[..., None]
    dim = q.config.group_dim % len(q.shape)
    values = values.reshape(*values.shape[:-2], -1)[..., : q.shape[dim]]
    return np.moveaxis(values, -1, dim)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("shape", [(64, 96), (37, 70), (3, 5, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_into_a_buffer_matches_reference(bits, dim, shape, dtype):
    """Into a caller's buffer (in place for the last dimension, else through one copy)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q = quantize(x, CompressionConfig(num_bits=bits, group_size=16, group_dim=dim))
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = dequantize(q, dtype, out=out)
    assert got is out
    expected = torch.from_numpy(np.ascontiguousarray(reference_dequantize(q))).to(dtype)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dequantize(q, dtype), expected, rtol=1e-6, atol=1e-6)
