"""``hf-flexgen`` command line. Argument parsing and printing live only here.

``hf-flexgen generate`` runs a JSONL batch job: prompts are sorted by token length into
blocks, each finished block's results are appended to the output and fsync'd, and rerunning
the same command skips the ids already there (a crash loses at most the block in flight).
Bad input gets a one-line error and exit code 2, before any weight is loaded where possible.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROG = "hf-flexgen"
EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Give three tips for writing clear emails.",
    "Extract the date from: 'The invoice was issued on 12 March 2024 to ACME Ltd.'",
    "Translate 'good morning' into Spanish.",
    "Summarize in one sentence: The meeting moved to Thursday because the room was booked.",
    "Is 17 a prime number? Answer yes or no.",
]


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Job:
    id: object
    prompt: object   # a string or a list of chat messages
    where: str       # "file:line", for messages


# -- input --------------------------------------------------------------------------------
def read_jobs(path: Path) -> list[Job]:
    """``{"id", "prompt"}`` or ``{"id", "messages"}`` lines; errors name the line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise CliError(f"cannot read the input file {path}: {reason}") from err
    jobs, first_line = [], {}
    for number, line in enumerate(lines, start=1):
        if line.strip():
            job = parse_job(line, f"{path}:{number}")
            if job.id in first_line:
                raise CliError(f"{job.where}: duplicate id {job.id!r} (first on line {first_line[job.id]})")
            first_line[job.id] = number
            jobs.append(job)
    if not jobs:
        raise CliError(f"{path} holds no prompts")
    return jobs


def parse_job(line: str, where: str) -> Job:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise CliError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise CliError(f'{where}: expected a JSON object with "id" and "prompt" or "messages"')
    if "id" not in record or record["id"] is None:
        raise CliError(f'{where}: missing "id"')
    if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)):
        raise CliError(f'{where}: "id" must be a string or an integer, got {record["id"]!r}')
    if ("prompt" in record) == ("messages" in record):
        raise CliError(f'{where}: needs exactly one of "prompt" or "messages"')
    if "prompt" in record and not isinstance(record["prompt"], str):
        raise CliError(f'{where}: "prompt" must be a string')
    if "messages" in record and not valid_messages(record["messages"]):
        raise CliError(f'{where}: "messages" must be a non-empty list of '
                       '{"role": ..., "content": ...} objects')
    return Job(record["id"], record.get("prompt", record.get("messages")), where)


def valid_messages(messages) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
                    for m in messages))


# -- output -------------------------------------------------------------------------------
class ResultsFile:
    """The JSONL output: ids already done, repair of a line cut by a crash, block appends."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            raise CliError(f"cannot write the output file {path}: it is a directory")
        self._created = not path.exists()
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as err:
            raise CliError(f"cannot write the output file {path}: {err.strerror or err}") from err
        try:
            self._lock()
            self.done = self._load()
        except BaseException:
            self._file.close()
            raise

    def _lock(self) -> None:
        """One run per output file: a second one would write the same ids again."""
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CliError(f"another run is writing {self.path}; wait for it or stop it first") from None

    def _load(self) -> set:
        """Ids already written. A last line cut short by a crash (no newline after it, or not
        JSON) is removed from the file; a bad line with lines after it is an error."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return set()
        except OSError as err:
            raise CliError(f"cannot read the output file {self.path}: {err.strerror or err}") from err
        lines = data.split(b"\n")  # the last item is what follows the final newline
        done, good_end = set(), 0
        for number, raw in enumerate(lines, start=1):
            complete = number < len(lines)
            if complete and not raw.strip():
                good_end += len(raw) + 1
                continue
            record = self._parse(raw) if complete else None
            if record is None:
                if any(rest.strip() for rest in lines[number:]):
                    raise CliError(f"{self.path}:{number}: not a result line; fix or move the file")
                break
            done.add(record["id"])
            good_end += len(raw) + 1
        if good_end < len(data):
            logging.warning("%s: removing a last line cut short by a crash; its prompt runs again",
                            self.path)
            os.truncate(self.path, good_end)
        return done

    @staticmethod
    def _parse(raw: bytes):
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and "id" in record else None

    def write_block(self, records: list[dict]) -> None:
        """One write per block, flushed and fsync'd: a crash loses at most the block in flight."""
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        if self._created and self.path.stat().st_size == 0:
            self.path.unlink()  # the run failed before any result: leave no empty file


class StdoutResults:
    def __init__(self):
        self.done: set = set()

    def write_block(self, records: list[dict]) -> None:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        sys.stdout.flush()

    def close(self) -> None:
        pass


# -- model --------------------------------------------------------------------------------
def build_policy(args):
    from .policy import Policy

    if args.policy == "auto":
        return "auto"
    try:
        return Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size,
                                   num_gpu_batches=args.num_gpu_batches)
    except (ValueError, NotImplementedError) as err:
        raise CliError(f"bad policy: {err}") from err


def check_model(name):
    """(directory, config) of the checkpoint, checked without reading weights."""
    from .pipeline import load_checkpoint_config

    if name is None:
        from .default_model import default_model_dir
        try:
            name = default_model_dir()
        except RuntimeError as err:
            raise CliError(f"could not prepare the built-in model: {one_line(err)}") from err
    try:
        return load_checkpoint_config(name)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(f"--model {name}: {one_line(err)}") from err


def load_model(directory, policy, args, workload=None):
    from .modeling import FlexGenForCausalLM
    from .placement import PlacementError

    auto = {} if policy != "auto" else {"max_memory": parse_max_memory_args(args.max_memory),
                                        "workload": workload}
    with memory_errors(policy):
        try:
            return FlexGenForCausalLM.from_pretrained(directory, policy=policy, device=args.device,
                                                      offload_dir=args.offload_dir, **auto)
        except PlacementError as err:
            raise CliError(f"policy auto: {one_line(err)}") from err
        except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as err:
            raise CliError(f"--model {directory}: {one_line(err)}") from err


def parse_max_memory_args(items) -> dict | None:
    """``cpu=64GiB cuda:0=16GiB disk=500GiB`` -> HF's max_memory dict."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CliError(f"--max-memory takes HOME=SIZE items (e.g. cpu=16GiB), got {item!r}")
        out[int(key) if key.isdigit() else key] = value
    return out


@contextmanager
def memory_errors(policy):
    """Turns the engine's out-of-memory (or out-of-disk) errors into a CliError that says what
    to change."""
    try:
        yield
    except (MemoryError, RuntimeError, OSError) as err:
        if not is_memory_error(err):
            raise
        if policy == "auto":
            raise CliError(f"policy auto ran out of memory or disk ({one_line(err)}); please "
                           "report it, and lower --max-memory meanwhile") from err
        raise CliError(f"the policy does not fit in this machine's memory or disk ({one_line(err)}); "
                       f"lower --gpu-batch-size ({policy.gpu_batch_size}) or --num-gpu-batches "
                       f"({policy.num_gpu_batches}), or move weights / KV cache off the device "
                       "with --percent") from err


def is_memory_error(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return isinstance(err, MemoryError) or "memory" in str(err).lower()


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


# -- the command --------------------------------------------------------------------------
def cmd_generate(args) -> int:
    policy = build_policy(args)
    jobs = (read_jobs(Path(args.input)) if args.input else
            [Job(i, p, f"example {i}") for i, p in enumerate(EXAMPLE_PROMPTS)])
    results = ResultsFile(Path(args.output)) if args.output else StdoutResults()
    try:
        skip = {n for n, job in enumerate(jobs) if job.id in results.done}
        if len(skip) == len(jobs):
            logging.info("all %d ids are already in %s: nothing to do", len(jobs), args.output)
            return 0
        directory, tokenizer, encoded = prepare_prompts(args, jobs)
        if skip:
            logging.info("resuming: %d of %d ids already in %s", len(skip), len(jobs), args.output)
        run_job(args, policy, directory, tokenizer, encoded, jobs, skip, results)
    finally:
        results.close()
    return 0


def prepare_prompts(args, jobs: list[Job]):
    """Check the model (config only), tokenize every prompt, check it fits the context."""
    from transformers import AutoTokenizer

    from .pipeline import check_prompt_lengths, encode_prompts

    directory, config = check_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    try:
        encoded = encode_prompts(tokenizer, [j.prompt for j in jobs],
                                 False if args.no_chat_template else None, names=[j.where for j in jobs])
        check_prompt_lengths([len(e) for e in encoded], config, args.max_new_tokens,
                             [f"{j.where} (id {j.id!r})" for j in jobs])
    except (ValueError, TypeError) as err:
        raise CliError(one_line(err)) from err
    return directory, tokenizer, encoded


def run_job(args, policy, directory, tokenizer, encoded, jobs: list[Job], skip: set, results) -> None:
    from .pipeline import plan_blocks, run_blocks
    from .placement import Workload

    # policy auto is planned for the whole job, done or not, so a resumed run chooses alike
    workload = Workload(max(len(e) for e in encoded), args.max_new_tokens, len(encoded))
    model = load_model(directory, policy, args, workload)
    policy = model.policy
    try:
        # planned over all jobs, done or not: a resumed run rebuilds the same blocks
        blocks = plan_blocks([len(e) for e in encoded], policy.block_size)
        completions = run_blocks(model, tokenizer, encoded, blocks, stop=args.stop, skip=skip,
                                 **sampling_kwargs(args))
        with memory_errors(policy):
            write_results(completions, jobs, results, len(jobs) - len(skip), args.quiet)
    finally:
        model.close()


def sampling_kwargs(args) -> dict:
    """Greedy for --temperature 0; otherwise sampling, with HF's defaults where not given."""
    if args.temperature <= 0:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    given = {"top_k": args.top_k, "top_p": args.top_p}
    return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature,
            **{k: v for k, v in given.items() if v is not None}}


def write_results(completions, jobs: list[Job], results, todo: int, quiet: bool) -> None:
    """Append each block's results as it finishes; a progress bar on stderr."""
    from tqdm import tqdm

    start, tokens = time.perf_counter(), 0
    with tqdm(total=todo, unit="prompt", desc="generate", file=sys.stderr, disable=quiet,
              dynamic_ncols=True) as bar:
        for block in completions:
            results.write_block([{"id": jobs[c.index].id, "completion": c.text,
                                  "new_tokens": c.new_tokens} for c in block])
            tokens += sum(c.new_tokens for c in block)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
            bar.update(len(block))
    logging.info("%d prompts, %d new tokens in %.1f s", todo, tokens, time.perf_counter() - start)


# -- plan ---------------------------------------------------------------------------------
def cmd_plan(args) -> int:
    import torch

    from .modeling import config_layout, default_device, default_dtype, plan_policy
    from .placement import PlacementError, Workload
    from .policy import Policy

    try:
        workload = Workload(args.prompt_len, args.gen_len, args.num_prompts)
        base = Policy(overlap=not args.no_overlap, compress_weight=args.compress_weight,
                      compress_cache=args.compress_cache, cpu_cache_compute=args.cpu_cache_compute)
    except ValueError as err:
        raise CliError(one_line(err)) from err
    config, layout_of = plan_model(args.model)
    device = torch.device(args.device) if args.device else default_device()
    dtype = default_dtype(device, config)
    try:
        layout = layout_of(device) if layout_of else config_layout(config)
        chosen = plan_policy(config, layout, device, dtype, workload, parse_max_memory_args(args.max_memory),
                             base, disk_dir=args.offload_dir, refresh_profile=args.refresh_profile)
    except PlacementError as err:
        raise CliError(one_line(err)) from err
    rows = [chosen.best, *chosen.runners_up]
    if args.json:
        print(json.dumps({"limits": chosen.limits, "workload": workload.__dict__,
                          "plans": [plan_record(e) for e in rows]}, indent=1))
        return 0
    print(f"workload: prompt {workload.prompt_len}, {workload.gen_len} new tokens, "
          f"{workload.num_prompts} prompts; limits: {fmt_bytes(chosen.limits)}")
    for rank, est in enumerate(rows):
        label = "chosen   " if rank == 0 else "runner-up"
        print(f"{label} {est.throughput:9.2f} tok/s  {describe_policy(est.policy)}  "
              f"peak {fmt_bytes(est.peak_bytes)}")
    best = chosen.best.policy
    print(f"use: --policy auto, or --percent {best.w_gpu_percent:g} {best.w_cpu_percent:g} "
          f"{best.cache_gpu_percent:g} {best.cache_cpu_percent:g} {best.act_gpu_percent:g} "
          f"{best.act_cpu_percent:g} --gpu-batch-size {best.gpu_batch_size} "
          f"--num-gpu-batches {best.num_gpu_batches}")
    return 0


def plan_model(name):
    """(config, layout factory or None): a local checkpoint gives exact tensor shapes and
    dtypes; a hub id gives its config only (fp16 storage assumed)."""
    if name is None or Path(name).expanduser().is_dir() or str(name).startswith((".", "/", "~")):
        directory, config = check_model(name)
        from .memory.checkpoint import CheckpointIndex
        from .memory.resolve import safetensors_files
        from .modeling import model_layout

        def layout_of(device):
            return model_layout(config, CheckpointIndex(safetensors_files(Path(directory))), device)
        return config, layout_of
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name), None
    except (OSError, ValueError) as err:
        raise CliError(f"--model {name}: {one_line(err)}") from err


def describe_policy(p) -> str:
    from .placement import describe
    return describe(p)


def fmt_bytes(values: dict) -> str:
    return ", ".join(f"{home} {size / 2**30:.2f} GiB" for home, size in values.items() if size)


def plan_record(est) -> dict:
    from dataclasses import asdict
    return {"policy": asdict(est.policy), "throughput_tok_s": est.throughput,
            "prefill_s": est.prefill_s, "decode_s": est.decode_s, "peak_bytes": est.peak_bytes,
            "memory": asdict(est.memory)}


# -- parsing ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="batch generation over a JSONL file of prompts")
    gen.add_argument("--model", help="checkpoint directory or hub id "
                                     "(default: the built-in SmolLM2-135M-Instruct)")
    gen.add_argument("--input", help='JSONL with {"id", "prompt"} or {"id", "messages"} per line '
                                     "(default: a few example prompts)")
    gen.add_argument("--output", help="JSONL results, appended block by block; rerun the same "
                                      "command to resume (default: print to stdout)")
    placement = gen.add_mutually_exclusive_group()
    placement.add_argument("--policy", choices=["auto"],
                           help="pick placement and block shape for this job within --max-memory "
                                "(see `hf-flexgen plan`)")
    placement.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0],
                           metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"),
                           help="FlexGen's placement percentages (default: all on the device)")
    gen.add_argument("--max-memory", nargs="+", metavar="HOME=SIZE",
                     help="limits for --policy auto, e.g. cpu=16GiB cuda:0=12GiB disk=200GiB "
                          "(default: what is free, with a margin)")
    gen.add_argument("--gpu-batch-size", type=int, default=8, help="sequences per micro-batch")
    gen.add_argument("--num-gpu-batches", type=int, default=1, help="micro-batches per block")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--stop", action="append", default=None, metavar="STRING",
                     help="end a completion before this string (repeatable; excluded from it)")
    gen.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")
    gen.add_argument("--offload-dir", default=None, help="where disk-homed KV cache goes")
    gen.add_argument("--no-chat-template", action="store_true",
                     help='feed "prompt" strings as is instead of as a user turn of the chat template')
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    pl = sub.add_parser("plan", help="print the policy 'auto' picks, its predicted throughput "
                                     "and memory, and the runners-up")
    pl.add_argument("--model", help="checkpoint directory, or a hub id (only its config is "
                                    "fetched); default: the built-in SmolLM2-135M-Instruct")
    pl.add_argument("--prompt-len", type=int, default=512)
    pl.add_argument("--gen-len", type=int, default=32)
    pl.add_argument("--num-prompts", type=int, default=1024)
    pl.add_argument("--max-memory", nargs="+", metavar="HOME=SIZE",
                    help="e.g. cpu=16GiB cuda:0=12GiB disk=200GiB (default: what is free)")
    pl.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")
    pl.add_argument("--compress-weight", action="store_true", help="plan with 4-bit weights")
    pl.add_argument("--compress-cache", action="store_true", help="plan with a 4-bit KV cache")
    pl.add_argument("--cpu-cache-compute", action="store_true", help="plan with CPU-delegated attention")
    pl.add_argument("--no-overlap", action="store_true", help="plan for the serial I/O path")
    pl.add_argument("--offload-dir", default=None, help="where disk-homed KV cache would go")
    pl.add_argument("--refresh-profile", action="store_true",
                    help="measure this machine (and the model's layer) again")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=cmd_plan)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        return fail("--max-new-tokens must be at least 1")
    try:
        return args.func(args)
    except CliError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
