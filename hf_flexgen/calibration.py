"""Measured compute cost of one decoder layer and of the head, for the cost model.

A FLOP count misses much of where a layer's time goes (norms, rotary embeddings, activation
functions and residuals are memory-bound elementwise passes; small-batch matmuls are bound by
reading the weights), so policy="auto" times the real thing once per machine, model shape
and dtype: HF's own layer module run through the engine's stage code with random weights of
the checkpoint's shapes (nothing is read from disk), at a prefill and at two decode batch
sizes. Results are cached as JSON next to the hardware profile.
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch

from .families import StepInputs, adapter_for
from .memory.kv_cache import FlexKVCache
from .memory.prefetch import IOWorker
from .placement.cost_model import LayerCosts
from .memory.resolve import cache_root
from .placement.hardware import machine_key, time_once
from .policy import DEVICE

logger = logging.getLogger(__name__)

PREFILL_TOKENS, DECODE_CONTEXT, DECODE_ROWS, REPEATS = 128, 16, 64, 8


def layer_costs(config, skeleton, device: torch.device, dtype: torch.dtype,
                refresh: bool = False) -> LayerCosts:
    """Cached measurement for this machine, model shape and dtype."""
    shape = json.dumps(config.to_diff_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{shape}-{dtype}".encode()).hexdigest()[:16]
    path = cache_root() / "hardware" / f"{machine_key(device)}-layer-{digest}.json"
    if path.exists() and not refresh:
        try:
            return LayerCosts(**json.loads(path.read_text()))
        except (TypeError, ValueError):
            logger.warning("ignoring unreadable layer profile %s", path)
    logger.info("timing one %s layer on %s (once; cached in %s)", config.model_type, device, path)
    costs = measure(skeleton, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs.__dict__))
    return costs


@torch.inference_mode()
def measure(skeleton, device: torch.device, dtype: torch.dtype) -> LayerCosts:
    adapter = adapter_for(skeleton)
    names = adapter.stage_parameters()
    embed = {n: _random(skeleton, n, device, dtype, small_vocab=True) for n in names[0]}
    layer = {n: _random(skeleton, n, device, dtype) for n in names[1]}
    io = IOWorker(False, device)

    def run(rows: int, prompt: int, decode_steps: int) -> tuple[float, list[float]]:
        cache = FlexKVCache([DEVICE] * adapter.num_layers, capacity=prompt + decode_steps,
                            device=device, directory=None, io=io)
        ids = torch.randint(0, 16, (rows, prompt), device=device)
        mask = torch.ones_like(ids)
        step = StepInputs(ids, mask, torch.arange(prompt, device=device).expand(rows, -1), cache)
        prefill = time_once(lambda: adapter.layer(0, layer, adapter.embed(embed, step), step), device)
        decode = []
        for i in range(decode_steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            step = StepInputs(ids[:, :1], mask, torch.full((rows, 1), prompt + i, device=device), cache)
            hidden = adapter.embed(embed, step)
            decode.append(time_once(lambda: adapter.layer(0, layer, hidden, step), device))
        return prefill, decode

    run(2, 8, 1)  # warm-up
    # best of several: on a busy machine single timings of small ops are mostly waiting
    # prefill as blocks run it: many rows at once (fewer for big layers, to stay quick)
    params = sum(t.numel() for t in layer.values())
    rows = max(1, min(8, 2**26 // max(1, params * PREFILL_TOKENS // 1024)))
    prefill = min(run(rows, PREFILL_TOKENS, 0)[0] for _ in range(3)) / rows
    _, one = run(1, DECODE_CONTEXT, REPEATS)
    _, many = run(DECODE_ROWS, DECODE_CONTEXT, REPEATS)
    d1, dn = min(one), min(many)
    per_row = max(0.0, (dn - d1) / (DECODE_ROWS - 1))
    head = _time_head(skeleton, adapter, names[-1], device, dtype)
    return LayerCosts(prefill_token_s=prefill / PREFILL_TOKENS, decode_fixed_s=max(0.0, d1 - per_row),
                      decode_row_s=per_row, head_fixed_s=head[0], head_row_s=head[1])


def _time_head(skeleton, adapter, names, device, dtype) -> tuple[float, float]:
    weights = {n: _random(skeleton, n, device, dtype) for n in names}
    hidden_size = skeleton.config.hidden_size
    times = []
    for rows in (1, DECODE_ROWS):
        hidden = torch.randn(rows, 1, hidden_size, device=device, dtype=dtype)
        logits_fn = lambda: torch.log_softmax(adapter.head(weights, hidden).float(), -1).argmax(-1)  # noqa: E731
        logits_fn()
        times.append(min(time_once(logits_fn, device) for _ in range(REPEATS)))
    per_row = max(0.0, (times[1] - times[0]) / (DECODE_ROWS - 1))
    return max(0.0, times[0] - per_row), per_row


def _random(model, name: str, device, dtype, small_vocab: bool = False) -> torch.Tensor:
    shape = tuple(model.get_parameter(name).shape)
    if small_vocab and name.endswith("embed_tokens.weight"):
        shape = (16, *shape[1:])
    if len(shape) == 1:
        return torch.ones(shape, device=device, dtype=dtype)
    return (torch.randn(shape, device=device, dtype=dtype) * 0.02)

