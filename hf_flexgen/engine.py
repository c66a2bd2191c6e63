"""The block schedule: token step -> stage -> micro-batch.

A block of ``gpu_batch_size x num_gpu_batches`` sequences is generated together: each
stage's weights are fetched once per token step and used for every micro-batch, while each
micro-batch's activations and KV cache live in their own homes between uses.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .families import FamilyAdapter, StepInputs
from .generation import TokenChooser
from .memory.kv_cache import FlexKVCache
from .memory.prefetch import IOWorker
from .memory.weights import WeightStore
from .policy import CPU, Policy, spread_units

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One micro-batch's state across the token steps of a block."""

    sequences: torch.Tensor   # (batch, prompt + generated): HF's input_ids, padding kept
    skip: int                 # leading prompt columns that are padding in every row
    step: StepInputs          # what the next token step feeds the model
    unfinished: torch.Tensor  # (batch,) bool
    act_home: str
    first_row: int            # index of the micro-batch's first row in the block
    forced: torch.Tensor | None = None  # (batch, steps): teacher-forced tokens, for scoring
    hidden: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return not bool(self.unfinished.any())


@dataclass
class EngineStats:
    """Where the time and bytes of generate() calls went (summed over blocks)."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0     # positions (padding included) the prefill passes computed
    decode_s: float = 0.0
    io_wait_s: float = 0.0      # compute thread blocked on weight / KV I/O
    decode_io_wait_s: float = 0.0  # the part of io_wait_s spent in decode steps
    decode_convert_s: float = 0.0  # decode steps' weight casts / dequantization (compute thread)
    decode_layer_calls: int = 0    # micro-batch passes through a decoder layer in decode steps
    decode_layer_rows: int = 0     # the rows of those passes, summed
    weight_bytes_read: int = 0  # from disk (checkpoint files read in place)
    weight_read_s: float = 0.0  # seconds the I/O worker spent reading them
    weight_reads: int = 0       # read requests (one per tensor) behind them
    kv_bytes_read: int = 0      # KV cache moved from its home to the compute device
    kv_bytes_stored: int = 0    # largest KV cache a block held (all homes, at its end)
    v_bytes_read: int = 0       # bytes of V attention read from the cache (sparsity reads fewer)

    def as_dict(self) -> dict:
        return asdict(self)


class BlockEngine:
    """Runs blocks. With ``policy.overlap`` two background workers (weights, KV cache) fetch
    stage j+1's weights and the next micro-batch's KV cache while the current one computes;
    without it the same fetches run inline (the serial path, for debugging and comparison)."""

    def __init__(self, adapter: FamilyAdapter, store: WeightStore, policy: Policy,
                 device: torch.device, offload_dir: Path | None):
        self.adapter, self.store, self.policy = adapter, store, policy
        self.device, self.offload_dir = device, offload_dir
        self.weights_io = IOWorker(policy.overlap, device)
        self.cache_io = IOWorker(policy.overlap, device)
        self.stats = EngineStats()
        self.convert_s = 0.0  # running total of store.to_compute's time

    def close(self) -> None:
        self.weights_io.close()
        self.cache_io.close()

    @property
    def num_stages(self) -> int:
        return len(self.store.stages)

    def start_micro_batches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            new_tokens: int, forced: torch.Tensor | None = None) -> list[MicroBatch]:
        """Cut a block's rows into micro-batches, giving each its cache and activation home.
        ``forced`` (rows, new_tokens) replaces the chosen tokens (teacher forcing)."""
        p = self.policy
        chunks = list(zip(input_ids.split(p.gpu_batch_size), attention_mask.split(p.gpu_batch_size)))
        forced_chunks = forced.split(p.gpu_batch_size) if forced is not None else [None] * len(chunks)
        k_count, layers = len(chunks), self.adapter.num_layers
        cache_homes = spread_units(layers * k_count, p.shares("cache"))
        act_homes = spread_units(k_count, p.shares("act"))
        out = []
        for k, (ids, mask) in enumerate(chunks):
            real = mask.any(dim=0).nonzero()
            skip = int(real[0]) if len(real) else ids.shape[1] - 1
            ids_t, mask_t = ids[:, skip:].to(self.device), mask[:, skip:].to(self.device)
            positions = (mask_t.long().cumsum(-1) - 1).masked_fill(mask_t == 0, 0)
            cache = FlexKVCache([cache_homes[j * k_count + k] for j in range(layers)],
                                capacity=ids_t.shape[1] + new_tokens, device=self.device,
                                directory=self.offload_dir, io=self.cache_io,
                                compression=p.comp_cache_config if p.compress_cache else None,
                                delegate=p.cpu_cache_compute, sparsity=p.attn_sparsity)
            out.append(MicroBatch(
                sequences=ids.to(self.device), skip=skip,
                step=StepInputs(ids_t, mask_t, positions, cache),
                unfinished=torch.ones(ids.shape[0], dtype=torch.bool, device=self.device),
                act_home=act_homes[k], first_row=k * p.gpu_batch_size,
                forced=None if forced_chunks[k] is None else forced_chunks[k].to(self.device)))
        return out

    def run_block(self, micro_batches: list[MicroBatch], new_tokens: int, chooser: TokenChooser,
                  on_scores=None) -> int:
        """Generate up to ``new_tokens`` tokens for every micro-batch; returns steps run."""
        steps, bytes_before, read_before = 0, self.store.bytes_read, self.store.read_s
        reads_before = self.store.reads
        waits_before = self.weights_io.wait_s + self.cache_io.wait_s
        try:
            for _ in range(new_tokens):
                active = [mb for mb in micro_batches if not mb.done]
                if not active:
                    break
                start, waits = time.perf_counter(), self.weights_io.wait_s + self.cache_io.wait_s
                converts = self.convert_s
                tokens = sum(mb.step.input_ids.numel() for mb in active)
                self._run_step(active, chooser, on_scores, steps)
                elapsed = time.perf_counter() - start
                if steps == 0:
                    self.stats.prefill_s += elapsed
                    self.stats.prefill_tokens += tokens
                else:
                    self.stats.decode_s += elapsed
                    self.stats.decode_io_wait_s += self.weights_io.wait_s + self.cache_io.wait_s - waits
                    self.stats.decode_convert_s += self.convert_s - converts
                    layers = self.num_stages - 2
                    self.stats.decode_layer_calls += layers * len(active)
                    self.stats.decode_layer_rows += layers * tokens
                steps += 1
        finally:
            self.cache_io.wait(self.cache_io.submit(lambda: None))  # pending KV writes land
            stored = sum(sum(mb.step.cache.nbytes_by_home().values()) for mb in micro_batches)
            self.stats.kv_bytes_stored = max(self.stats.kv_bytes_stored, stored)
            for mb in micro_batches:
                self.stats.kv_bytes_read += mb.step.cache.bytes_read
                self.stats.v_bytes_read += mb.step.cache.values_bytes_read
                mb.step.cache.close()
            self.stats.weight_bytes_read += self.store.bytes_read - bytes_before
            self.stats.weight_read_s += self.store.read_s - read_before
            self.stats.weight_reads += self.store.reads - reads_before
            self.stats.io_wait_s += self.weights_io.wait_s + self.cache_io.wait_s - waits_before
        return steps

    def _run_step(self, active: list[MicroBatch], chooser: TokenChooser, on_scores, step: int):
        """One token step: stage by stage, each stage over every micro-batch."""
        last = self.num_stages - 1
        units = [(j, k) for j in range(self.num_stages) for k in range(len(active))]
        pending = self.weights_io.submit(self.store.fetch, 0)
        for u, (j, k) in enumerate(units):
            if k == 0:
                fetched = self.weights_io.wait(pending)
                if j < last:
                    pending = self.weights_io.submit(self.store.fetch, j + 1)
                converting = time.perf_counter()
                weights = self.store.to_compute(j, fetched)
                self.convert_s += time.perf_counter() - converting
            if self.policy.overlap and u + 1 < len(units):
                nj, nk = units[u + 1]
                if 0 < nj < last:
                    active[nk].step.cache.layers[nj - 1].prefetch_past()
            self._run_stage(j, weights, active[k], chooser, on_scores, step)

    def _run_stage(self, j: int, weights, mb: MicroBatch, chooser: TokenChooser, on_scores, step):
        adapter = self.adapter
        if j == 0:
            hidden = adapter.embed(weights, mb.step)
        elif j < self.num_stages - 1:
            hidden = adapter.layer(j - 1, weights, mb.hidden.to(self.device), mb.step)
        else:
            logits = adapter.head(weights, mb.hidden.to(self.device))
            mb.hidden = None
            self._advance(mb, logits, chooser, on_scores, step)
            return
        mb.hidden = hidden.to("cpu") if mb.act_home == CPU else hidden

    def _advance(self, mb: MicroBatch, logits, chooser: TokenChooser, on_scores, step: int) -> None:
        scores = chooser.scores(mb.sequences, logits)
        if on_scores is not None:
            on_scores(mb, step, logits, scores)
        if mb.forced is not None:
            tokens = mb.forced[:, step]
        else:
            tokens, mb.unfinished = chooser.choose(scores, mb.unfinished)
        mb.sequences = torch.cat([mb.sequences, tokens[:, None]], dim=1)
        s = mb.step
        mb.step = StepInputs(
            input_ids=tokens[:, None],
            attention_mask=torch.cat([s.attention_mask, s.attention_mask.new_ones(len(tokens), 1)], 1),
            position_ids=s.position_ids[:, -1:] + 1,
            cache=s.cache)

    # -- scoring: one forward pass per block, no KV cache ---------------------------------
    def run_forward(self, steps: list[StepInputs], on_head) -> None:
        """One forward pass over every micro-batch of a block (``steps[k].cache`` is None:
        nothing is kept), walked layer-major like a token step: each stage's weights are
        fetched once for the whole block (the next stage's in the background with overlap),
        activations live in their policy home between stages. The head stage is the
        caller's: ``on_head(k, weights, hidden)`` gets micro-batch k's decoder output
        (batch, seq, hidden) and the head stage's weights."""
        start, bytes_before, waits_before = time.perf_counter(), self.store.bytes_read, self.weights_io.wait_s
        read_before, reads_before = self.store.read_s, self.store.reads
        act_homes = spread_units(len(steps), self.policy.shares("act"))
        hidden: list[torch.Tensor | None] = [None] * len(steps)
        last = self.num_stages - 1
        pending = self.weights_io.submit(self.store.fetch, 0)
        for j in range(self.num_stages):
            weights = self.weights_io.wait(pending)
            if j < last:
                pending = self.weights_io.submit(self.store.fetch, j + 1)
            for k, step in enumerate(steps):
                if j == last:
                    on_head(k, weights, hidden[k].to(self.device))
                    hidden[k] = None
                    continue
                out = (self.adapter.embed(weights, step) if j == 0 else
                       self.adapter.layer(j - 1, weights, hidden[k].to(self.device), step))
                hidden[k] = out.to("cpu") if act_homes[k] == CPU else out
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefill_tokens += sum(step.input_ids.numel() for step in steps)
        self.stats.weight_bytes_read += self.store.bytes_read - bytes_before
        self.stats.weight_read_s += self.store.read_s - read_before
        self.stats.weight_reads += self.store.reads - reads_before
        self.stats.io_wait_s += self.weights_io.wait_s - waits_before
