"""4-bit/8-bit compression in the engine, checked against HF's own generate() on models whose
weights / cache are quantized the same way in plain PyTorch (fake quantization)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import DynamicCache

from hf_flexgen import CompressionConfig, FlexGenForCausalLM, Policy
from hf_flexgen.ops.quantize import dequantize, quantize
from tiny_models import left_padded_prompts

HOME_POLICIES = {
    "device": dict(w_gpu_percent=100, cache_gpu_percent=100),
    "cpu": dict(w_gpu_percent=0, w_cpu_percent=100, cache_gpu_percent=0, cache_cpu_percent=100),
    "disk": dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0),
    "mixed": dict(w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=30, cache_cpu_percent=30),
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path / "cache"))


def fake_quant(t: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    return dequantize(quantize(t, config), t.dtype)


def fake_quantized_weights(model, config):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():  # tied parameters are listed once
            if param.dim() >= 2:
                param.copy_(fake_quant(param, config))
    return model


class FakeQuantCache(DynamicCache):
    """Stores the past quantized-then-dequantized; this step's tokens enter attention exactly."""

    def __init__(self, config, compression):
        super().__init__(config=config)
        self.compression = compression

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        new = key_states.shape[-2]
        keys, values = super().update(fake_quant(key_states, self.compression),
                                      fake_quant(value_states, self.compression), layer_idx)
        return (torch.cat([keys[..., :-new, :], key_states], dim=-2),
                torch.cat([values[..., :-new, :], value_states], dim=-2))


@pytest.mark.parametrize("family", ["opt-pre-ln", "llama-tied", "llama-gqa"])
@pytest.mark.parametrize("home", sorted(HOME_POLICIES))
@pytest.mark.parametrize("config", [CompressionConfig(4, 32, 0), CompressionConfig(4, 16, 1),
                                    CompressionConfig(8, 64, 1)], ids=["4b-g32-d0", "4b-g16-d1", "8b-g64-d1"])
def test_compressed_weights_match_hf_with_quantized_weights(tiny_checkpoint, tmp_path, family, home, config):
    reference, directory = tiny_checkpoint(family)
    reference = fake_quantized_weights(reference, config)
    ids, mask = left_padded_prompts(count=5, max_len=9)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, overlap=True, compress_weight=True,
                    comp_weight_config=config, **HOME_POLICIES[home])
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model.close()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["opt-post-ln-project", "llama-gqa"])
@pytest.mark.parametrize("home", sorted(HOME_POLICIES))
@pytest.mark.parametrize("overlap", [False, True])
def test_compressed_cache_matches_hf_with_quantized_cache(tiny_checkpoint, tmp_path, family, home, overlap):
    reference, directory = tiny_checkpoint(family)
    config = CompressionConfig(num_bits=4, group_size=4, group_dim=-1)
    ids, mask = left_padded_prompts(count=5, max_len=9, seed=4)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                      do_sample=False,
                                      past_key_values=FakeQuantCache(reference.config, config))
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, overlap=overlap, compress_cache=True,
                    comp_cache_config=config, **HOME_POLICIES[home])
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model.close()
    assert torch.equal(got, expected)


def test_weights_and_cache_compressed_together(tiny_checkpoint, tmp_path):
    reference, directory = tiny_checkpoint("llama-gqa")
    wconf, cconf = CompressionConfig(4, 32, 1), CompressionConfig(4, 8, -1)
    reference = fake_quantized_weights(reference, wconf)
    ids, mask = left_padded_prompts(count=4, max_len=7, seed=5)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                      do_sample=False, past_key_values=FakeQuantCache(reference.config, cconf))
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, overlap=True, w_gpu_percent=20,
                    w_cpu_percent=30, cache_gpu_percent=0, cache_cpu_percent=50,
                    compress_weight=True, comp_weight_config=wconf, compress_cache=True,
                    comp_cache_config=cconf)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                      do_sample=False), expected)
    model.close()


def test_compressed_checkpoint_is_reused_and_invalidated(tiny_checkpoint, tmp_path):
    _, original = tiny_checkpoint("opt-pre-ln")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for f in original.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    policy = Policy(compress_weight=True, w_gpu_percent=0, w_cpu_percent=0)

    def compressed_dir(p=policy):
        model = FlexGenForCausalLM.from_pretrained(directory, policy=p)
        path = model.store.compressed.directory
        model.close()
        return path

    first = compressed_dir()
    stamp = (first / "done.json").stat().st_mtime_ns
    assert compressed_dir() == first and (first / "done.json").stat().st_mtime_ns == stamp
    other = Policy(compress_weight=True, comp_weight_config=CompressionConfig(group_size=32))
    assert compressed_dir(other) != first
    shard = next(directory.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert compressed_dir() != first


def test_compressed_bytes_against_fp16(tiny_checkpoint, tmp_path):
    """Stored bytes versus the same tensors in fp16: weights in their home, KV cache in its
    storage (head_dim 64, group 64, 4 bits: (32 + 2 + 2) / 128 bytes = 0.28)."""
    _, directory = tiny_checkpoint("llama-gqa")
    policy = Policy(w_gpu_percent=0, w_cpu_percent=100, compress_weight=True,
                    comp_weight_config=CompressionConfig(4, 64, 1))
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy)
    matrices = sum(s.numel for s in model.store.all_specs() if len(s.shape) >= 2)
    vectors = sum(s.numel for s in model.store.all_specs() if len(s.shape) < 2)
    stored = model.store.bytes_by_home()["cpu"] - vectors * model.dtype.itemsize
    assert stored <= 0.30 * matrices * 2
    model.close()

    from hf_flexgen.memory.kv_cache import FlexKVCache
    from hf_flexgen.memory.prefetch import IOWorker
    keys, values = torch.randn(2, 4, 3, 10, 64).unbind(0)  # (batch, heads, tokens, head_dim)
    for home in ("device", "cpu", "disk"):
        cache = FlexKVCache([home], capacity=10, device=torch.device("cpu"), directory=tmp_path,
                            io=IOWorker(False, torch.device("cpu")),
                            compression=CompressionConfig(4, 64, -1))
        cache.update(keys, values, 0)
        assert cache.nbytes_by_home()[home] <= 0.30 * 2 * keys.numel() * 2
        cache.close()
