"""CPU-delegated and top-K sparse attention, against HF and plain PyTorch references."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_flexgen import CompressionConfig, FlexGenForCausalLM, Policy
from hf_flexgen.ops.attention import keep_count, topk_attention
from tiny_models import left_padded_prompts


def reference_topk(q, k, v, mask, scaling, sparsity):
    """Loop over (batch, head): dense scores, keep the top ceil(s * real tokens) (newest
    forced), softmax over the kept ones, weighted sum of their values."""
    b, h, _, d = q.shape
    groups = h // k.shape[1]
    n = k.shape[2]
    out = torch.zeros(b, h, 1, d)
    for i in range(b):
        real = [t for t in range(n) if mask is None or bool(mask[i, 0, 0, t])]
        keep = keep_count(sparsity, len(real))
        assert keep == math.ceil(round(sparsity * len(real), 6))
        for j in range(h):
            scores = (k[i, j // groups] @ q[i, j, 0]) * scaling           # (n,)
            ranked = sorted(real[:-1], key=lambda t: -scores[t].item())[:keep - 1] + [n - 1]
            weights = torch.softmax(scores[ranked], dim=0)
            out[i, j, 0] = weights @ v[i, j // groups, ranked]
    return out


@pytest.mark.parametrize("sparsity", [1.0, 0.5, 0.2])
def test_topk_attention_matches_reference(sparsity):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8, generator=g), torch.randn(3, 2, 13, 8, generator=g), torch.randn(3, 2, 13, 8, generator=g)
    mask = torch.ones(3, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    rows = lambda bi, hi, ti: v[bi, hi, ti]  # noqa: E731
    got = topk_attention(q, k, rows, mask, 0.35, sparsity)
    torch.testing.assert_close(got, reference_topk(q, k, v, mask, 0.35, sparsity), atol=1e-5, rtol=1e-5)
    if sparsity == 1.0:  # all keys kept: plain softmax attention
        dense = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.35)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


DELEGATION_POLICIES = {
    "cache-cpu": dict(cache_gpu_percent=0, cache_cpu_percent=100),
    "cache-split": dict(cache_gpu_percent=30, cache_cpu_percent=40),
    "cache-cpu-4bit": dict(cache_gpu_percent=0, cache_cpu_percent=100, compress_cache=True,
                           comp_cache_config=CompressionConfig(4, 8, -1)),
}


@pytest.mark.parametrize("family", ["opt-pre-ln", "llama-gqa"])
@pytest.mark.parametrize("case", sorted(DELEGATION_POLICIES))
@pytest.mark.parametrize("overlap", [False, True])
def test_delegated_attention_matches_device_attention(tiny_checkpoint, tmp_path, family, case, overlap):
    """Greedy tokens with delegation equal those without it (and both equal HF when the
    cache is not compressed)."""
    reference, directory = tiny_checkpoint(family)
    ids, mask = left_padded_prompts(count=5, max_len=9, seed=11)
    base = Policy(gpu_batch_size=2, num_gpu_batches=3, overlap=overlap, **DELEGATION_POLICIES[case])
    outputs = []
    for delegate in (False, True):
        model = FlexGenForCausalLM.from_pretrained(
            directory, policy=dataclasses.replace(base, cpu_cache_compute=delegate), offload_dir=tmp_path)
        outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
        model.close()
    assert torch.equal(outputs[0], outputs[1])
    if "4bit" not in case:
        with torch.no_grad():
            expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert torch.equal(outputs[1], expected)


def _register_reference_topk(sparsity: float) -> str:
    name = f"topk_reference_{sparsity}"

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] != 1 or key.shape[2] == 1:  # prefill: dense, as hf_flexgen does
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = reference_topk(query, key, value, attention_mask, scale, sparsity)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@pytest.mark.parametrize("family", ["opt-post-ln-project", "llama-gqa"])
@pytest.mark.parametrize("home", ["device", "cpu", "disk"])
def test_sparse_generation_matches_reference_topk_in_hf(tiny_checkpoint, tmp_path, family, home):
    sparsity = 0.3
    _, directory = tiny_checkpoint(family)
    reference = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation=_register_reference_topk(sparsity)).eval()
    ids, mask = left_padded_prompts(count=4, max_len=12, seed=12)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True)
    homes = {"device": dict(cache_gpu_percent=100), "cpu": dict(cache_gpu_percent=0, cache_cpu_percent=100),
             "disk": dict(cache_gpu_percent=0, cache_cpu_percent=0)}[home]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, attn_sparsity=sparsity, overlap=True, **homes)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    model.close()
    for ours, theirs in zip(got.logits, expected.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)
    assert torch.equal(got.sequences, expected.sequences)


def test_sparsity_reads_fewer_value_bytes(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama-gqa")
    ids = torch.randint(4, 100, (4, 40), generator=torch.Generator().manual_seed(3))
    read = {}
    for sparsity in (1.0, 0.1):
        policy = Policy(gpu_batch_size=4, cache_gpu_percent=0, cache_cpu_percent=100, attn_sparsity=sparsity)
        model = FlexGenForCausalLM.from_pretrained(directory, policy=policy)
        model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        read[sparsity] = model.last_stats["v_bytes_read"]
        model.close()
    # decode steps over ~42 tokens keep ceil(0.1 * 42) = 5 per query head; the 2 query heads
    # of a kv head share their rows: at most 10 of ~42 rows read
    assert 0 < read[0.1] <= 0.25 * read[1.0]
