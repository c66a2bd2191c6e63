"""policy="auto" against reality: for each scenario (model x memory cap x workload) run the
auto policy under a cgroup capped at the same ``max_memory``, then a brute-force grid of
hand-set policies under the same cap; report predicted vs measured throughput and peak
memory, and the auto policy's throughput as a fraction of the grid's best.

    python benchmarks/auto_policy.py --out benchmarks/results/auto_policy.json

Needs root and the cgroup v1 memory controller (see cgroup.py). Random-weight OPT
checkpoints are made with make_checkpoint.py in --ckpt-root; SmolLM2 is the built-in model.
Every run is a fresh process: measured peak = the child's ru_maxrss (RSS); the cgroup peak,
which also counts reclaimable page cache, is reported beside it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cgroup import (assert_torch_free, cgroup_available, format_gib,  # noqa: E402
                    make_checkpoint_outside, parse_bytes, run_in_cgroup, run_python)

logger = logging.getLogger("auto_policy")


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str          # "smollm2" or a make_checkpoint.py shape name
    cap: str            # max_memory["cpu"] and the cgroup limit
    prompt_len: int
    gen_len: int
    num_prompts: int
    grid_batches: tuple[int, ...]   # gpu_batch_size values of the brute-force grid
    # SmolLM2's checkpoint is fp32: its cpu home equals the device home, so not gridded twice
    grid_weights: tuple = ((100, 0), (0, 100), (0, 0))


SCENARIOS = (
    Scenario("smollm2-1.0G", "smollm2", "1.0GiB", 32, 8, 64, (8, 64), ((100, 0), (0, 0))),
    Scenario("smollm2-1.5G", "smollm2", "1.5GiB", 32, 8, 64, (8, 64), ((100, 0), (0, 0))),
    Scenario("smollm2-long-1.2G", "smollm2", "1.2GiB", 256, 8, 32, (4, 32), ((100, 0), (0, 0))),
    Scenario("opt-125m-1.2G", "opt-125m", "1.2GiB", 64, 8, 64, (8, 64)),
    Scenario("opt-350m-1.5G", "opt-350m", "1.5GiB", 32, 8, 64, (8, 64)),
    Scenario("opt-1.3b-3.0G", "opt-1.3b", "3.0GiB", 32, 8, 64, (16, 64)),
)
# the brute-force grid: weights (grid_weights) all on the device (compute dtype), all in the
# cpu home (the checkpoint's dtype, cast per use on a CPU device) or all on disk; KV cache in
# RAM or on disk
GRID_CACHE, GRID_MICRO_BATCHES = (100, 0), (1,)
CAPS = {s.name: parse_bytes(s.cap) for s in SCENARIOS}


# -- child: one run in the cgroup --------------------------------------------------------
class RssSampler:
    """Peaks of the anonymous and the file-backed part of this process's RSS, sampled every
    10 ms from /proc (the kernel keeps only the peak of their sum): tells the memory the
    engine allocates from library pages touched and left mapped."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self):
        import threading
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    if name in self.peaks:
                        self.peaks[name] = max(self.peaks[name], int(value.split()[0]) * 1024)
            time.sleep(0.01)


def child(spec: dict, result_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sampler = RssSampler()
    import torch

    from hf_flexgen import FlexGenForCausalLM, Policy
    from hf_flexgen.memory.checkpoint import CheckpointIndex
    from hf_flexgen.memory.resolve import safetensors_files
    from hf_flexgen.calibration import layer_costs
    from hf_flexgen.modeling import build_skeleton, model_layout
    from hf_flexgen.placement import Workload, estimate, load_or_measure
    from hf_flexgen.placement.limits import process_rss

    w = Workload(spec["prompt_len"], spec["gen_len"], spec["num_prompts"])
    baseline = process_rss()
    t0 = time.perf_counter()
    if spec["policy"] == "auto":
        model = FlexGenForCausalLM.from_pretrained(spec["checkpoint"], policy="auto", workload=w,
                                                   max_memory={"cpu": spec["cap"]},
                                                   offload_dir=spec["offload_dir"])
        predicted = model.plan.best
    else:
        policy = Policy(**spec["policy"])
        index = CheckpointIndex(safetensors_files(Path(spec["checkpoint"])))
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(spec["checkpoint"])
        layout = model_layout(config, index, torch.device("cpu"))
        hw = load_or_measure(torch.device("cpu"), torch.float32)
        measured = layer_costs(config, build_skeleton(config, torch.device("cpu")),
                               torch.device("cpu"), torch.float32)
        predicted = estimate(policy, layout, w, hw, 4, baseline, measured)
        index.close()
        model = FlexGenForCausalLM.from_pretrained(spec["checkpoint"], policy=policy,
                                                   offload_dir=spec["offload_dir"])
    load_s = time.perf_counter() - t0
    # the rates the prediction used (the run itself then teaches the profiles its own)
    planned_disk_read_bw = load_or_measure(torch.device("cpu"), torch.float32).disk_read_bw
    planned_prefill_token_s = layer_costs(model.config, build_skeleton(model.config, torch.device("cpu")),
                                          torch.device("cpu"), torch.float32).prefill_token_s
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (w.num_prompts, w.prompt_len), generator=gen)
    t1 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=w.gen_len, min_new_tokens=w.gen_len, do_sample=False)
    generate_s = time.perf_counter() - t1
    assert out.shape == (w.num_prompts, w.prompt_len + w.gen_len), out.shape
    result = {"policy": asdict(model.policy), "load_s": load_s, "generate_s": generate_s,
              "tok_s": w.num_prompts * w.gen_len / generate_s, "stats": model.last_stats,
              "predicted_tok_s": predicted.throughput, "predicted_peak_bytes": predicted.peak_bytes["cpu"],
              "predicted_memory": asdict(predicted.memory), "baseline_rss_bytes": baseline,
              "maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "peak_rss_anon_bytes": sampler.peaks["RssAnon"], "peak_rss_file_bytes": sampler.peaks["RssFile"],
              "planned_disk_read_bw": planned_disk_read_bw,
              "planned_prefill_token_s": planned_prefill_token_s}
    model.close()
    Path(result_path).write_text(json.dumps(result))
    return 0


# -- parent --------------------------------------------------------------------------------
def checkpoint_for(model: str, root: Path) -> Path:
    """The scenario's checkpoint, made (or found) outside this torch-free parent."""
    if model == "smollm2":
        return Path(run_python("from hf_flexgen.default_model import default_model_dir; "
                               "print(default_model_dir())").strip().splitlines()[-1])
    return make_checkpoint_outside(model, root / model)


def run_one(scenario: Scenario, checkpoint: Path, policy, tag: str, tmp: Path, timeout_s: float) -> dict:
    spec = {"checkpoint": str(checkpoint), "cap": scenario.cap, "policy": policy,
            "prompt_len": scenario.prompt_len, "gen_len": scenario.gen_len,
            "num_prompts": scenario.num_prompts, "offload_dir": str(tmp / "offload")}
    result_file, log_file = tmp / f"{tag}.json", tmp / f"{tag}.log"
    result_file.unlink(missing_ok=True)
    shutil.rmtree(spec["offload_dir"], ignore_errors=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec),
            "--result", str(result_file)]
    load = os.getloadavg()[0]
    outcome = run_in_cgroup(argv, parse_bytes(scenario.cap), timeout_s, log_file)
    row = {"scenario": scenario.name, "tag": tag, "requested": policy, "returncode": outcome.returncode,
           "peak_rss_bytes": outcome.child_maxrss_bytes, "cgroup_peak_bytes": outcome.cgroup_peak_bytes,
           "wall_s": outcome.wall_s, "loadavg_1m_before_after": [load, os.getloadavg()[0]]}
    if outcome.returncode == 0 and result_file.exists():
        row.update(json.loads(result_file.read_text()), status="ok")
    elif outcome.killed_by == "oom":
        row["status"] = "killed at cap"
    elif outcome.killed_by == "timeout":
        row["status"] = "time limit"
    else:
        row["status"] = f"failed (exit {outcome.returncode})"
        row["error_tail"] = log_file.read_text(errors="replace").splitlines()[-15:]
    logger.info("%s %s: %s%s, peak RSS %s (cgroup %s)", scenario.name, tag, row["status"],
                f", {row['tok_s']:.2f} tok/s (predicted {row['predicted_tok_s']:.2f}), predicted "
                f"peak {format_gib(row['predicted_peak_bytes'])}" if row["status"] == "ok" else "",
                format_gib(outcome.child_maxrss_bytes), format_gib(outcome.cgroup_peak_bytes))
    return row


def measure_profiles(scenario: Scenario, checkpoint: Path) -> None:
    """Measure (or load) the machine's profile and the model's layer costs once, outside any
    cgroup and any timing, by planning the scenario with the CLI."""
    subprocess.run([sys.executable, "-m", "hf_flexgen.cli", "plan", "--model", str(checkpoint),
                    "--prompt-len", str(scenario.prompt_len), "--gen-len", str(scenario.gen_len),
                    "--num-prompts", str(scenario.num_prompts), "--max-memory", f"cpu={scenario.cap}"],
                   check=True, stdout=subprocess.DEVNULL)


def grid(scenario: Scenario):
    for b, k, (wg, wc), c in itertools.product(scenario.grid_batches, GRID_MICRO_BATCHES,
                                               scenario.grid_weights, GRID_CACHE):
        if b * k > scenario.num_prompts:
            continue
        yield {"gpu_batch_size": b, "num_gpu_batches": k, "w_gpu_percent": wg, "w_cpu_percent": wc,
               "cache_gpu_percent": c, "cache_cpu_percent": 0, "overlap": True}


def base_tag(tag: str) -> str:
    """The policy a run belongs to: repeats are tagged ``grid4#2``, ``auto#3``, ..."""
    return tag.split("#")[0]


def median_tok_s(runs: list[dict]) -> float | None:
    """Median throughput of a policy's runs; None unless every run finished."""
    if not runs or any(r["status"] != "ok" for r in runs):
        return None
    return statistics.median(r["tok_s"] for r in runs)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        by_policy: dict[str, list[dict]] = {}
        for r in mine:
            by_policy.setdefault(base_tag(r["tag"]), []).append(r)
        autos = by_policy.pop("auto")
        auto, auto_tok_s = autos[0], median_tok_s(autos)
        medians = {tag: median_tok_s(runs) for tag, runs in by_policy.items()}
        best_tag = max((t for t in medians if medians[t] is not None), key=medians.get, default=None)
        best = by_policy[best_tag][0] if best_tag else None
        # RSS can exceed the cgroup limit: pages of shared libraries another process already
        # loaded count in RSS but are charged elsewhere. A grid policy that finished above
        # the cap in RSS broke the max_memory the planner must respect.
        cap = CAPS.get(name)
        within = [t for t in medians if medians[t] is not None and cap is not None
                  and all(r["peak_rss_bytes"] <= cap for r in by_policy[t])]
        best_within = max(within, key=medians.get, default=None)
        ok = [r for r in mine if r["status"] == "ok"]
        out.append({
            "scenario": name, "auto_status": auto["status"],
            "auto_policy": auto.get("policy"), "auto_tok_s": auto_tok_s,
            "auto_runs": [r.get("tok_s") for r in autos],
            "auto_predicted_tok_s": auto.get("predicted_tok_s"),
            "auto_peak_rss_bytes": max(r["peak_rss_bytes"] for r in autos),
            "auto_predicted_peak_bytes": auto.get("predicted_peak_bytes"),
            "grid_best_tok_s": best_tag and medians[best_tag], "grid_best": best and best["requested"],
            "grid_best_runs": best_tag and [r.get("tok_s") for r in by_policy[best_tag]],
            "auto_vs_grid_best": (auto_tok_s or 0) / medians[best_tag] if best_tag else None,
            "grid_best_within_cap_tok_s": best_within and medians[best_within],
            "auto_vs_grid_best_within_cap": (auto_tok_s or 0) / medians[best_within] if best_within else None,
            "grid_runs": len(by_policy),
            "grid_killed": sum(runs[0]["status"] == "killed at cap" for runs in by_policy.values()),
            "max_measured_over_predicted_peak": max((r["peak_rss_bytes"] / r["predicted_peak_bytes"]
                                                     for r in ok), default=None),
            "throughput_ratio_range": [min((r["tok_s"] / r["predicted_tok_s"] for r in ok), default=None),
                                       max((r["tok_s"] / r["predicted_tok_s"] for r in ok), default=None)],
        })
    return out


def markdown(report: dict) -> str:
    """The summary table and every run, for benchmarks/README.md."""
    gib = lambda n: f"{n / 2**30:.2f}" if n else "-"  # noqa: E731
    lines = ["| scenario | auto policy | auto tok/s, median (pred.) | meas./pred. | peak RSS GiB (pred.) "
             "| grid best tok/s, median | auto / grid best | auto / grid best within cap "
             "| grid policies (killed) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["summary"]:
        p = r["auto_policy"] or {}
        policy = (f"{p['gpu_batch_size']}x{p['num_gpu_batches']}, w {p['w_gpu_percent']:g}/"
                  f"{p['w_cpu_percent']:g}, kv {p['cache_gpu_percent']:g}") if p else r["auto_status"]
        tok, pred = r["auto_tok_s"] or 0, r["auto_predicted_tok_s"] or 0
        best, ratio = r["grid_best_tok_s"] or 0, r["auto_vs_grid_best"] or 0
        lines.append(
            f"| {r['scenario']} | {policy} | {tok:.2f} ({pred:.2f}) | {tok / pred if pred else 0:.2f} | "
            f"{gib(r['auto_peak_rss_bytes'])} ({gib(r['auto_predicted_peak_bytes'])}) | {best:.2f} | "
            f"{ratio:.2f} | {r.get('auto_vs_grid_best_within_cap') or 0:.2f} | "
            f"{r['grid_runs']} ({r['grid_killed']}) |")
    lines += ["", "| scenario | run | block | w dev/cpu % | kv dev % | status | tok/s | predicted | "
              "peak RSS GiB | predicted peak | load 1m |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        p = r.get("policy") or (r["requested"] if isinstance(r["requested"], dict) else {})
        lines.append(
            f"| {r['scenario']} | {r['tag']} | {p.get('gpu_batch_size', '-')}x{p.get('num_gpu_batches', '-')} "
            f"| {p.get('w_gpu_percent', '-')}/{p.get('w_cpu_percent', '-')} | {p.get('cache_gpu_percent', '-')} "
            f"| {r['status']} | {r.get('tok_s', 0):.2f} | {r.get('predicted_tok_s', 0):.2f} | "
            f"{gib(r['peak_rss_bytes'])} | {gib(r.get('predicted_peak_bytes'))} | "
            f"{r['loadavg_1m_before_after'][0]:.1f} |")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scenarios", nargs="*", help="names to run (default: all)")
    parser.add_argument("--no-grid", action="store_true", help="only the auto policy")
    parser.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--ckpt-root", type=Path, default=Path("/tmp/ckpt"))
    parser.add_argument("--refresh-profile", action="store_true",
                        help="measure the machine and the layers again before the first run")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="runs of the auto policy and of the grid's two fastest (median compared)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/auto_policy.json"))
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child), args.result)
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not cgroup_available():
        logger.error("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
        return 2
    tmp = args.out.parent / "tmp" / "auto_policy"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    if args.refresh_profile:
        run_python("import shutil; from hf_flexgen.memory.resolve import cache_root; "
                "shutil.rmtree(cache_root() / 'hardware', ignore_errors=True)")
    chosen = [s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios]
    for scenario in chosen:  # every auto run then plans with the same, cached measurements
        measure_profiles(scenario, checkpoint_for(scenario.model, args.ckpt_root))
    for scenario in chosen:
        rows = [r for r in rows if r["scenario"] != scenario.name]
        checkpoint = checkpoint_for(scenario.model, args.ckpt_root)
        mine = [run_one(scenario, checkpoint, "auto", "auto", tmp, args.timeout)]
        if not args.no_grid:
            for i, policy in enumerate(grid(scenario)):
                mine.append(run_one(scenario, checkpoint, policy, f"grid{i}", tmp, args.timeout))
        # single timings vary by up to 25% as the machine's speed drifts over minutes: the
        # auto policy and the grid's two fastest are run again, interleaved (auto, first,
        # second, auto, ...) so that a slow spell slows all three, and compared by medians
        finished = sorted((r for r in mine[1:] if r["status"] == "ok"), key=lambda r: -r["tok_s"])
        for n in range(2, args.repeats + 1):
            for first in [mine[0], *finished[:2]]:
                mine.append(run_one(scenario, checkpoint, first["requested"], f"{first['tag']}#{n}",
                                    tmp, args.timeout))
        rows += mine
        assert_torch_free()
        summary = summarize(rows)
        args.out.write_text(json.dumps({"scenarios": [asdict(s) for s in SCENARIOS],
                                        "summary": summary, "runs": rows}, indent=1))
        logger.info("%s", json.dumps(summary[-1] if summary else {}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
