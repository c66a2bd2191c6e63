"""Bad input gets a clear error that names what to change."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, T5Config

from hf_flexgen import CompressionConfig, FlexGenForCausalLM, Policy


@pytest.mark.parametrize("kwargs, field", [
    ({"gpu_batch_size": 0}, "gpu_batch_size"),
    ({"num_gpu_batches": 1.5}, "num_gpu_batches"),
    ({"w_gpu_percent": 120}, "w_gpu_percent"),
    ({"cache_gpu_percent": 60, "cache_cpu_percent": 50}, "cache_gpu_percent + Policy.cache_cpu_percent"),
    ({"act_gpu_percent": 50, "act_cpu_percent": 0}, "act_gpu_percent"),
    ({"attn_sparsity": 0}, "attn_sparsity"),
    ({"overlap": "yes"}, "overlap"),
])
def test_invalid_policy_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(f"Policy.{field}")):
        Policy(**kwargs)


def test_compression_config_validation():
    with pytest.raises(ValueError, match="num_bits"):
        CompressionConfig(num_bits=3)
    with pytest.raises(ValueError, match="group_size"):
        CompressionConfig(group_size=7)


def test_percent_parsing():
    policy = Policy.from_percent("20 30 0 100 100 0", gpu_batch_size=4)
    assert policy.shares("w") == pytest.approx({"device": 0.2, "cpu": 0.3, "disk": 0.5})
    with pytest.raises(ValueError, match="six numbers"):
        Policy.from_percent([1, 2, 3])


def test_unsupported_architecture_lists_supported(tmp_path):
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama.*opt"):
        FlexGenForCausalLM.from_pretrained(tmp_path)


def test_not_a_causal_lm(tmp_path):
    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal language model"):
        FlexGenForCausalLM.from_pretrained(tmp_path)


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FlexGenForCausalLM.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FlexGenForCausalLM.from_pretrained(tmp_path)


def test_beam_search_not_yet_and_unknown_arguments(tiny_checkpoint):
    _, directory = tiny_checkpoint("opt-pre-ln")
    model = FlexGenForCausalLM.from_pretrained(directory)
    with pytest.raises(NotImplementedError, match="num_beams"):
        model.generate(torch.tensor([[4, 5, 6]]), num_beams=2, max_new_tokens=2)
    with pytest.raises(TypeError, match="unexpected"):
        model.generate(torch.tensor([[4, 5, 6]]), max_new_token=2)
