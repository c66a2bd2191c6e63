"""``hf-flexgen`` command line. Argument parsing and printing live only here."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Give three tips for writing clear emails.",
    "Extract the date from: 'The invoice was issued on 12 March 2024 to ACME Ltd.'",
    "Translate 'good morning' into Spanish.",
    "Summarize in one sentence: The meeting moved to Thursday because the room was booked.",
    "Is 17 a prime number? Answer yes or no.",
]


def read_jobs(path: Path) -> list[dict]:
    """``{"id", "prompt"}`` or ``{"id", "messages"}`` lines; errors name the line number."""
    jobs, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{number}: not valid JSON ({err.msg})")
        if not isinstance(job, dict) or "id" not in job or not ({"prompt", "messages"} & job.keys()):
            raise SystemExit(f'{path}:{number}: each line needs "id" and "prompt" or "messages"')
        if job["id"] in seen:
            raise SystemExit(f"{path}:{number}: duplicate id {job['id']!r}")
        seen.add(job["id"])
        jobs.append(job)
    return jobs


def done_ids(path: Path | None) -> set:
    if path is None or not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from . import FlexGenForCausalLM, Policy
    from .pipeline import generate_blocks

    jobs = (read_jobs(Path(args.input)) if args.input
            else [{"id": i, "prompt": p} for i, p in enumerate(EXAMPLE_PROMPTS)])
    output = Path(args.output) if args.output else None
    finished = done_ids(output)
    todo = [j for j in jobs if j["id"] not in finished]
    if finished:
        logging.info("resuming: %d of %d ids already in %s", len(jobs) - len(todo), len(jobs), output)
    if not todo:
        return 0
    model_path = args.model
    if model_path is None:
        from .default_model import default_model_dir
        model_path = default_model_dir()
    policy = Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size,
                                 num_gpu_batches=args.num_gpu_batches)
    model = FlexGenForCausalLM.from_pretrained(model_path, policy=policy, device=args.device,
                                               offload_dir=args.offload_dir)
    tokenizer = AutoTokenizer.from_pretrained(model.checkpoint_dir)
    sampling = ({"do_sample": True, "temperature": args.temperature} if args.temperature > 0
                else {"do_sample": False})
    prompts = [j.get("messages", j.get("prompt")) for j in todo]
    start, tokens = time.perf_counter(), 0
    sink = open(output, "a") if output else sys.stdout
    try:
        for block in generate_blocks(model, tokenizer, prompts, use_chat_template=not args.no_chat,
                                     max_new_tokens=args.max_new_tokens, **sampling):
            for c in block:
                tokens += c.new_tokens
                record = {"id": todo[c.index]["id"], "completion": c.text, "new_tokens": c.new_tokens}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            logging.info("%d tokens, %.1f tokens/s", tokens, tokens / (time.perf_counter() - start))
    finally:
        if output:
            sink.close()
        model.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-flexgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="batch generation over a JSONL file of prompts")
    gen.add_argument("--model", help="checkpoint directory or hub id (default: built-in SmolLM2-135M-Instruct)")
    gen.add_argument("--input", help='JSONL with {"id", "prompt"} or {"id", "messages"} per line '
                                     "(default: a few example prompts)")
    gen.add_argument("--output", help="JSONL results, appended block by block; rerun to resume "
                                      "(default: print to stdout)")
    gen.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0],
                     metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"))
    gen.add_argument("--gpu-batch-size", type=int, default=8)
    gen.add_argument("--num-gpu-batches", type=int, default=1)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--device", default=None)
    gen.add_argument("--offload-dir", default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        logging.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
