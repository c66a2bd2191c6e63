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


def quantized_linear_weights(model) -> list[torch.nn.Parameter]:
    """What compress_weight quantizes: nn.Linear weights not shared with an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [m.weight for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in embeddings]


def fake_quantized_weights(model, config):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for weight in quantized_linear_weights(model):
            weight.copy_(fake_quant(weight, config))
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


@pytest.mark.parametrize("family", ["opt-post-ln-project", "llama-gqa", "llama-tied"])
def test_only_linear_layer_weights_are_compressed(tiny_checkpoint, family):
    reference, directory = tiny_checkpoint(family)
    names = {id(p): n for n, p in reference.named_parameters()}  # tied: the first name
    expected = {names[id(w)] for w in quantized_linear_weights(reference)}
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(compress_weight=True))
    compressed = {s.name for s in model.store.all_specs() if s.key in model.store.compressed}
    model.close()
    assert compressed == expected
    assert not any("embed" in name for name in compressed)
    assert ("lm_head.weight" in compressed) == (family == "llama-gqa")  # untied only


def test_smollm2_linear_weights_survive_its_source_grid(smollm2_dir):
    """SmolLM2's layers come from Q4_1 (4 bits, blocks of 32 along the input dimension, fp16
    scale and minimum): quantizing them again on that grid must give them back exactly."""
    from safetensors import safe_open
    config = CompressionConfig(num_bits=4, group_size=32, group_dim=1)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if k.startswith(("model.layers.0.", "model.layers.29."))
                and k.endswith("proj.weight")]
        assert len(keys) == 14
        for key in keys:
            weight = f.get_tensor(key)
            assert torch.equal(fake_quant(weight, config), weight), key


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
    specs = {s.key: s for s in model.store.all_specs()}.values()  # tied tensors once
    matrices = sum(s.numel for s in specs if s.key in model.store.compressed)
    others = sum(s.numel for s in specs if s.key not in model.store.compressed)
    stored = model.store.bytes_by_home()["cpu"] - others * model.dtype.itemsize
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
