"""Measured compute cost of one decoder layer and of the head, for the cost model.

A FLOP count misses much of where a layer's time goes (norms, rotary embeddings, activation
functions and residuals are memory-bound elementwise passes; small-batch matmuls are bound by
reading the weights), so policy="auto" times the real thing once per machine, model shape
and dtype: HF's own layer module run through the engine's stage code with random weights of
the checkpoint's shapes (nothing is read from disk), at a prefill and at two decode batch
sizes. The engine streams through every layer, so no layer's weights are still in the CPU's
caches when it runs: each timing starts with the last-level cache evicted (SmolLM2, 8 rows:
a decode layer step timed warm 1.4 ms, cold 2.4 ms; the engine runs it in about 2.5 ms).
Results are cached
as JSON next to the hardware profile.

A one-off timing freezes whatever speed the machine had at that moment (on a shared VM, an
OPT-125M prefill calibrated at 0.119 ms per token and layer; re-timed minutes later, 0.056).
So the prefill rate is also learned from the engine's own runs: each CPU run whose prefill
took long enough records its compute time per token and layer (I/O waits taken out, the
head's share left in), and the rate used is the median of the last few.

Likewise a decode step: the engine spends time around each micro-batch's pass through a
layer that a bare layer call does not (handing work to the I/O workers, the KV cache's
bookkeeping, Python). Measured, 0.5-1 ms per pass on SmolLM2, which made two micro-batches
of 32 rows run 1.5x slower than one of 64 where the timings said 1.28x. Each CPU run's
decode compute time beyond the timed costs, per pass, is recorded; the median of the last
few is added to ``decode_fixed_s``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from .families import StepInputs, adapter_for
from .memory.kv_cache import FlexKVCache
from .memory.prefetch import IOWorker
from .placement.cost_model import LayerCosts
from .memory.resolve import cache_root
from .placement.hardware import machine_key, time_once
from .placement.profile_store import observe, read_json, write_json
from .policy import DEVICE

logger = logging.getLogger(__name__)

PREFILL_TOKENS, DECODE_CONTEXT, DECODE_ROWS, REPEATS = 128, 16, 64, 8
VERSION = 3  # bump when what is measured changes: older cached profiles are not reused
EVICT_MAX = 256 * 2**20  # bytes written to evict the CPU's last-level cache, at most
OBSERVED_KEY = "observed_prefill_token_s"  # from the engine's runs, newest last
OBSERVATIONS = 5
MIN_OBSERVED_PREFILL_S = 0.5  # shorter prefills say too little about the sustained rate
OVERHEAD_KEY = "observed_decode_pass_s"  # the engine's decode time per layer pass beyond the timings
MIN_OBSERVED_DECODE_S = 0.5
MAX_OBSERVED_CONTEXT = 4 * DECODE_CONTEXT  # past it, attention (modelled apart) would weigh in


def layer_costs(config, skeleton, device: torch.device, dtype: torch.dtype,
                refresh: bool = False) -> LayerCosts:
    """Cached measurement for this machine, model shape and dtype, with the prefill rate
    the engine's runs have shown, where they have."""
    path = _path(config, device, dtype)
    data = None if refresh else _read(path)
    if data is None:
        logger.info("timing one %s layer on %s (once; cached in %s)", config.model_type, device, path)
        data = dict(measure(skeleton, device, dtype).__dict__)
        write_json(path, data)
    costs = LayerCosts(**{k: data[k] for k in LayerCosts.__dataclass_fields__})
    observed = data.get(OBSERVED_KEY) or []
    if observed:
        costs = replace(costs, prefill_token_s=statistics.median(observed))
    overheads = data.get(OVERHEAD_KEY) or []
    if overheads:
        costs = replace(costs, decode_fixed_s=costs.decode_fixed_s + max(0.0, statistics.median(overheads)))
    return costs


def observe_prefill(config, device: torch.device, dtype: torch.dtype, stats: dict,
                    prompt_len: int, layers: int) -> None:
    """Record the prefill rate a run reached (``stats``: the engine's figures) in the cached
    layer profile of this model shape, if one exists. Only CPU runs whose prompts are no
    longer than the calibration's (past it, the cost model adds attention on its own) and
    whose prefill ran long enough count. Never fails the caller."""
    compute_s = stats["prefill_s"] - (stats["io_wait_s"] - stats["decode_io_wait_s"])
    if (device.type != "cpu" or prompt_len > PREFILL_TOKENS or stats["prefill_s"] < MIN_OBSERVED_PREFILL_S
            or compute_s <= 0 or not stats["prefill_tokens"] or not layers):
        return
    rate = compute_s / (stats["prefill_tokens"] * layers)
    kept = observe(_path(config, device, dtype), OBSERVED_KEY, rate, OBSERVATIONS)
    if kept:
        logger.info("prefill ran at %.3g ms per token and layer; profile rate now %.3g ms",
                    rate * 1e3, statistics.median(kept) * 1e3)


def observe_decode(config, device: torch.device, dtype: torch.dtype, stats: dict, policy,
                   max_context: int, layers: int) -> None:
    """Record how much longer than the timed layer and head costs a run's decode steps took
    on the compute thread (I/O waits and weight conversions taken out), per micro-batch pass
    through a layer, in the cached layer profile of this model shape, if one exists. Only CPU
    runs count whose KV cache stayed in RAM uncompressed (a disk or 4-bit cache costs the
    compute thread work the cost model counts apart), whose contexts stayed short, and whose
    decode ran long enough. Never fails the caller."""
    calls, rows = stats["decode_layer_calls"], stats["decode_layer_rows"]
    compute_s = stats["decode_s"] - stats["decode_io_wait_s"] - stats["decode_convert_s"]
    cache_on_disk = policy.cache_gpu_percent + policy.cache_cpu_percent < 100
    if (device.type != "cpu" or not calls or cache_on_disk or policy.compress_cache
            or max_context > MAX_OBSERVED_CONTEXT or compute_s < MIN_OBSERVED_DECODE_S):
        return
    path = _path(config, device, dtype)
    data = _read(path)
    if data is None:
        return
    timed = (calls * data["decode_fixed_s"] + rows * data["decode_row_s"]
             + (calls * data["head_fixed_s"] + rows * data["head_row_s"]) / layers)
    extra = (compute_s - timed) / calls
    kept = observe(path, OVERHEAD_KEY, extra, OBSERVATIONS)
    if kept:
        logger.info("decode took %.3g ms per layer pass beyond the timed costs; profile now adds "
                    "%.3g ms", extra * 1e3, max(0.0, statistics.median(kept)) * 1e3)


def _path(config, device: torch.device, dtype: torch.dtype) -> Path:
    shape = json.dumps(config.to_diff_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{shape}-{dtype}-v{VERSION}".encode()).hexdigest()[:16]
    return cache_root() / "hardware" / f"{machine_key(device)}-layer-{digest}.json"


def _read(path: Path) -> dict | None:
    data = read_json(path)
    if data is None:
        return None
    try:
        LayerCosts(**{k: data[k] for k in LayerCosts.__dataclass_fields__})
    except (TypeError, KeyError):
        logger.warning("ignoring unreadable layer profile %s", path)
        return None
    return data


@torch.inference_mode()
def measure(skeleton, device: torch.device, dtype: torch.dtype) -> LayerCosts:
    adapter = adapter_for(skeleton)
    names = adapter.stage_parameters()
    timed = cold_timer(device)
    embed = {n: _random(skeleton, n, device, dtype, small_vocab=True) for n in names[0]}
    layer = {n: _random(skeleton, n, device, dtype) for n in names[1]}
    io = IOWorker(False, device)

    def run(rows: int, prompt: int, decode_steps: int) -> tuple[float, list[float]]:
        cache = FlexKVCache([DEVICE] * adapter.num_layers, capacity=prompt + decode_steps,
                            device=device, directory=None, io=io)
        ids = torch.randint(0, 16, (rows, prompt), device=device)
        mask = torch.ones_like(ids)
        step = StepInputs(ids, mask, torch.arange(prompt, device=device).expand(rows, -1), cache)
        prefill = timed(lambda: adapter.layer(0, layer, adapter.embed(embed, step), step))
        decode = []
        for i in range(decode_steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            step = StepInputs(ids[:, :1], mask, torch.full((rows, 1), prompt + i, device=device), cache)
            hidden = adapter.embed(embed, step)
            decode.append(timed(lambda: adapter.layer(0, layer, hidden, step)))
        return prefill, decode

    run(2, 8, 1)  # warm-up
    # medians of several: the engine runs at the machine's typical speed, not its best
    # prefill as blocks run it: many rows at once (fewer for big layers, to stay quick)
    params = sum(t.numel() for t in layer.values())
    rows = max(1, min(8, 2**26 // max(1, params * PREFILL_TOKENS // 1024)))
    prefill = statistics.median(run(rows, PREFILL_TOKENS, 0)[0] for _ in range(3)) / rows
    _, one = run(1, DECODE_CONTEXT, REPEATS)
    _, many = run(DECODE_ROWS, DECODE_CONTEXT, REPEATS)
    d1, dn = statistics.median(one), statistics.median(many)
    per_row = max(0.0, (dn - d1) / (DECODE_ROWS - 1))
    head = _time_head(skeleton, adapter, names[-1], device, dtype, timed)
    return LayerCosts(prefill_token_s=prefill / PREFILL_TOKENS, decode_fixed_s=max(0.0, d1 - per_row),
                      decode_row_s=per_row, head_fixed_s=head[0], head_row_s=head[1])


def _time_head(skeleton, adapter, names, device, dtype, timed) -> tuple[float, float]:
    weights = {n: _random(skeleton, n, device, dtype) for n in names}
    hidden_size = skeleton.config.hidden_size
    times = []
    for rows in (1, DECODE_ROWS):
        hidden = torch.randn(rows, 1, hidden_size, device=device, dtype=dtype)
        logits_fn = lambda: torch.log_softmax(adapter.head(weights, hidden).float(), -1).argmax(-1)  # noqa: E731
        logits_fn()
        times.append(statistics.median(timed(logits_fn) for _ in range(REPEATS)))
    per_row = max(0.0, (times[1] - times[0]) / (DECODE_ROWS - 1))
    return max(0.0, times[0] - per_row), per_row


def cold_timer(device: torch.device):
    """``timed(fn)``: seconds of one call of ``fn``, started with the CPU's last-level cache
    evicted (on CPU devices; an accelerator's own caches are left as they are)."""
    if device.type != "cpu":
        return lambda fn: time_once(fn, device)
    junk = torch.empty(min(last_level_cache_bytes(), EVICT_MAX) // 4, dtype=torch.float32)

    def timed(fn) -> float:
        junk.fill_(1.0)
        return time_once(fn, device)
    return timed


def last_level_cache_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of CPU 0's largest cache, from sysfs (64 MiB where it cannot be read)."""
    sizes, units = [], {"K": 2**10, "M": 2**20, "G": 2**30}
    for entry in cpu.glob("index*/size"):
        text = entry.read_text().strip().upper()
        try:
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (ValueError, IndexError):
            continue
    return max(sizes, default=64 * 2**20)


def _random(model, name: str, device, dtype, small_vocab: bool = False) -> torch.Tensor:
    shape = tuple(model.get_parameter(name).shape)
    if small_vocab and name.endswith("embed_tokens.weight"):
        shape = (16, *shape[1:])
    if len(shape) == 1:
        return torch.ones(shape, device=device, dtype=dtype)
    return (torch.randn(shape, device=device, dtype=dtype) * 0.02)

