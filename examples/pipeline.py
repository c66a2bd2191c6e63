"""hf_flexgen.pipeline: HF's text-generation pipeline call and output, run in length-sorted
blocks; and a FlexGenForCausalLM driven by transformers.pipeline itself."""
import logging

import transformers

import hf_flexgen
from hf_flexgen.pipeline import as_transformers_model

logging.basicConfig(level=logging.INFO)
prompts = [
    "The capital of France is",                                    # plain text
    [{"role": "user", "content": "Name three fruits, one per line."}],  # a chat
    "Write a haiku about the sea.",
]
with hf_flexgen.pipeline("text-generation", policy=hf_flexgen.Policy(gpu_batch_size=4)) as pipe:
    # plain strings go through the chat template as one user turn (chat_template=False: as is)
    for prompt, out in zip(prompts, pipe(prompts, max_new_tokens=24, do_sample=False,
                                         return_full_text=False, stop="\n\n")):
        logging.info("%r -> %r", prompt, out[0]["generated_text"])

    # the same model inside transformers' own pipeline (HF semantics: the stop string is kept)
    hf_pipe = transformers.pipeline("text-generation", model=as_transformers_model(pipe.model),
                                    tokenizer=pipe.tokenizer)
    logging.info("%s", hf_pipe("The capital of France is", max_new_tokens=8, do_sample=False))
