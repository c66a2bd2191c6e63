#!/usr/bin/env python
"""hf_flexgen vs Hugging Face transformers + Accelerate offloading, side by side.

Fairness rules applied to every configuration of both peers:

* the same checkpoint (``benchmarks/make_checkpoint.py`` shapes), the same prompts (random
  token ids from a fixed seed, no padding), the same generation length (greedy,
  ``min_new_tokens == max_new_tokens`` so every sequence generates exactly that many tokens);
* the same memory budget: each configuration runs in a fresh subprocess inside its own
  cgroup v1 memory cgroup (RSS + page cache capped), after the page cache was dropped;
* throughput = generated tokens / wall time of the whole generation (prefill included),
  measured on the full workload (FlexGen's definition). Model loading is timed separately.
  A configuration that does not finish is never extrapolated: a run stopped by the time
  limit is reported as an upper bound, one killed by the cgroup OOM killer as "killed at
  budget" and then re-measured at budgets x1.5, x1.5^2, ... until it survives;
* each peer at its best settings: Accelerate over batch sizes, dtypes and runtime floors (``max_memory``
  set to the budget minus room for its KV cache, activations and the Python runtime),
  hf_flexgen over a few policies. Each peer's best is reported.

Scenario ``cpu`` (default): OPT-1.3B shape, CPU only, weights streamed from disk.
Scenario ``gpu``: OPT-30B shape, 16 GiB of GPU memory; needs a CUDA device.

    flock /tmp/hf_flexgen_timing.lock python benchmarks/vs_accelerate.py --scenario cpu \
        --model opt-1.3b --budget 2.5GiB --prompt-len 8 --gen-len 16 --num-prompts 128 \
        --flexgen-cache-cpu 0 --overlap-off-too --accelerate-batches 128,64,32 \
        --accelerate-floor-gib 1.5 --timeout-factor 1 --max-budget-factor 2.25 \
        --out benchmarks/results/vs_accelerate_cpu.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's hf_flexgen
from cgroup import (assert_torch_free, cgroup_available, format_gib,  # noqa: E402
                    make_checkpoint_outside, parse_bytes, run_in_cgroup, run_python)

logger = logging.getLogger("vs_accelerate")

FLEXGEN, ACCELERATE = "hf_flexgen", "accelerate"
GiB = 2**30


# -- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    model: str
    checkpoint: str
    prompt_len: int
    gen_len: int
    num_prompts: int
    seed: int = 0

    @property
    def generated_tokens(self) -> int:
        return self.num_prompts * self.gen_len


@dataclass(frozen=True)
class FlexGenConfig:
    gpu_batch_size: int
    num_gpu_batches: int
    w_gpu_percent: float = 0
    w_cpu_percent: float = 0
    cache_gpu_percent: float = 0
    cache_cpu_percent: float = 100
    overlap: bool = True
    dtype: str | None = None   # compute dtype; None: hf_flexgen's default for the device
    auto: bool = False         # policy="auto" with max_memory = the budget (the fields above unused)

    def label(self) -> str:
        if self.auto:
            return "policy=auto" + (f", {self.dtype}" if self.dtype else "")
        w_disk = 100 - self.w_gpu_percent - self.w_cpu_percent
        c_disk = 100 - self.cache_gpu_percent - self.cache_cpu_percent
        return (f"block {self.gpu_batch_size}x{self.num_gpu_batches}, w {self.w_gpu_percent:g}/"
                f"{self.w_cpu_percent:g}/{w_disk:g}, kv {self.cache_gpu_percent:g}/"
                f"{self.cache_cpu_percent:g}/{c_disk:g}, overlap={'on' if self.overlap else 'off'}"
                + (f", {self.dtype}" if self.dtype else ""))


@dataclass(frozen=True)
class AccelerateConfig:
    batch_size: int
    dtype: str                 # "float32", "float16", "bfloat16"
    runtime_floor_gib: float   # budget kept free for the Python runtime and temporaries

    def label(self) -> str:
        return f"batch {self.batch_size}, {self.dtype}, floor {self.runtime_floor_gib:g} GiB"


@dataclass(frozen=True)
class RunSpec:
    peer: str
    config: dict               # asdict() of FlexGenConfig / AccelerateConfig
    workload: Workload
    budget_bytes: int          # host RAM budget (cgroup limit)
    device: str = "cpu"
    gpu_budget_bytes: int | None = None
    # per harness process: concurrent harnesses must not clear each other's offload files
    offload_dir: str = field(default_factory=lambda: f"/tmp/vs_accelerate_offload_{os.getpid()}")

    def label(self) -> str:
        cls = FlexGenConfig if self.peer == FLEXGEN else AccelerateConfig
        return cls(**self.config).label()


# -- worker side (runs inside the cgroup) ------------------------------------------------------
def make_prompts(w: Workload, vocab_size: int):
    import torch
    gen = torch.Generator().manual_seed(w.seed)
    # ids >= 4 avoid OPT's special tokens (pad 1, bos/eos 2); every prompt is full length
    ids = torch.randint(4, vocab_size, (w.num_prompts, w.prompt_len), generator=gen)
    return ids, torch.ones_like(ids)


def disk_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def tokens_digest(new_tokens) -> str:
    return hashlib.sha256(new_tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def run_flexgen(spec: RunSpec) -> dict:
    from hf_flexgen import FlexGenForCausalLM, Policy
    c, w = FlexGenConfig(**spec.config), spec.workload
    policy = Policy(gpu_batch_size=c.gpu_batch_size, num_gpu_batches=c.num_gpu_batches,
                    w_gpu_percent=c.w_gpu_percent, w_cpu_percent=c.w_cpu_percent,
                    cache_gpu_percent=c.cache_gpu_percent, cache_cpu_percent=c.cache_cpu_percent,
                    act_gpu_percent=100, act_cpu_percent=0, overlap=c.overlap)
    t0 = time.perf_counter()
    import torch
    from hf_flexgen.placement import Workload as PlannedWorkload, describe
    auto = {}
    if c.auto:  # the planner picks placement and block shape for this budget and workload
        max_memory = {"cpu": spec.budget_bytes} if spec.device == "cpu" else {
            0: spec.gpu_budget_bytes, "cpu": spec.budget_bytes}
        auto = {"policy": "auto", "max_memory": max_memory,
                "workload": PlannedWorkload(w.prompt_len, w.gen_len, w.num_prompts)}
    model = FlexGenForCausalLM.from_pretrained(w.checkpoint, **{"policy": policy, **auto},
                                               device=spec.device, offload_dir=spec.offload_dir,
                                               dtype=getattr(torch, c.dtype) if c.dtype else None)
    load_s = time.perf_counter() - t0
    chosen = ({"policy": describe(model.plan.policy), "predicted_tok_s": model.plan.best.throughput,
               "predicted_peak_bytes": model.plan.best.peak_bytes} if model.plan else None)
    ids, mask = make_prompts(w, model.config.vocab_size)
    mark_generation_start()
    read0, t1 = disk_read_bytes(), time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=w.gen_len,
                         min_new_tokens=w.gen_len, do_sample=False)
    gen_s = time.perf_counter() - t1
    stats = dict(getattr(model, "last_stats", None) or {})
    weights_by_home = {h: b for h, b in model.store.bytes_by_home().items()}
    model.close()
    return {"load_s": load_s, "generate_s": gen_s, "new_tokens": out[:, w.prompt_len:],
            "prefill_s": stats.get("prefill_s"), "decode_s": stats.get("decode_s"),
            "io_wait_s": stats.get("io_wait_s"), "decode_io_wait_s": stats.get("decode_io_wait_s"),
            "last_stats": stats,
            "disk_read_bytes": disk_read_bytes() - read0, "placement_bytes": weights_by_home,
            "chosen_policy": asdict(model.policy) if c.auto else None, "plan": chosen}


def _first_token_timer():
    """A StoppingCriteria that records when generate() produced its first token (after
    prefill) and never stops generation."""
    import torch
    from transformers import StoppingCriteria

    class FirstTokenTimer(StoppingCriteria):
        first_at: float | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.first_at is None:
                self.first_at = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FirstTokenTimer()


ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def accelerate_kv_bytes(w: Workload, batch: int, config, itemsize: int) -> int:
    return (2 * config.num_hidden_layers * config.hidden_size * batch
            * (w.prompt_len + w.gen_len) * itemsize)


def accelerate_max_memory(spec: RunSpec, config, c: AccelerateConfig) -> dict:
    """max_memory for weights: the budget of the device holding the KV cache minus the
    cache (plus one layer's worth: the DynamicCache grows by torch.cat) and prefill
    activations; host RAM also keeps the runtime floor free."""
    itemsize = ITEMSIZE[c.dtype]
    w = spec.workload
    kv = accelerate_kv_bytes(w, c.batch_size, config, itemsize) * (1 + 1 / config.num_hidden_layers)
    ffn = getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size", 4 * config.hidden_size)
    act = 4 * c.batch_size * w.prompt_len * (3 * config.hidden_size + ffn) * itemsize
    act += c.batch_size * config.vocab_size * 4 * 2  # last-position logits, fp32 scores
    floor = int(c.runtime_floor_gib * GiB)
    if spec.device == "cuda":
        return {0: max(0, spec.gpu_budget_bytes - kv - act), "cpu": max(0, spec.budget_bytes - floor)}
    return {"cpu": max(0, spec.budget_bytes - kv - act - floor)}


def run_accelerate(spec: RunSpec) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, StoppingCriteriaList
    c, w = AccelerateConfig(**spec.config), spec.workload
    hf_config = AutoConfig.from_pretrained(w.checkpoint)
    max_memory = accelerate_max_memory(spec, hf_config, c)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        w.checkpoint, device_map="auto", max_memory=max_memory, offload_folder=spec.offload_dir,
        dtype=getattr(torch, c.dtype))
    load_s = time.perf_counter() - t0
    ids, mask = make_prompts(w, hf_config.vocab_size)
    first_device = "cuda:0" if spec.device == "cuda" else "cpu"
    outputs, prefill_s = [], 0.0
    mark_generation_start()
    read0, t1 = disk_read_bytes(), time.perf_counter()
    for start in range(0, w.num_prompts, c.batch_size):
        timer, b0 = _first_token_timer(), time.perf_counter()
        out = model.generate(input_ids=ids[start:start + c.batch_size].to(first_device),
                             attention_mask=mask[start:start + c.batch_size].to(first_device),
                             max_new_tokens=w.gen_len, min_new_tokens=w.gen_len, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([timer]))
        prefill_s += timer.first_at - b0
        outputs.append(out[:, w.prompt_len:].cpu())
    gen_s = time.perf_counter() - t1
    placement = _placement(model, hf_config)
    return {"load_s": load_s, "generate_s": gen_s, "new_tokens": torch.cat(outputs),
            "prefill_s": prefill_s, "decode_s": gen_s - prefill_s, "io_wait_s": None,
            "disk_read_bytes": disk_read_bytes() - read0, "placement_bytes": placement,
            "max_memory": {str(k): v for k, v in max_memory.items()}}


def _module_bytes(params, hf_config) -> int:
    """Bytes of parameters at the checkpoint's stored dtype."""
    import torch
    stored = getattr(torch, str(getattr(hf_config, "dtype", "float16")).removeprefix("torch."), torch.float16)
    return sum(p.numel() for p in params) * stored.itemsize


def _placement(model, hf_config) -> dict[str, int]:
    """Stored-dtype bytes per device of the device map (tied weights counted once)."""
    out, seen = {}, set()
    for name, dev in (getattr(model, "hf_device_map", None) or {}).items():
        module = model.get_submodule(name) if name else model
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        out[str(dev)] = out.get(str(dev), 0) + _module_bytes(params, hf_config)
    return out


_GENERATION_MARK: Path | None = None  # the worker writes when generation starts


def mark_generation_start() -> None:
    """Tell the parent when loading ended (time.monotonic is system-wide on Linux): a run
    stopped by the time limit is then bounded by its generation time alone."""
    if _GENERATION_MARK is not None:
        _GENERATION_MARK.write_text(repr(time.monotonic()))


def worker_main(spec_json: str, result_path: str) -> int:
    global _GENERATION_MARK
    _GENERATION_MARK = Path(result_path + ".generating")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    raw = json.loads(spec_json)
    spec = RunSpec(**{**raw, "workload": Workload(**raw["workload"])})
    Path(spec.offload_dir).mkdir(parents=True, exist_ok=True)
    if spec.device == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()
    result = (run_flexgen if spec.peer == FLEXGEN else run_accelerate)(spec)
    tokens = result.pop("new_tokens")
    if tuple(tokens.shape) != (spec.workload.num_prompts, spec.workload.gen_len):
        raise RuntimeError(f"expected {spec.workload.num_prompts}x{spec.workload.gen_len} new tokens, "
                           f"got {tuple(tokens.shape)}")
    result["tokens_sha"] = tokens_digest(tokens)
    result["new_tokens"] = tokens.tolist()
    result["maxrss_self_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if spec.device == "cuda":
        import torch
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(result_path).write_text(json.dumps(result))
    return 0


# -- parent side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    results_dir: Path
    max_run_s: float            # hard cap for any single run
    timeout_factor: float       # a run may take at most this x the peer's best so far
    budget_step: float          # escalation factor after an OOM kill
    max_budget_bytes: int


def run_spec(spec: RunSpec, timeout_s: float, settings: Settings, tag: str) -> dict:
    """One configuration in its own cgroup; returns the row for the report."""
    tmp = settings.results_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    result_file, log_file = tmp / f"{tag}.json", tmp / f"{tag}.log"
    mark_file = Path(str(result_file) + ".generating")
    result_file.unlink(missing_ok=True)
    mark_file.unlink(missing_ok=True)
    shutil.rmtree(spec.offload_dir, ignore_errors=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec)),
            "--result", str(result_file)]
    logger.info("run %s [%s] budget %s, time limit %.0f s", spec.peer, spec.label(),
                format_gib(spec.budget_bytes), timeout_s)
    load_before, spawned = os.getloadavg(), time.monotonic()
    outcome = run_in_cgroup(argv, spec.budget_bytes, timeout_s, log_file)
    shutil.rmtree(spec.offload_dir, ignore_errors=True)
    row = {"peer": spec.peer, "label": spec.label(), "config": spec.config,
           "budget_bytes": spec.budget_bytes, "returncode": outcome.returncode,
           "wall_s": outcome.wall_s, "time_limit_s": timeout_s,
           "peak_rss_bytes": outcome.child_maxrss_bytes, "cgroup_peak_bytes": outcome.cgroup_peak_bytes,
           "oom_kills": outcome.oom_kills, "log": str(log_file),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if outcome.returncode == 0 and result_file.exists():
        row.update(json.loads(result_file.read_text()), status="ok")
        row["tok_s"] = spec.workload.generated_tokens / row["generate_s"]
    elif outcome.killed_by == "oom":
        row["status"] = "killed at budget"
    elif outcome.killed_by == "timeout" and mark_file.exists():
        row["status"] = "time limit"
        row["generated_for_s"] = spawned + outcome.wall_s - float(mark_file.read_text())
        row["tok_s_upper_bound"] = spec.workload.generated_tokens / row["generated_for_s"]
    elif outcome.killed_by == "timeout":
        row["status"] = "time limit (still loading)"
    else:
        row["status"] = f"failed (exit {outcome.returncode})"
        row["error_tail"] = _tail(log_file)
    logger.info("  -> %s%s (wall %.0f s, peak RSS %s, cgroup peak %s)", row["status"],
                f", {row['tok_s']:.2f} tok/s" if "tok_s" in row else "", outcome.wall_s,
                format_gib(outcome.child_maxrss_bytes), format_gib(outcome.cgroup_peak_bytes))
    if row["status"].startswith("failed"):
        logger.warning("  log tail:\n%s", row["error_tail"])
    return row


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_with_escalation(spec: RunSpec, timeout_s: float, settings: Settings, tag: str,
                        first: dict | None = None) -> list[dict]:
    """Run at the budget (or take ``first``, that run's row); after an OOM kill, re-run at
    budget x step ... until it survives."""
    rows = [first or run_spec(spec, timeout_s, settings, tag)]
    budget = spec.budget_bytes
    while rows[-1]["status"] == "killed at budget":
        budget = int(budget * settings.budget_step)
        if budget > settings.max_budget_bytes:
            logger.info("  not escalating past %s", format_gib(settings.max_budget_bytes))
            break
        escalated = replace(spec, budget_bytes=budget)
        row = run_spec(escalated, timeout_s, settings, f"{tag}_b{budget // 2**20}M")
        row["escalated_from_bytes"] = spec.budget_bytes
        rows.append(row)
    return rows


PRESSED_RSS_SHARE = 0.9  # a run whose peak RSS reached this share of its budget was squeezed
LOAD_ALLOWANCE_S = 120  # loading is not timed as throughput: it gets its own allowance


def time_limit(rows: list[dict], peer: str, settings: Settings, budget: int) -> float:
    """A run whose generation takes longer than ``timeout_factor`` x the generation of the
    peer's fastest finished run at the same budget is stopped (with factor 1: it can no
    longer be the peer's best); loading gets ``LOAD_ALLOWANCE_S`` on top."""
    done = [r["generate_s"] for r in rows if r["peer"] == peer and r["status"] == "ok"
            and r["budget_bytes"] == budget]
    return min([settings.max_run_s] + [settings.timeout_factor * t + LOAD_ALLOWANCE_S for t in done])


def flexgen_configs(w: Workload, overlap: bool, device: str, cache_cpu: list[float],
                    dtypes: list[str | None] = (None,), auto: bool = False) -> list[FlexGenConfig]:
    """A small policy search. CPU: one block of every prompt as one micro-batch (on a CPU,
    one large matmul beats several small ones), all weights on disk, the KV cache in host
    RAM by each of ``cache_cpu`` percent (the rest on disk), in each compute dtype, and with
    ``auto`` policy="auto" given the budget as ``max_memory``, in each dtype. GPU
    (FlexGen's OPT-30B policy shape): 20% of the weights on the GPU, the rest and the KV
    cache in host RAM."""
    n = w.num_prompts
    quarter = max(1, n // 4)
    if device == "cuda":
        gpu = dict(w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=0, cache_cpu_percent=100)
        return [FlexGenConfig(quarter, n // quarter, overlap=overlap, **gpu),
                FlexGenConfig(n // 2, 2, overlap=overlap, **gpu)]
    return [FlexGenConfig(n, 1, cache_cpu_percent=c, overlap=overlap, dtype=d)
            for d in dtypes for c in cache_cpu] + [FlexGenConfig(n, 1, dtype=d, auto=True)
                                                   for d in (dtypes if auto else ())]


def accelerate_configs(w: Workload, dtypes: list[str], floors_gib: list[float],
                       batches: list[int] | None = None) -> list[list[AccelerateConfig]]:
    """Batch sizes (default: the number of prompts down through powers of 4), largest first;
    for each (dtype, batch) the runtime floors to try, in the order given."""
    sizes, b = {w.num_prompts}, 1
    while b < w.num_prompts:
        sizes.add(b)
        b *= 4
    sizes = set(batches) if batches else sizes
    return [[AccelerateConfig(s, d, f) for f in floors_gib]
            for d in dtypes for s in sorted(sizes, reverse=True)]


def earlier_rows(rows: list[dict], peer: str, label: str, budget: int) -> list[dict]:
    """Rows of an earlier invocation (``--resume``) for this configuration at this budget,
    with the escalated re-runs that followed them."""
    first = next((i for i, r in enumerate(rows) if r.get("resumed") and r["peer"] == peer
                  and r["label"] == label and r["budget_bytes"] == budget), None)
    if first is None:
        return []
    return [rows[first]] + [r for r in rows[first + 1:] if r.get("resumed") and r["peer"] == peer
                            and r["label"] == label and r.get("escalated_from_bytes") == budget]


def squeezed(row: dict) -> bool:
    """Killed at the budget, or stopped by a time limit with its RSS pressed against the
    budget (thrashing: re-reading evicted pages); a larger floor or a smaller batch may fit."""
    pressed = (row.get("peak_rss_bytes") or 0) >= PRESSED_RSS_SHARE * row["budget_bytes"]
    return row["status"] == "killed at budget" or (row["status"].startswith("time limit") and pressed)


def run_accelerate_search(groups, w, budget, settings, rows, device, gpu_budget, save) -> None:
    """Largest batch first. For each batch size, ``max_memory`` is part of Accelerate's best
    settings: its floors are tried in order at the budget until one is not squeezed (killed,
    or stopped by the time limit with its RSS pressed against the budget; a floor that
    gives the same ``max_memory`` as one already killed is skipped); when all are killed,
    the last is re-run at escalated budgets. Once a batch size hits a time limit that a finished
    run set, without its RSS pressed against the budget, smaller ones (which read the
    offloaded weights more often) are listed as not run."""
    model_config = SimpleNamespace(**json.loads((Path(w.checkpoint) / "config.json").read_text()))
    stopped: dict[str, int] = {}
    for i, group in enumerate(groups):
        dtype = group[0].dtype
        if dtype in stopped:
            rows.append({"peer": ACCELERATE, "label": group[0].label(), "config": asdict(group[0]),
                         "budget_bytes": budget, "status": f"not run (batch {stopped[dtype]} "
                         "already hit the time limit; a smaller batch re-reads the offloaded "
                         "weights more often)"})
            continue
        tried, new = [], []
        for j, c in enumerate(group):
            spec = RunSpec(ACCELERATE, asdict(c), w, budget, device=device, gpu_budget_bytes=gpu_budget)
            done = earlier_rows(rows, ACCELERATE, c.label(), budget)
            if done:
                logger.info("resumed: %s at %s: %s", c.label(), format_gib(budget), done[-1]["status"])
                new.extend(done)
                if not squeezed(done[0]) or len(done) > 1:
                    break
                tried.append(accelerate_max_memory(spec, model_config, c))
                continue
            max_memory = accelerate_max_memory(spec, model_config, c)
            if max_memory in tried:
                logger.info("skipping %s floor %.2f GiB: same max_memory as a run killed already",
                            c.label(), c.runtime_floor_gib)
                continue
            tried.append(max_memory)
            new.append(run_spec(spec, time_limit(rows + new, ACCELERATE, settings, budget),
                                settings, f"acc{i}_{j}"))
            rows.append(new[-1])
            save()
            if not squeezed(new[-1]):
                break
        else:
            escalated = run_with_escalation(spec, time_limit(rows, ACCELERATE, settings, budget),
                                            settings, f"acc{i}", first=new[-1])[1:]
            rows.extend(escalated)
            new.extend(escalated)
            save()
        # a batch stopped by a time limit that a finished run set can no longer win, and a
        # smaller batch re-reads the offloaded weights more often. But one stopped only by the
        # overall cap (nothing finished yet), or whose RSS was pressed against the budget, may
        # have been thrashing there, where a smaller batch fits: try smaller ones
        if any(r["status"].startswith("time limit") and r["time_limit_s"] < settings.max_run_s
               and not squeezed(r) for r in new):
            stopped[dtype] = group[0].batch_size


def annotate(rows: list[dict], roof_fn) -> dict | None:
    """Adds ratio vs the best Accelerate run at the base budget and the roofline fraction."""
    base = min(r["budget_bytes"] for r in rows)
    acc = [r for r in rows if r["peer"] == ACCELERATE and r["status"] == "ok" and r["budget_bytes"] == base]
    best_acc = max(acc, key=lambda r: r["tok_s"]) if acc else None
    for r in rows:
        if r.get("status") != "ok":
            continue
        roof = roof_fn(r["budget_bytes"])
        r["roofline_tok_s"] = roof.roofline_tok_s
        r["roofline_fraction"] = r["tok_s"] / roof.roofline_tok_s
        if best_acc:
            r["vs_best_accelerate"] = r["tok_s"] / best_acc["tok_s"]
        if best_acc and r["peer"] == FLEXGEN:
            r["tokens_match_best_accelerate"] = _agreement(r["new_tokens"], best_acc["new_tokens"])
    return best_acc


def _agreement(a: list, b: list) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


# -- report ------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _share(part, whole) -> str:
    return "-" if part is None or not whole else f"{part:.1f} s ({100 * part / whole:.0f}%)"


def table(rows: list[dict]) -> str:
    head = ("| peer | configuration | budget | status | tok/s | vs best Acc | load s | gen s | "
            "prefill s | decode s | I/O wait s | decode I/O wait | disk read GB | peak RSS | "
            "cgroup peak | % roofline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ok = r.get("status") == "ok"
        status = r["status"]
        if r.get("escalated_from_bytes"):
            status += f" (re-run after kill at {format_gib(r['escalated_from_bytes'])})"
        tok = _fmt(r.get("tok_s"), ".2f") if ok else (
            f"< {r['tok_s_upper_bound']:.2f}" if "tok_s_upper_bound" in r else "-")
        lines.append("| " + " | ".join([
            r["peer"], r["label"], format_gib(r["budget_bytes"]), status, tok,
            _fmt(r.get("vs_best_accelerate"), ".2f") + ("x" if r.get("vs_best_accelerate") else ""),
            _fmt(r.get("load_s"), ".0f"), _fmt(r.get("generate_s"), ".1f"),
            _fmt(r.get("prefill_s"), ".1f"), _fmt(r.get("decode_s"), ".1f"),
            _fmt(r.get("io_wait_s"), ".1f"),
            _share(r.get("decode_io_wait_s"), r.get("decode_s")),
            _fmt(r.get("disk_read_bytes") / 1e9 if r.get("disk_read_bytes") is not None else None, ".1f"),
            format_gib(r["peak_rss_bytes"]) if "peak_rss_bytes" in r else "-",
            format_gib(r["cgroup_peak_bytes"]) if "cgroup_peak_bytes" in r else "-",
            _fmt(100 * r["roofline_fraction"] if "roofline_fraction" in r else None, ".0f"),
        ]) + " |")
    return "\n".join(lines)


# -- scenarios -------------------------------------------------------------------------------------
SCENARIOS = {
    "cpu": dict(model="opt-1.3b", budget="2.5GiB", gpu_budget=None, prompt_len=8, gen_len=16,
                num_prompts=128, dtypes="float32,float16"),
    "gpu": dict(model="opt-30b", budget="200GiB", gpu_budget="16GiB", prompt_len=512, gen_len=32,
                num_prompts=64, dtypes="float16"),
}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _dtypes(text: str) -> list[str | None]:
    names = [d or None for d in text.split(",")]
    bad = [d for d in names if d not in (None, "float32", "float16", "bfloat16")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}: use float32, float16 or bfloat16")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="cpu")
    parser.add_argument("--model", help="a make_checkpoint.py shape (scenario default)")
    parser.add_argument("--checkpoint-root", default="/tmp/ckpt")
    parser.add_argument("--budget", help="host RAM budget, e.g. 2GiB (cgroup limit)")
    parser.add_argument("--gpu-budget", help="GPU memory budget (scenario gpu)")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--gen-len", type=int)
    parser.add_argument("--num-prompts", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerate-dtypes", help="comma-separated; default float32 on CPU "
                        "(half-precision matmuls are measured and skipped when hopeless)")
    parser.add_argument("--accelerate-floor-gib", type=_floats, default=[1.0],
                        help="budget Accelerate keeps free of weights for the runtime; "
                        "comma-separated floors are tried in order per batch size until one survives")
    parser.add_argument("--flexgen-dtypes", type=_dtypes, default=[None],
                        help="comma-separated compute dtypes for hf_flexgen (default: its own default)")
    parser.add_argument("--flexgen-auto", action="store_true",
                        help="also run hf_flexgen with policy='auto' and max_memory = the budget")
    parser.add_argument("--no-overlap", action="store_true", help="hf_flexgen policies with overlap=False")
    parser.add_argument("--overlap-off-too", action="store_true",
                        help="also run hf_flexgen's best policy with overlap=False (I/O-wait comparison)")
    parser.add_argument("--flexgen-cache-cpu", default="0",
                        help="comma-separated KV cache percentages in host RAM to try (rest on disk)")
    parser.add_argument("--accelerate-batches", help="comma-separated batch sizes for Accelerate "
                        "(default: the number of prompts and powers of 4 below it)")
    parser.add_argument("--only", choices=[FLEXGEN, ACCELERATE], help="run one peer only")
    parser.add_argument("--max-run-s", type=float, default=900)
    parser.add_argument("--timeout-factor", type=float, default=2.0)
    parser.add_argument("--budget-step", type=float, default=1.5)
    parser.add_argument("--max-budget-factor", type=float, default=4.0)
    parser.add_argument("--out", default="benchmarks/results/vs_accelerate_cpu.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (same workload and budget) and run the rest")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in SCENARIOS[args.scenario].items():
        attr = key if key != "dtypes" else "accelerate_dtypes"
        if getattr(args, attr, None) is None:
            setattr(args, attr, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.result)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = "cuda" if args.scenario == "gpu" else "cpu"
    if device == "cuda" and run_python("import torch; print(torch.cuda.is_available())").strip() != "True":
        logger.error("scenario gpu needs a CUDA device (torch.cuda.is_available() is False)")
        return 2
    if not cgroup_available():
        logger.error("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
        return 2
    from roofline import Hardware, ModelShape, Workload as RoofWorkload, roofline

    checkpoint = make_checkpoint_outside(args.model, Path(args.checkpoint_root) / args.model)
    w = Workload(args.model, str(checkpoint), args.prompt_len, args.gen_len, args.num_prompts, args.seed)
    budget = parse_bytes(args.budget)
    gpu_budget = parse_bytes(args.gpu_budget) if args.gpu_budget else None
    out = Path(args.out)
    settings = Settings(out.parent, args.max_run_s, args.timeout_factor, args.budget_step,
                        int(budget * args.max_budget_factor))
    hw = Hardware(**json.loads(run_python(
        "import json, sys; from dataclasses import asdict; sys.path.insert(0, %r); "
        "from roofline import measure_hardware; print(json.dumps(asdict(measure_hardware(%r))))"
        % (str(HERE), str(max(checkpoint.glob("*.safetensors"), key=lambda p: p.stat().st_size))))
        .strip().splitlines()[-1]))
    shape = ModelShape.from_checkpoint(Path(checkpoint))
    roof_w = RoofWorkload(w.num_prompts, w.prompt_len, w.gen_len)
    roof_fn = lambda b: roofline(shape, roof_w, hw, b)  # noqa: E731
    dtypes = _usable_dtypes(args.accelerate_dtypes.split(","), hw, device)

    rows: list[dict] = []
    if args.resume and out.exists():  # a long comparison never loses finished runs
        earlier = json.loads(out.read_text())
        if earlier["workload"] != asdict(w) or earlier["budget_bytes"] != budget:
            logger.error("--resume: %s holds another workload or budget; use another --out", out)
            return 2
        rows = [{**r, "resumed": True} for r in earlier["runs"] if not r.get("status", "").startswith("not run")]
        logger.info("resumed %d runs from %s", len(rows), out)
    load_start = os.getloadavg()

    def save() -> dict:
        """Write the report so far (after every configuration: a cut-short benchmark keeps
        what finished)."""
        best_acc = annotate(rows, roof_fn)
        report = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  "scenario": args.scenario, "workload": asdict(w), "budget_bytes": budget,
                  "gpu_budget_bytes": gpu_budget, "hardware": asdict(hw),
                  "roofline": asdict(roof_fn(budget)), "accelerate_dtypes_skipped": dtypes["skipped"],
                  "best": {p: _best(rows, p) for p in (FLEXGEN, ACCELERATE)},
                  "best_accelerate_tok_s": best_acc["tok_s"] if best_acc else None,
                  "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "runs": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        logger.info("wrote %s", out)
        return report

    assert_torch_free()  # see cgroup.py
    if args.only != ACCELERATE:
        cache_cpu = [float(c) for c in args.flexgen_cache_cpu.split(",")]
        configs = flexgen_configs(w, not args.no_overlap, device, cache_cpu, args.flexgen_dtypes,
                                  args.flexgen_auto)
        for i, c in enumerate(configs):
            spec = RunSpec(FLEXGEN, asdict(c), w, budget, device=device, gpu_budget_bytes=gpu_budget)
            if earlier_rows(rows, FLEXGEN, spec.label(), budget):
                logger.info("resumed: %s", spec.label())
                continue
            rows.extend(run_with_escalation(spec, time_limit(rows, FLEXGEN, settings, budget),
                                            settings, f"flex{i}"))
            save()
        best = _best(rows, FLEXGEN)
        if args.overlap_off_too and best and best["config"]["overlap"] and not any(
                r.get("resumed") and r["peer"] == FLEXGEN and not r["config"].get("overlap", True)
                for r in rows):
            spec = RunSpec(FLEXGEN, serial_twin(best, rows), w, best["budget_bytes"],
                           device=device, gpu_budget_bytes=gpu_budget)
            rows.extend(run_with_escalation(spec, settings.max_run_s, settings, "flex_serial"))
            save()
    if args.only != FLEXGEN:
        batches = [int(b) for b in args.accelerate_batches.split(",")] if args.accelerate_batches else None
        run_accelerate_search(accelerate_configs(w, dtypes["run"], args.accelerate_floor_gib, batches),
                              w, budget, settings, rows, device, gpu_budget, save)
    report = save()
    print(table(rows))
    for peer in (FLEXGEN, ACCELERATE):
        best = report["best"][peer]
        print(f"best {peer}: " + (f"{best['label']} at {format_gib(best['budget_bytes'])}: "
                                  f"{best['tok_s']:.2f} tok/s" if best else "none finished"))
    print(f"roofline at {format_gib(budget)}: {report['roofline']['roofline_tok_s']:.2f} tok/s "
          f"({report['roofline']['bound']}-bound)")
    return 0


def serial_twin(best: dict, rows: list[dict]) -> dict:
    """The best hf_flexgen configuration with overlap off (for policy="auto": the policy the
    planner chose, spelled out)."""
    config = best["config"]
    if config.get("auto"):
        chosen = next(r["chosen_policy"] for r in rows if r.get("label") == best["label"]
                      and r.get("chosen_policy"))
        fields = ("gpu_batch_size", "num_gpu_batches", "w_gpu_percent", "w_cpu_percent",
                  "cache_gpu_percent", "cache_cpu_percent")
        config = asdict(FlexGenConfig(**{f: chosen[f] for f in fields}, dtype=config["dtype"]))
    return {**config, "overlap": False}


def _best(rows: list[dict], peer: str) -> dict | None:
    ok = [r for r in rows if r["peer"] == peer and r.get("status") == "ok"]
    if not ok:
        return None
    base = min(r["budget_bytes"] for r in ok)
    best = max((r for r in ok if r["budget_bytes"] == base), key=lambda r: r["tok_s"])
    return {k: best[k] for k in ("label", "config", "budget_bytes", "tok_s")}


def _usable_dtypes(requested: list[str], hw, device: str) -> dict:
    """On CPU, a half dtype whose measured matmul rate is < 1/20 of fp32 is skipped."""
    run, skipped = [], {}
    for d in requested:
        rate = hw.extra.get(f"matmul_flops_{d}")
        if device == "cpu" and rate is not None and rate < hw.matmul_flops / 20:
            skipped[d] = (f"{rate / 1e9:.1f} GFLOP/s matmul vs {hw.matmul_flops / 1e9:.0f} for float32: "
                          "the workload would take hours")
            continue
        run.append(d)
    return {"run": run, "skipped": skipped}


if __name__ == "__main__":
    sys.exit(main())
