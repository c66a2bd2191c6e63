"""Cost model: time and peak memory of the block schedule for a policy, model and workload.

One set of formulas serves two callers. ``estimate()`` evaluates a concrete ``Policy`` with
the homes the engine will really give each tensor (FlexGen's midpoint rule per stage, cache
units spread over layers x micro-batches) and every token step's context length. The LP in
``solver.py`` calls the same stage-time functions with placement fractions that are pulp
variables, so its objective is this model, linearized.

Time per token step and stage follows the engine: a stage's weights are fetched once per
step, then every micro-batch runs through it. With overlap the next stage's weight fetch and
the next micro-batch's KV-cache read run beside the compute, so a stage costs the largest of
its compute, weight-I/O and cache-I/O terms; without overlap their sum. On a CPU-only
machine the cast of streamed half weights to fp32 uses the same cores as the compute, so it
adds to compute instead of hiding behind it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

from ..memory.checkpoint import direct_span
from ..memory.weights import is_table, table_chunk_shape
from ..policy import (CPU, DEVICE, DISK, HOMES, SMALL_TENSOR_SHARE, Policy, assign_homes,
                      spread_units)
from .hardware import HardwareProfile

# Peak-memory allowances for what the formulas below do not itemize (allocator slack,
# small temporaries): a relative margin on the working set and a fixed floor.
WORKING_MARGIN = 1.15
MEASURED_CONTEXT, MEASURED_PREFILL = 16, 128  # contexts of calibration.py's timings
FIXED_SLACK = 96 * 2**20


@dataclass(frozen=True)
class Workload:
    """What a batch job generates: prompt length (tokens, after padding to the longest in a
    block), new tokens per prompt, and number of prompts."""

    prompt_len: int
    gen_len: int
    num_prompts: int

    def __post_init__(self):
        for name in ("prompt_len", "gen_len", "num_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LayerCosts:
    """Measured seconds (calibration.py): one decoder layer's prefill per token, its decode
    step as fixed + per-row time (short context), and the head's fixed + per-row time."""

    prefill_token_s: float
    decode_fixed_s: float
    decode_row_s: float
    head_fixed_s: float
    head_row_s: float


@dataclass(frozen=True)
class TensorInfo:
    key: str             # checkpoint tensor name (tied parameters share it)
    role: str            # parameter name with the layer index replaced by '#'
    shape: tuple[int, ...]
    storage_itemsize: int
    linear: bool = True  # an nn.Linear weight: what compress_weight quantizes (if 2-D)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    @property
    def quantizable(self) -> bool:
        return self.linear and self.is_matrix


@dataclass(frozen=True)
class ModelLayout:
    """The tensors of each stage (embedding, decoder layers, head) and the attention shape."""

    stages: tuple[tuple[TensorInfo, ...], ...]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def num_layers(self) -> int:
        return len(self.stages) - 2

    @cached_property
    def _stages_using(self) -> dict[str, list[int]]:
        uses: dict[str, list[int]] = {}
        for j, stage in enumerate(self.stages):
            for t in stage:
                if j not in uses.setdefault(t.key, []):
                    uses[t.key].append(j)
        return uses

    def first_stage(self, key: str) -> int:
        """The first stage using checkpoint tensor ``key``."""
        return self._stages_using[key][0]

    def shared(self, key: str) -> bool:
        """Used by more than one stage (a tied embedding / LM head)."""
        return len(self._stages_using[key]) > 1

    @cached_property
    def _role_stages(self) -> dict[str, int]:
        return {role: len({j for j, st in enumerate(self.stages) for t in st if t.role == role})
                for role in {t.role for st in self.stages for t in st}}

    def is_table(self, t: TensorInfo) -> bool:
        """A vocabulary-sized matrix (token embedding, LM head)."""
        return is_table(t.shape, self.vocab)

    def held_once(self, t: TensorInfo) -> bool:
        """Kept in its own staging buffer by a CPU engine, so fetched (read, cast) once per
        run rather than once per step: a tensor no other stage shares a buffer with (the
        embedding, the head) or a tied one (weights.WeightStore._role)."""
        return self.shared(t.key) or self._role_stages[t.role] == 1

    @classmethod
    def from_checkpoint(cls, config, stage_params: list[dict[str, str]], locations,
                        linear_keys=None) -> "ModelLayout":
        """``stage_params``: per stage, HF parameter name -> checkpoint key; ``locations``:
        key -> object with ``shape`` and ``dtype`` (a safetensors header entry);
        ``linear_keys``: the keys compress_weight quantizes (default: every 2-D tensor)."""
        linear = None if linear_keys is None else set(linear_keys)
        stages = tuple(tuple(TensorInfo(key, re.sub(r"\.\d+\.", ".#.", name),
                                        tuple(locations[key].shape), locations[key].dtype.itemsize,
                                        linear is None or key in linear)
                             for name, key in params.items()) for params in stage_params)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        ffn = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
               or 4 * config.hidden_size)
        return cls(stages, config.hidden_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, ffn,
                   config.vocab_size)


@dataclass(frozen=True)
class Estimate:
    """Predicted throughput (generated tokens / s, prefill included) and peak memory."""

    policy: Policy
    throughput: float
    prefill_s: float
    decode_s: float
    total_s: float
    peak_bytes: dict[str, int]   # device / cpu / disk; on a CPU-only machine cpu holds all RAM
    memory: "MemoryTerms"        # what the peak is made of

    def fits(self, limits: dict[str, int]) -> bool:
        return all(self.peak_bytes[h] <= limits[h] for h in HOMES)


def compressed_bytes(numel_along: int, rows: int, config) -> int:
    """Bytes of a group-quantized tensor: codes plus fp16 scale and minimum per group."""
    groups = -(-numel_along // config.group_size)
    codes = groups * config.group_size * config.num_bits // 8
    return rows * (codes + groups * 4)


class Formulas:
    """Per-stage time terms. Placement fractions may be floats or pulp expressions; ``peak``
    combines terms (``max`` for floats, an epigraph variable in the LP)."""

    def __init__(self, layout: ModelLayout, hw: HardwareProfile, policy: Policy,
                 compute_itemsize: int, peak=max, measured: LayerCosts | None = None):
        self.layout, self.hw, self.policy, self.cb, self.peak = layout, hw, policy, compute_itemsize, peak
        self.measured, self.cpu_only = measured, hw.is_cpu_only
        self._memo: dict = {}  # float evaluations repeat across token steps

    def _cached(self, key, compute):
        if self.peak is not max:  # LP expressions: build afresh
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # -- weights -------------------------------------------------------------------------
    def weight_bytes(self, tensors, compressed: bool) -> tuple[float, float]:
        """(bytes moved per fetch from a cpu/disk home, bytes read from disk), whole stage."""
        moved = stored = 0.0
        for t in tensors:
            if compressed and t.quantizable:
                config = self.policy.comp_weight_config
                along = t.shape[config.group_dim]
                size = compressed_bytes(along, t.numel // along, config)
                moved, stored = moved + size, stored + size
            else:
                moved, stored = moved + t.numel * self.cb, stored + t.numel * t.storage_itemsize
        return moved, stored

    def weight_fetch(self, stage: int, share: dict) -> tuple:
        """(I/O seconds, CPU-work seconds) to bring a stage's weights to the device, with
        ``share[home]`` the fraction of its bytes homed there. On a CPU device a tensor in a
        staging buffer of its own (the embedding, the head) is read and converted once per
        run, not per step: left out."""
        hw, compressed = self.hw, self.policy.compress_weight
        tensors = self.fetched_each_step(stage)
        moved, stored = self.weight_bytes(tensors, compressed)
        io = share[DISK] * (stored / hw.disk_read_bw + self.disk_requests(stage) * hw.disk_request_s)
        if not self.cpu_only:
            io += (share[CPU] + share[DISK]) * moved / hw.cpu_to_device_bw
        # half weights streamed from disk (and, on a CPU device, those held in the cpu home in
        # the checkpoint's dtype) are cast to the compute dtype at each use; compressed ones
        # are dequantized at each use from every home
        quantized = [t for t in tensors if compressed and t.quantizable]
        plain = [t for t in tensors if not (compressed and t.quantizable)]
        cast_share = share[DISK] + (share[CPU] if self.cpu_only else 0)
        cast = sum(t.numel for t in quantized) * self.cb / hw.cast_bw
        cast += cast_share * sum(t.numel for t in plain) * self.cb / hw.cast_bw * self._needs_cast(plain)
        if self.cpu_only and stage == len(self.layout.stages) - 1:  # the LM head, cast per use
            table = sum(t.numel for t in self.layout.stages[stage] if self.casts_per_use(t))
            cast += (share[CPU] + share[DISK]) * self.policy.num_gpu_batches * table * self.cb / hw.cast_bw
        return io, cast

    def fetched_each_step(self, stage: int) -> list[TensorInfo]:
        """The stage's tensors fetched at every token step (on a CPU device, not those
        :meth:`ModelLayout.held_once`)."""
        return [t for t in self.layout.stages[stage] if not (self.cpu_only and self.layout.held_once(t))]

    def disk_requests(self, stage: int) -> int:
        """Read requests per step if all the stage's weights were on disk: one per tensor
        (three, codes, scales and minima, for a compressed one), biases and norms excepted
        (they never go to disk: policy.assign_homes)."""
        total = sum(t.numel for t in self.layout.stages[stage])
        compressed = self.policy.compress_weight
        return sum(3 if compressed and t.quantizable else 1 for t in self.fetched_each_step(stage)
                   if t.numel >= SMALL_TENSOR_SHARE * total)

    def casts_per_use(self, t: TensorInfo) -> bool:
        """A vocabulary table a CPU engine keeps in its (narrower) stored dtype outside the
        device home and casts a slice at a time where used (weights.StoredTable)."""
        quantized = self.policy.compress_weight and t.quantizable
        return self.cpu_only and not quantized and t.storage_itemsize != self.cb and self.layout.is_table(t)

    def _needs_cast(self, tensors) -> float:
        total = sum(t.numel for t in tensors) or 1
        return sum(t.numel for t in tensors if t.storage_itemsize != self.cb) / total

    # -- compute -------------------------------------------------------------------------
    def matmul_s(self, numel: int, rows: int) -> float:
        """(rows x in) @ (in x out) with ``numel`` weights: compute- or memory-bound."""
        hw = self.hw
        return max(2 * numel * rows / hw.device_flops, numel * self.cb / hw.device_mem_bw)

    def stage_compute(self, stage: int, batch: int, tokens: int) -> float:
        """One micro-batch of ``batch`` rows x ``tokens`` new tokens through a stage's matmuls
        (attention excluded)."""
        layout, last, m = self.layout, len(self.layout.stages) - 1, self.measured
        if stage == 0:
            return batch * tokens * layout.hidden * self.cb * 2 / self.hw.device_mem_bw
        if m is not None:
            if stage == last:
                return m.head_fixed_s + m.head_row_s * batch
            if tokens > 1:
                return m.prefill_token_s * batch * tokens
            return m.decode_fixed_s + m.decode_row_s * batch
        if stage == last:
            return sum(self.matmul_s(t.numel, batch) for t in layout.stages[stage] if t.is_matrix)
        return sum(self.matmul_s(t.numel, batch * tokens) for t in layout.stages[stage] if t.is_matrix)

    def attention(self, batch: int, tokens: int, context: int, cache: dict) -> tuple:
        """(compute seconds on the device, CPU seconds when delegated, I/O seconds) of one
        layer's attention for one micro-batch; ``cache[home]`` = fraction of it homed there."""
        lay, hw, p = self.layout, self.hw, self.policy
        kv_bytes = 2 * batch * context * lay.kv_heads * lay.head_dim * self.cb
        stored = kv_bytes
        if p.compress_cache:
            stored = 2 * compressed_bytes(lay.head_dim, batch * context * lay.kv_heads,
                                          p.comp_cache_config)
        flops = 4 * batch * tokens * context * lay.heads * lay.head_dim
        new_rows = 2 * batch * tokens * lay.kv_heads * lay.head_dim * self.cb
        if tokens > 1:  # prefill: causal, computed from the fresh keys on the device
            measured_part = min(1.0, MEASURED_PREFILL / context) if self.measured else 0.0
            return (flops / 2 / hw.device_flops * (1 - measured_part), 0.0,
                    cache[DISK] * new_rows / hw.disk_write_bw)
        read_values = 0.5 + 0.5 * p.attn_sparsity
        math_s = max(flops / hw.device_flops, kv_bytes * read_values / hw.device_mem_bw)
        if self.measured is not None:  # the measured decode step covers attention at short context
            math_s = math_s * max(0.0, 1 - MEASURED_CONTEXT / context)
        read_s = cache[DISK] * stored * read_values / hw.disk_read_bw
        io = cache[DISK] * (new_rows / hw.disk_write_bw + hw.disk_cache_op_s)
        if self.cpu_only:
            # on a CPU the disk cache's copies (page cache, attention's layout) take the cores
            # that compute, and its small synchronous reads and writes queue in one worker
            # ahead of the next layer's weights: measured, a decode step costs all of it
            # (OPT-350M, 64 rows: +2.6 s for 2.1 s of reads), none hidden behind compute
            return math_s + read_s + io, 0.0, 0.0
        io += read_s
        delegate = p.cpu_cache_compute
        cpu_math = max(flops / hw.cpu_flops, kv_bytes * read_values / hw.cpu_mem_bw)
        if delegate:
            on_cpu = cache[CPU] + cache[DISK]
            io += on_cpu * 2 * batch * lay.heads * lay.head_dim * self.cb / hw.cpu_to_device_bw
            return cache[DEVICE] * math_s, on_cpu * cpu_math, io
        io += (cache[CPU] + cache[DISK]) * stored * read_values / hw.cpu_to_device_bw
        return math_s, 0.0, io

    def activation_io(self, batch: int, tokens: int, act: dict) -> float:
        if self.cpu_only:
            return 0.0
        return act[CPU] * 2 * batch * tokens * self.layout.hidden * self.cb / self.hw.cpu_to_device_bw

    def stage_time(self, stage: int, tokens: int, context: int, w_share: dict,
                   cache: dict, act: dict):
        """Seconds of one token step through one stage for the whole block."""
        p = self.policy
        b, k = p.gpu_batch_size, p.num_gpu_batches
        fetch_io, cast = self._cached(("fetch", stage, tuple(w_share.items())),
                                      lambda: self.weight_fetch(stage, w_share))
        compute = self._cached(("compute", stage, tokens, tuple(act.items())),
                               lambda: k * self.stage_compute(stage, b, tokens)
                               + k * self.activation_io(b, tokens, act))
        cache_io = cpu_work = 0.0
        if 0 < stage < len(self.layout.stages) - 1:
            attn, cpu_work, cache_io = self.attention(b, tokens, context, cache)
            compute, cpu_work, cache_io = compute + k * attn, k * cpu_work, k * cache_io
        if self.cpu_only:
            compute = compute + cast
            return self.peak([compute, fetch_io, cache_io]) if p.overlap else compute + fetch_io + cache_io
        terms = [compute, fetch_io + cast, cache_io, cpu_work]
        return self.peak(terms) if p.overlap else sum(terms)


# -- a concrete policy ------------------------------------------------------------------
def realized_weight_shares(layout: ModelLayout, policy: Policy) -> list[dict[str, float]]:
    """Per stage, the fraction of its weight bytes in each home under FlexGen's midpoint rule."""
    out = []
    for tensors in layout.stages:
        sizes = [t.numel for t in tensors]
        homes = assign_homes(sizes, policy.shares("w"))
        total = sum(sizes) or 1
        out.append({h: sum(s for s, hh in zip(sizes, homes) if hh == h) / total for h in HOMES})
    return out


def estimate(policy: Policy, layout: ModelLayout, workload: Workload, hw: HardwareProfile,
             compute_itemsize: int, baseline_bytes: int, measured: LayerCosts | None = None) -> Estimate:
    """Throughput and peak memory of ``policy`` on ``workload`` (whole job, all blocks)."""
    f = Formulas(layout, hw, policy, compute_itemsize, measured=measured)
    w_shares = realized_weight_shares(layout, policy)
    k, layers = policy.num_gpu_batches, layout.num_layers
    cache_homes = spread_units(layers * k, policy.shares("cache"))
    cache_shares = [{h: sum(cache_homes[j * k + m] == h for m in range(k)) / k for h in HOMES}
                    for j in range(layers)]
    act = policy.shares("act")
    prefill = decode = 0.0
    full, rest = divmod(workload.num_prompts, policy.block_size)
    for count, rows in ((full, policy.block_size), (1 if rest else 0, rest)):
        if not count:
            continue
        block_policy = _shrunk(policy, rows)
        fb = Formulas(layout, hw, block_policy, compute_itemsize, measured=measured) \
            if rows != policy.block_size else f
        for step in range(workload.gen_len):
            tokens = workload.prompt_len if step == 0 else 1
            context = workload.prompt_len + step
            t = sum(fb.stage_time(j, tokens, context, w_shares[j],
                                  cache_shares[j - 1] if 0 < j <= layers else {}, act)
                    for j in range(len(layout.stages)))
            if step == 0:
                prefill += count * t
            else:
                decode += count * t
    total = prefill + decode
    peak, terms = peak_memory(policy, layout, workload, hw, compute_itemsize, baseline_bytes,
                              cache_homes)
    return Estimate(policy, workload.num_prompts * workload.gen_len / total, prefill, decode,
                    total, peak, terms)


def _shrunk(policy: Policy, rows: int) -> Policy:
    """The policy as the engine runs a last, partial block of ``rows`` sequences."""
    from dataclasses import replace
    b = min(policy.gpu_batch_size, rows)
    return replace(policy, gpu_batch_size=b, num_gpu_batches=-(-rows // b))


# -- memory ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryTerms:
    """Bytes by what holds them. ``*_ram`` terms live in host RAM, ``*_device`` ones on the
    accelerator; on a CPU-only machine both are host RAM."""

    baseline: int                 # the process before loading (interpreter, torch, ...)
    weights: dict[str, int]       # resident weights per home (device / cpu)
    weight_stream_ram: int        # staging buffers and page cache in flight for disk weights
    weight_stream_device: int     # fetched weights of this stage and the next (accelerator)
    kv_cache: dict[str, int]      # per home, disk included
    activations: dict[str, int]   # per home
    working: int                  # one layer's temporaries, logits, cache reads in flight
    disk_fixed: int               # the compressed checkpoint copy

    def peak(self, cpu_only: bool) -> dict[str, int]:
        work = int(WORKING_MARGIN * self.working) + FIXED_SLACK
        stream = int(WORKING_MARGIN * self.weight_stream_ram)
        if cpu_only:
            ram = (self.baseline + self.weights[DEVICE] + self.weights[CPU] + stream + work
                   + self.kv_cache[DEVICE] + self.kv_cache[CPU]
                   + self.activations[DEVICE] + self.activations[CPU])
            return {DEVICE: 0, CPU: ram, DISK: self.kv_cache[DISK] + self.disk_fixed}
        device = (self.weights[DEVICE] + self.weight_stream_device + self.kv_cache[DEVICE]
                  + self.activations[DEVICE] + work)
        ram = (self.baseline + self.weights[CPU] + stream + self.kv_cache[CPU]
               + self.activations[CPU] + FIXED_SLACK)
        return {DEVICE: device, CPU: ram, DISK: self.kv_cache[DISK] + self.disk_fixed}


def peak_memory(policy: Policy, layout: ModelLayout, workload: Workload, hw: HardwareProfile,
                cb: int, baseline: int, cache_homes=None) -> tuple[dict[str, int], MemoryTerms]:
    terms = memory_terms(policy, layout, workload, hw, cb, baseline, cache_homes)
    return terms.peak(hw.is_cpu_only), terms


def memory_terms(policy: Policy, layout: ModelLayout, workload: Workload, hw: HardwareProfile,
                 cb: int, baseline: int, cache_homes=None) -> MemoryTerms:
    """What the engine holds at its peak for ``policy`` (the homes it really assigns)."""
    p, lay = policy, layout
    k, b = p.num_gpu_batches, p.gpu_batch_size
    cache_homes = cache_homes or spread_units(lay.num_layers * k, p.shares("cache"))
    f = Formulas(layout, hw, policy, cb)

    resident = {h: 0 for h in HOMES}
    seen, staging, largest_disk = set(), {}, 0
    for j, tensors in enumerate(lay.stages):
        homes = assign_homes([t.numel for t in tensors], p.shares("w"))
        for t, home in zip(tensors, homes):
            quantized = p.compress_weight and t.quantizable
            if home == DISK:
                largest_disk = max(largest_disk, f.weight_bytes([t], p.compress_weight)[1])
            if hw.is_cpu_only:
                # the CPU engine's staging buffers: raw reads per (stage parity, layer-local
                # role), compute-dtype copies (casts, dequantized weights) per role; a shared
                # tensor has one of each
                role = (t.key,) if lay.shared(t.key) else (t.role,)
                if home == DISK and not quantized:
                    slot = () if lay.shared(t.key) else (j % 2,)
                    staging[("raw", *slot, *role)] = direct_span(t.numel * t.storage_itemsize)
                if home != DEVICE and f.casts_per_use(t):
                    staging[("table chunk",)] = math.prod(table_chunk_shape(t.shape, cb)) * cb
                elif quantized or (home != DEVICE and t.storage_itemsize != cb):
                    staging[("compute", *role)] = t.numel * cb
            if home == DISK or (t.key, home) in seen:
                continue
            seen.add((t.key, home))
            keeps_stored = hw.is_cpu_only and home == CPU and not quantized
            resident[home] += (t.numel * t.storage_itemsize if keeps_stored
                               else int(f.weight_bytes([t], p.compress_weight)[0]))
    stage_bytes = [int(f.weight_bytes(st, False)[0]) for st in lay.stages]
    # + the largest disk tensor once more: the page cache of a read in flight, where O_DIRECT
    # is refused. Kept with O_DIRECT too: while it was dropped (2026-12-03), two of three
    # opt-1.3b auto runs planned at 2.85 GiB were killed at a 3.0 GiB cap
    stream_ram = sum(staging.values()) + largest_disk
    if not hw.is_cpu_only:
        stream_ram = 2 * largest_disk

    capacity = workload.prompt_len + workload.gen_len
    per_unit = 2 * b * lay.kv_heads * capacity * lay.head_dim * cb
    if p.compress_cache:
        per_unit = 2 * compressed_bytes(lay.head_dim, b * lay.kv_heads * capacity, p.comp_cache_config)
    cache = {h: per_unit * cache_homes.count(h) for h in HOMES}

    s = workload.prompt_len
    act_units = spread_units(k, p.shares("act"))
    act = {h: b * s * lay.hidden * cb * act_units.count(h) for h in HOMES}
    # one layer's prefill temporaries for one micro-batch (q, k, v, attention output,
    # residuals, MLP intermediates), the head's logits and sampling copies, cache reads in
    # flight, and (off a CPU device) compressed weights dequantized into fresh tensors on the
    # I/O worker (this stage and the next)
    gated = 3 if any("gate" in t.role for st in lay.stages[1:-1] for t in st) else 2
    layer_tmp = b * s * (6 * lay.hidden + gated * lay.intermediate) * cb
    head_tmp = 4 * b * lay.vocab * 4
    kv_tmp = 3 * 2 * b * capacity * lay.kv_heads * lay.head_dim * cb if DISK in cache_homes else 0
    dequantized = 2 * max(stage_bytes) if p.compress_weight and not hw.is_cpu_only else 0
    working = max(layer_tmp, head_tmp) + kv_tmp + dequantized
    disk_fixed = int(sum(f.weight_bytes(st, True)[1] for st in lay.stages)) if p.compress_weight else 0
    return MemoryTerms(baseline, resident, stream_ram,
                       0 if hw.is_cpu_only else 2 * max(stage_bytes), cache, act, working, disk_fixed)
