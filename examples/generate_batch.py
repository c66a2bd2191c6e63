"""Generate completions for a few prompts with the built-in SmolLM2 model, offloading half of
the weights to disk and the KV cache to CPU RAM."""
import logging

from transformers import AutoTokenizer

from hf_flexgen import FlexGenForCausalLM, Policy
from hf_flexgen.default_model import default_model_dir
from hf_flexgen.pipeline import generate_all

logging.basicConfig(level=logging.INFO)
directory = default_model_dir()
policy = Policy(gpu_batch_size=4, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=0,
                cache_gpu_percent=0, cache_cpu_percent=100)
model = FlexGenForCausalLM.from_pretrained(directory, policy=policy)
tokenizer = AutoTokenizer.from_pretrained(directory)
prompts = ["What is the capital of France?", "Name a primary color.", "What is 2 + 3?"]
for prompt, completion in zip(prompts, generate_all(model, tokenizer, prompts, max_new_tokens=24)):
    logging.info("%s -> %s", prompt, completion)
model.close()
