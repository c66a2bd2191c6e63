"""Sampling: reproducible under a seed, and each step's warped scores equal what HF's own
logits-processor chain gives on HF's own logits for the same sequences."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from hf_flexgen import FlexGenForCausalLM, Policy
from tiny_models import left_padded_prompts

SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6)


@pytest.fixture()
def model_and_reference(tiny_checkpoint):
    reference, directory = tiny_checkpoint("llama-gqa")
    model = FlexGenForCausalLM.from_pretrained(
        directory, policy=Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=50))
    yield model, reference
    model.close()


def test_sampling_is_reproducible_under_a_seed(model_and_reference):
    model, _ = model_and_reference
    ids, mask = left_padded_prompts(count=5, max_len=7)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(input_ids=ids, attention_mask=mask, **SAMPLING))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_warped_scores_match_hf_processors(model_and_reference):
    model, reference = model_and_reference
    ids, mask = left_padded_prompts(count=5, max_len=7, seed=3)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, **SAMPLING)
    prompt = ids.shape[1]
    config = GenerationConfig(**SAMPLING)
    processors = reference._get_logits_processor(generation_config=config,
                                                 input_ids_seq_length=prompt, device="cpu")
    assert len(out.scores) == SAMPLING["max_new_tokens"]
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        seqs = out.sequences[:, :prompt + step]
        full_mask = torch.cat([mask, torch.ones(len(ids), step, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
        with torch.no_grad():
            hf_logits = reference(input_ids=seqs, attention_mask=full_mask,
                                  position_ids=positions).logits[:, -1].float()
        torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)
        expected = processors(seqs, hf_logits.clone())
        kept, kept_ref = torch.isfinite(scores), torch.isfinite(expected)
        assert torch.equal(kept, kept_ref), f"step {step}: different tokens survive top-k/top-p"
        torch.testing.assert_close(scores[kept], expected[kept_ref], atol=1e-4, rtol=1e-4)
        assert 1 <= kept.sum(-1).min() and kept.sum(-1).max() <= 20  # top_k=20 applied
