"""Parity on a CUDA device in half precision (skipped without one).

Tolerance: fp16 rounding differs between HF's model and ours only through operation order,
so the first step's logits must agree within 2e-2 (absolute) and greedy tokens must agree on
at least 95% of the generated positions against HF's own fp16 generate()."""
from __future__ import annotations

import pytest
import torch

from hf_flexgen import FlexGenForCausalLM, Policy
from tiny_models import left_padded_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_POLICIES = [
    Policy(gpu_batch_size=4, num_gpu_batches=2),
    Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=20, w_cpu_percent=30,
           cache_gpu_percent=0, cache_cpu_percent=50, act_gpu_percent=50, act_cpu_percent=50),
]


@pytest.mark.parametrize("family", ["opt-pre-ln", "opt-post-ln-project", "llama-gqa"])
@pytest.mark.parametrize("policy", GPU_POLICIES, ids=["on-gpu", "offloaded"])
def test_fp16_parity_on_gpu(tiny_checkpoint, tmp_path, family, policy):
    cpu_reference, directory = tiny_checkpoint(family)
    reference = type(cpu_reference).from_pretrained(directory, dtype=torch.float16).cuda().eval()
    ids, mask = left_padded_prompts(count=7, max_len=11)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                      max_new_tokens=10, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, device="cuda",
                                               dtype=torch.float16, offload_dir=tmp_path)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    model.close()
    torch.testing.assert_close(got.logits[0], expected.logits[0].float().cpu(), atol=2e-2, rtol=0)
    new = slice(ids.shape[1], None)
    agree = (got.sequences[:, new] == expected.sequences[:, new].cpu()).float().mean()
    assert agree >= 0.95
