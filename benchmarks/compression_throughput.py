#!/usr/bin/env python
"""Throughput gain of compression where weights stream from disk (I/O-bound), with the
harness of vs_accelerate.py: the same random-weight OPT checkpoint and random prompts, each
configuration in a fresh subprocess inside its own cgroup v1 memory cgroup (RSS + page cache
capped at the budget) after the page cache was dropped, throughput = generated tokens / wall
time of generate() on the whole workload, runs never extrapolated (killed at budget or time
limit is reported as such).

Two questions, both at the same budget:

* throughput: one block, all weights on disk, KV cache in RAM, without compression, with
  4-bit weights, with 4-bit weights and KV cache;
* the largest block that fits: blocks of ``--probe-blocks`` sequences (doubling), with and
  without compression, each run to the end of its generation.

Every run is wrapped in ``flock /tmp/hf_flexgen_timing.lock`` (other timing runs on this
machine wait for it, and it for them) and records the 1-minute load average before/after.

    python benchmarks/compression_throughput.py --model opt-1.3b --budget 4GiB \\
        --out benchmarks/results/compression_throughput.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_flexgen
from cgroup import cgroup_available, format_gib, parse_bytes, run_in_cgroup  # noqa: E402
from vs_accelerate import Workload, disk_read_bytes, make_prompts, tokens_digest  # noqa: E402

logger = logging.getLogger("compression_throughput")
LOCK = "/tmp/hf_flexgen_timing.lock"


@dataclass(frozen=True)
class Run:
    label: str
    block: int                  # sequences in one block (one micro-batch)
    compress_weight: bool
    compress_cache: bool
    workload: Workload
    budget_bytes: int
    offload_dir: str = "/tmp/compression_throughput_offload"

    def policy(self):
        from hf_flexgen import Policy
        return Policy(gpu_batch_size=self.block, num_gpu_batches=1, w_gpu_percent=0,
                      w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=100,
                      act_gpu_percent=100, act_cpu_percent=0, overlap=True,
                      compress_weight=self.compress_weight, compress_cache=self.compress_cache)


# -- worker side (inside the cgroup) ----------------------------------------------------------
def worker_main(run_json: str, result_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from hf_flexgen import FlexGenForCausalLM
    raw = json.loads(run_json)
    run = Run(**{**raw, "workload": Workload(**raw["workload"])})
    w = run.workload
    t0 = time.perf_counter()
    model = FlexGenForCausalLM.from_pretrained(w.checkpoint, policy=run.policy(), device="cpu",
                                               offload_dir=run.offload_dir)
    load_s = time.perf_counter() - t0
    ids, mask = make_prompts(w, model.config.vocab_size)
    read0, t1 = disk_read_bytes(), time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=w.gen_len,
                         min_new_tokens=w.gen_len, do_sample=False)
    gen_s = time.perf_counter() - t1
    stats = dict(model.last_stats)
    result = {"load_s": load_s, "generate_s": gen_s, "last_stats": stats,
              "disk_read_bytes": disk_read_bytes() - read0,
              "weights_by_home": model.store.bytes_by_home(),
              "tokens_sha": tokens_digest(out[:, w.prompt_len:]),
              "maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    model.close()
    Path(result_path).write_text(json.dumps(result))
    return 0


# -- parent side ------------------------------------------------------------------------------
def run_one(run: Run, timeout_s: float, tmp: Path, tag: str) -> dict:
    """One run in its own cgroup, under the shared timing lock (flock around this script's
    own --cgroup-run step, which does the cgroup part)."""
    result_file, log_file = tmp / f"{tag}.json", tmp / f"{tag}.log"
    result_file.unlink(missing_ok=True)
    argv = ["flock", LOCK, sys.executable, str(Path(__file__).resolve()), "--cgroup-run",
            json.dumps(asdict(run)), "--result", str(result_file), "--log", str(log_file),
            "--timeout", str(timeout_s)]
    logger.info("run [%s] block %d budget %s (waiting for %s)", run.label, run.block,
                format_gib(run.budget_bytes), LOCK)
    subprocess.run(argv, check=True)
    row = {"label": run.label, **asdict(run), **json.loads(result_file.read_text())}
    logger.info("  -> %s%s (wall %.0f s, peak RSS %s, cgroup peak %s, load %s -> %s)",
                row["status"], f", {row['tok_s']:.2f} tok/s" if "tok_s" in row else "",
                row["wall_s"], format_gib(row["peak_rss_bytes"]), format_gib(row["cgroup_peak_bytes"]),
                row["loadavg_before"], row["loadavg_after"])
    return row


def cgroup_main(run_json: str, result_path: str, log_path: str, timeout_s: float) -> int:
    """Runs while holding the timing lock: the cgroup run and its record."""
    raw = json.loads(run_json)
    run = Run(**{**raw, "workload": Workload(**raw["workload"])})
    worker_out = Path(result_path).with_suffix(".worker.json")
    worker_out.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", run_json,
            "--result", str(worker_out)]
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    outcome = run_in_cgroup(argv, run.budget_bytes, timeout_s, Path(log_path))
    row = {"started": started, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "returncode": outcome.returncode, "wall_s": outcome.wall_s, "time_limit_s": timeout_s,
           "peak_rss_bytes": outcome.child_maxrss_bytes,
           "cgroup_peak_bytes": outcome.cgroup_peak_bytes, "oom_kills": outcome.oom_kills}
    if outcome.returncode == 0 and worker_out.exists():
        row.update(json.loads(worker_out.read_text()), status="ok")
        row["tok_s"] = run.workload.generated_tokens / row["generate_s"]
    elif outcome.killed_by == "oom":
        row["status"] = "killed at budget"
    elif outcome.killed_by == "timeout":
        row["status"] = "time limit"
        row["tok_s_upper_bound"] = run.workload.generated_tokens / timeout_s
    else:
        row["status"] = f"failed (exit {outcome.returncode})"
    Path(result_path).write_text(json.dumps(row))
    return 0


def prepare_compressed_copy(checkpoint: str) -> None:
    """Write the compressed checkpoint once, outside any cgroup and timing."""
    from hf_flexgen import FlexGenForCausalLM, Policy
    FlexGenForCausalLM.from_pretrained(checkpoint, policy=Policy(
        w_gpu_percent=0, w_cpu_percent=0, compress_weight=True), device="cpu").close()


CASES = {"none": (False, False), "w4": (True, False), "w4 + kv4": (True, True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-1.3b")
    parser.add_argument("--checkpoint-root", default="/tmp/hf_flexgen_ckpt")
    parser.add_argument("--budget", default="4GiB")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES),
                        help="cases run at --num-prompts (none: probes only)")
    parser.add_argument("--probe-blocks", type=int, nargs="*", default=[],
                        help="block sizes to try (prompt/gen as above) for the largest that fits")
    parser.add_argument("--probe-cases", nargs="+", choices=list(CASES), default=["none", "w4 + kv4"])
    parser.add_argument("--max-run-s", type=float, default=900)
    parser.add_argument("--out", default="benchmarks/results/compression_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cgroup-run", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.result)
    if args.cgroup_run:
        return cgroup_main(args.cgroup_run, args.result, args.log, args.timeout)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not cgroup_available():
        logger.error("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
        return 2
    from make_checkpoint import make_checkpoint
    checkpoint = str(make_checkpoint(args.model, Path(args.checkpoint_root) / args.model))
    prepare_compressed_copy(checkpoint)
    budget = parse_bytes(args.budget)
    out = Path(args.out)
    tmp = out.parent / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "budget_bytes": budget,
              "torch_threads_env": os.environ.get("OMP_NUM_THREADS"), "throughput": [], "probe": []}

    def save():
        out.write_text(json.dumps(report, indent=1) + "\n")

    w = Workload(args.model, checkpoint, args.prompt_len, args.gen_len, args.num_prompts)
    for name in args.cases:
        run = Run(name, args.num_prompts, *CASES[name], w, budget)
        report["throughput"].append(run_one(run, args.max_run_s, tmp, f"tput_{name.replace(' ', '')}"))
        save()
    for name in args.probe_cases:
        for block in args.probe_blocks:
            pw = Workload(args.model, checkpoint, args.prompt_len, args.gen_len, block)
            row = run_one(Run(name, block, *CASES[name], pw, budget), args.max_run_s, tmp,
                          f"probe_{name.replace(' ', '')}_{block}")
            report["probe"].append(row)
            save()
            if row["status"] != "ok":
                break  # larger blocks need more memory still
    save()
    for row in report["throughput"] + report["probe"]:
        print(f"{row['label']:10} block {row['block']:4} {row['status']:18} "
              f"{row.get('tok_s', float('nan')):7.2f} tok/s  peak RSS {format_gib(row['peak_rss_bytes'])}  "
              f"cgroup peak {format_gib(row['cgroup_peak_bytes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
