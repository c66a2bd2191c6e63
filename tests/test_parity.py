"""Greedy generation is token-identical to HF's own generate() (fp32, CPU) for every family,
under policies that put weights, KV cache and activations in every home."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_flexgen import FlexGenForCausalLM, Policy

from tiny_models import TINY_CONFIGS, left_padded_prompts

POLICIES = {
    "all-device": Policy(gpu_batch_size=4, num_gpu_batches=1),
    "weights-20-30-50": Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=20, w_cpu_percent=30),
    "cache-cpu": Policy(gpu_batch_size=3, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100),
    "cache-disk": Policy(gpu_batch_size=2, num_gpu_batches=3, cache_gpu_percent=0, cache_cpu_percent=0),
    "act-cpu": Policy(gpu_batch_size=2, num_gpu_batches=2, act_gpu_percent=0, act_cpu_percent=100),
    "everything-mixed": Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=0, w_cpu_percent=50,
                               cache_gpu_percent=30, cache_cpu_percent=30, act_gpu_percent=50,
                               act_cpu_percent=50),
}


def hf_generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_greedy_matches_hf(tiny_checkpoint, tmp_path, family, policy_name, overlap):
    reference, directory = tiny_checkpoint(family)
    ids, mask = left_padded_prompts(count=7, max_len=11)  # 7: not a multiple of any block
    expected = hf_generate(reference, ids, mask, max_new_tokens=10)
    policy = dataclasses.replace(POLICIES[policy_name], overlap=overlap)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    try:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    finally:
        model.close()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["opt-pre-ln", "llama-gqa"])
@pytest.mark.parametrize("num_gpu_batches", [1, 3])
def test_early_eos_pads_like_hf(tiny_checkpoint, family, num_gpu_batches):
    reference, directory = tiny_checkpoint(family)
    ids, mask = left_padded_prompts(count=6, max_len=8, seed=1)
    free_run = hf_generate(reference, ids, mask, max_new_tokens=12, eos_token_id=None)
    # Make the token one row produces at its 3rd step the EOS: that row stops early.
    eos = int(free_run[0, ids.shape[1] + 2])
    expected = hf_generate(reference, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert (expected[:, ids.shape[1]:] == 0).any(), "the reference should stop some row early"
    model = FlexGenForCausalLM.from_pretrained(
        directory, policy=Policy(gpu_batch_size=2, num_gpu_batches=num_gpu_batches,
                                 cache_gpu_percent=50, cache_cpu_percent=0, overlap=True))
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                         eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


def test_min_new_tokens_and_max_length_follow_hf(tiny_checkpoint):
    reference, directory = tiny_checkpoint("opt-pre-ln")
    ids, mask = left_padded_prompts(count=3, max_len=6, seed=2)
    free_run = hf_generate(reference, ids, mask, max_new_tokens=8, eos_token_id=None)
    eos = int(free_run[1, ids.shape[1]])  # row 1 would stop at once
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=2))
    for kwargs in ({"min_new_tokens": 4, "max_new_tokens": 8}, {"max_length": 11}):
        expected = hf_generate(reference, ids, mask, eos_token_id=eos, pad_token_id=0, **kwargs)
        got = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                             **kwargs)
        assert torch.equal(got, expected), kwargs


def test_single_prompt_without_mask(tiny_checkpoint):
    reference, directory = tiny_checkpoint("llama-gqa")
    ids = torch.tensor([[5, 9, 17, 33, 4]])
    expected = hf_generate(reference, ids, torch.ones_like(ids), max_new_tokens=6)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=8, num_gpu_batches=4))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=2, num_gpu_batches=3),
    Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=30,
           cache_gpu_percent=0, cache_cpu_percent=50, act_gpu_percent=0, act_cpu_percent=100,
           overlap=True),
], ids=["all-device", "disk-weights-and-cache-overlap"])
def test_smollm2_greedy_matches_hf(smollm2_dir, tmp_path, policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three prime numbers.", "Hi", "Explain photosynthesis to a child."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    expected = hf_generate(reference, batch.input_ids, batch.attention_mask, max_new_tokens=16)
    model = FlexGenForCausalLM.from_pretrained(smollm2_dir, policy=policy, offload_dir=tmp_path)
    got = model.generate(**batch, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0, batch.input_ids.shape[1]:])


def test_stats_count_disk_reads(tiny_checkpoint, tmp_path):
    """Disk-homed weights are read once per token step for the whole block (not per
    micro-batch) unless their staging buffer still holds them, and the KV cache on disk is
    read back each decode step."""
    _, directory = tiny_checkpoint("opt-pre-ln")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=0, w_cpu_percent=0,
                    cache_gpu_percent=0, cache_cpu_percent=0, overlap=True)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    ids, mask = left_padded_prompts(count=6, max_len=5)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                   eos_token_id=None, do_sample=False)
    stats = model.last_stats
    # Everything is on disk but the biases and norms (too small to be worth a read request:
    # they stay in RAM). Staging buffers are reused by tensor role and stage parity, and a
    # buffer still holding its tensor is not read again. Stages: embedding (0), layers 0-2
    # (1-3), head (4, tied to the embedding). Layers 0 and 2 (stages 1 and 3) share buffers,
    # so they are read every step; the others keep their buffers: read once.
    locations = model.store.index.locations
    on_disk = {spec.key for spec in model.store.all_specs() if spec.home == "disk"}
    small = [key for key in locations if key not in on_disk]
    assert small and all(locations[key].nbytes < 1024 for key in small)  # biases, norms
    layer = lambda i: sum(locations[key].nbytes for key in on_disk if f".layers.{i}." in key)  # noqa: E731
    once = sum(locations[key].nbytes for key in on_disk)
    assert stats["weight_bytes_read"] == once + 3 * (layer(0) + layer(2))
    assert stats["kv_bytes_read"] > 0 and stats["prefill_s"] > 0 and stats["decode_s"] > 0
    assert not list(tmp_path.glob("kv_*")), "KV cache files are removed after the block"
    model.close()


@pytest.mark.parametrize("policy", [Policy(gpu_batch_size=2, num_gpu_batches=2),
                                    Policy(gpu_batch_size=3, num_gpu_batches=1, w_gpu_percent=0,
                                           cache_gpu_percent=0, cache_cpu_percent=0, overlap=True)],
                         ids=["device", "disk"])
def test_score_matches_hf_log_probs(tiny_checkpoint, tmp_path, policy):
    reference, directory = tiny_checkpoint("llama-gqa")
    ids, mask = left_padded_prompts(count=5, max_len=6, seed=7)
    targets = torch.randint(4, 100, (5, 5), generator=torch.Generator().manual_seed(1))
    full_ids, full_mask = torch.cat([ids, targets], 1), torch.cat([mask, torch.ones_like(targets)], 1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    with torch.no_grad():
        logits = reference(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    expected = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].float(), -1).gather(
        2, targets[..., None]).squeeze(-1)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    torch.testing.assert_close(model.score(ids, mask, targets), expected, atol=1e-4, rtol=1e-4)
    model.close()


@pytest.mark.parametrize("family", ["opt-pre-ln", "opt-post-ln-project", "llama-tied", "llama-gqa"])
@pytest.mark.parametrize("weights_home", ["disk", "cpu"])
def test_half_checkpoint_in_fp32_matches_hf(tmp_path, monkeypatch, family, weights_home):
    """A half checkpoint computed in fp32 on a CPU (its fast dtype) gives HF's fp32 tokens
    for the same checkpoint. The vocabulary tables stay half: the embedding casts the rows
    it looks up and the LM head casts a few rows at a time (5 here), so no fp32 copy of a
    whole table is ever held."""
    from transformers import AutoModelForCausalLM

    import hf_flexgen.memory.weights as weights_module
    config = TINY_CONFIGS[family]()
    width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size  # the table's
    monkeypatch.setattr(weights_module, "TABLE_CHUNK_BYTES", 5 * width * 4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).half().save_pretrained(tmp_path / "ckpt")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids, mask = left_padded_prompts(count=5, max_len=9, seed=3)
    expected = hf_generate(reference, ids, mask, max_new_tokens=8)
    percent = 100 if weights_home == "cpu" else 0
    policy = Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=percent,
                    cache_gpu_percent=0, cache_cpu_percent=100, overlap=True)
    model = FlexGenForCausalLM.from_pretrained(tmp_path / "ckpt", policy=policy, dtype=torch.float32,
                                               offload_dir=tmp_path / "offload")
    try:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        table = tuple(reference.get_input_embeddings().weight.shape)
        fp32_shapes = [tuple(b.shape) for b in model.store._buffers.values() if b.dtype == torch.float32]
    finally:
        model.close()
    assert torch.equal(got, expected)
    assert (5, table[1]) in fp32_shapes and table not in fp32_shapes
