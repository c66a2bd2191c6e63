"""Padding and throughput of a batch job with widely mixed prompt lengths, with and without
the pipeline's length sorting, on the built-in SmolLM2-135M-Instruct.

Both runs generate exactly ``--new-tokens`` tokens per prompt (``min_new_tokens`` too), so
they do the same decode work and differ only in how prompts are packed into blocks.

    python benchmarks/padding.py [--num-prompts 40] [--max-len 256] [--gpu-batch-size 8]

Prints a table and writes benchmarks/results/padding.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_flexgen import FlexGenForCausalLM, Policy
from hf_flexgen.default_model import default_model_dir
from hf_flexgen.pipeline import padding_fraction, plan_blocks, run_blocks

TEXT = ("Offline batch jobs such as benchmarks, information extraction, data wrangling and form "
        "processing care about throughput, not latency: every prompt must be answered, none "
        "in a hurry. ")


def make_job(tokenizer, count: int, max_len: int, seed: int) -> list[list[int]]:
    """``count`` prompts whose token lengths are spread log-uniformly over [4, max_len]."""
    rng = random.Random(seed)
    source = tokenizer(TEXT * (max_len // 10 + 1), add_special_tokens=False).input_ids
    lengths = [round(math.exp(rng.uniform(math.log(4), math.log(max_len)))) for _ in range(count)]
    return [source[rng.randrange(0, len(source) - n):][:n] for n in lengths]


def run(model, tokenizer, encoded, sort: bool, new_tokens: int) -> dict:
    lengths = [len(e) for e in encoded]
    blocks = plan_blocks(lengths, model.policy.block_size, sort=sort)
    stats = {"prefill_s": 0.0, "decode_s": 0.0}
    start, tokens = time.perf_counter(), 0
    for block in run_blocks(model, tokenizer, encoded, blocks, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, eos_token_id=[]):
        tokens += sum(c.new_tokens for c in block)
        for key in stats:
            stats[key] += model.last_stats.get(key, 0.0)
    wall = time.perf_counter() - start
    return {"sorted": sort, "blocks": len(blocks), "padding_fraction": padding_fraction(lengths, blocks),
            "prompt_slots": sum(len(b) * max(lengths[i] for i in b) for b in blocks),
            "wall_s": wall, "new_tokens": tokens, "tokens_per_s": tokens / wall,
            "prompts_per_s": len(encoded) / wall, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "padding.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    directory = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=args.gpu_batch_size))
    encoded = make_job(tokenizer, args.num_prompts, args.max_len, args.seed)
    try:
        run(model, tokenizer, encoded[:2], True, 2)  # warm-up
        rows = [run(model, tokenizer, encoded, sort, args.new_tokens) for sort in (False, True)]
    finally:
        model.close()

    lengths = sorted(len(e) for e in encoded)
    median = lengths[len(lengths) // 2]
    print(f"{len(encoded)} prompts, {lengths[0]}..{lengths[-1]} tokens (median {median}), "
          f"{args.new_tokens} new tokens each, blocks of {args.gpu_batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'packing':<12}{'padding':>9}{'slots':>8}{'prefill s':>11}{'decode s':>10}{'wall s':>8}"
          f"{'tok/s':>8}{'prompts/s':>11}")
    for r in rows:
        print(f"{'sorted' if r['sorted'] else 'input order':<12}{r['padding_fraction']:>9.1%}"
              f"{r['prompt_slots']:>8}{r['prefill_s']:>11.1f}{r['decode_s']:>10.1f}{r['wall_s']:>8.1f}"
              f"{r['tokens_per_s']:>8.1f}{r['prompts_per_s']:>11.2f}")
    print(f"speed-up from sorting: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "args": vars(args), "prompt_lengths": [len(e) for e in encoded], "runs": rows,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__}}, indent=2))


if __name__ == "__main__":
    main()
