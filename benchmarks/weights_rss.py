"""Peak RSS of generation with every weight homed on disk versus every weight in CPU RAM.

Each placement runs in its own fresh process (peak RSS is per process). Disk-homed weights
are read per use and dropped: the disk run's peak should sit near the baseline plus about
one stage's weights, the CPU run's near the baseline plus the whole model.

    python benchmarks/weights_rss.py --model opt-1.3b --out benchmarks/results/weights_rss.json
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PLACEMENTS = {"disk": (0, 0), "cpu": (0, 100)}


def run_one(checkpoint: str, placement: str, prompts: int, prompt_len: int, new_tokens: int, queue):
    import torch
    from hf_flexgen import FlexGenForCausalLM, Policy
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w_gpu, w_cpu = PLACEMENTS[placement]
    policy = Policy(gpu_batch_size=prompts, w_gpu_percent=w_gpu, w_cpu_percent=w_cpu)
    start = time.perf_counter()
    model = FlexGenForCausalLM.from_pretrained(checkpoint, policy=policy, device="cpu")
    loaded = time.perf_counter()
    ids = torch.randint(10, 50000, (prompts, prompt_len), generator=torch.Generator().manual_seed(0))
    model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    done = time.perf_counter()
    queue.put({"placement": placement, "baseline_rss_mib": baseline / 1024,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "weights_by_home_mib": {h: b / 2**20 for h, b in model.store.bytes_by_home().items()},
               "load_s": loaded - start, "generate_s": done - loaded})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-1.3b", help="a benchmarks/make_checkpoint.py shape")
    parser.add_argument("--checkpoint-root", default="/tmp/hf_flexgen_ckpt")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/weights_rss.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from make_checkpoint import make_checkpoint
    checkpoint = make_checkpoint(args.model, Path(args.checkpoint_root) / args.model)
    ctx = mp.get_context("spawn")
    rows = []
    for placement in PLACEMENTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(str(checkpoint), placement, args.prompts,
                                                 args.prompt_len, args.new_tokens, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    checkpoint_mib = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors")) / 2**20
    logging.info("%s (%.0f MiB fp16 on disk), %d prompts x %d tokens, %d new tokens, CPU fp32",
                 args.model, checkpoint_mib, args.prompts, args.prompt_len, args.new_tokens)
    logging.info("%-10s %14s %14s %12s %12s", "weights", "baseline MiB", "peak RSS MiB", "load s", "generate s")
    for r in rows:
        logging.info("%-10s %14.0f %14.0f %12.1f %12.1f", r["placement"], r["baseline_rss_mib"],
                     r["peak_rss_mib"], r["load_s"], r["generate_s"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "checkpoint_mib": checkpoint_mib,
                               "workload": vars(args), "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
