"""policy="auto": for each block shape (``gpu_batch_size`` x ``num_gpu_batches``) a linear
program (pulp) picks the placement fractions of weights, KV cache and activations that
minimize the block's time under the memory limits; each LP answer is rounded to a
``Policy``, checked with the exact cost model (real tensor homes, every token step) and
pushed off the device / out of RAM until it fits. The fastest fitting policy wins."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import pulp

from ..policy import CPU, DEVICE, DISK, HOMES, Policy
from .cost_model import (WORKING_MARGIN, Estimate, Formulas, LayerCosts, ModelLayout, Workload,
                         estimate, memory_terms, peak_memory)
from .hardware import HardwareProfile
from .limits import with_headroom

logger = logging.getLogger(__name__)

MAX_GPU_BATCH = 1024
MAX_NUM_GPU_BATCHES = 32


class PlacementError(ValueError):
    """No policy fits the memory limits; the message says the minimum needed."""


@dataclass(frozen=True)
class Plan:
    best: Estimate
    runners_up: tuple[Estimate, ...]
    limits: dict[str, int]
    workload: Workload

    @property
    def policy(self) -> Policy:
        return self.best.policy


def plan(layout: ModelLayout, workload: Workload, hw: HardwareProfile, limits: dict[str, int],
         compute_itemsize: int, baseline_bytes: int, base: Policy | None = None,
         measured: LayerCosts | None = None, runners_up: int = 4) -> Plan:
    """The fastest policy that fits ``limits``. ``base`` carries the settings the planner
    keeps as given (overlap, compression, delegation, sparsity); it chooses the rest.
    ``measured``: timed layer costs (calibration.py); without them, FLOP and byte counts."""
    base = base or Policy(overlap=True)
    args = (layout, workload, hw, compute_itemsize, baseline_bytes)
    check_minimum(base, limits, *args)
    found = search(base, with_headroom(limits), args, workload, measured)
    if not found:
        logger.warning("no policy fits below the cpu limit with page-cache headroom; planning up to "
                       "the limit itself, where the kernel's reclaim may slow the run: raise "
                       "max_memory['cpu'] for full speed")
        found = search(base, limits, args, workload, measured)
    if not found:
        raise PlacementError(
            "no block shape fits the memory limits even though the smallest one should; "
            f"limits {format_limits(limits)}; raise max_memory['cpu']")
    top = max(e.throughput for e in found.values())
    # within 2% of the fastest, prefer the smaller footprint (the model is not that precise)
    ranked = sorted(found.values(), key=lambda e: (e.throughput < 0.98 * top, sum(e.peak_bytes.values()),
                                                    -e.throughput))
    logger.info("policy=auto chose %s: %.2f tok/s predicted, peak %s", describe(ranked[0].policy),
                ranked[0].throughput, format_limits(ranked[0].peak_bytes))
    return Plan(ranked[0], tuple(ranked[1:1 + runners_up]), limits, workload)


def search(base: Policy, limits, args, workload: Workload, measured) -> dict[tuple, Estimate]:
    """The best fitting policy of every block shape, by placement."""
    found: dict[tuple, Estimate] = {}
    for b, k in block_shapes(workload.num_prompts):
        shaped = replace(base, gpu_batch_size=b, num_gpu_batches=k)
        fractions = solve_lp(shaped, limits, *args, measured=measured)
        if fractions is None:
            continue
        fitted = fit(to_policy(shaped, fractions), limits, *args, measured=measured)
        if fitted is not None:
            fitted = climb(fitted, limits, *args, measured=measured)
        if fitted is not None:
            found.setdefault(_placement(fitted.policy), fitted)
    return found


def block_shapes(num_prompts: int):
    """Candidate (gpu_batch_size, num_gpu_batches): powers of two, and the whole job as one
    micro-batch when it is small; blocks no larger than the job."""
    sizes = sorted({2**i for i in range(11) if 2**i <= min(num_prompts, MAX_GPU_BATCH)}
                   | ({num_prompts} if num_prompts <= MAX_GPU_BATCH else set()))
    for b in sizes:
        for k in (2**i for i in range(6)):
            if k > MAX_NUM_GPU_BATCHES or (k > 1 and b * k > num_prompts + b - 1):
                break
            yield b, k


def check_minimum(base: Policy, limits, layout, workload, hw, cb, baseline) -> None:
    """Refuse, before any weight is loaded, limits below the smallest working set: one
    sequence at a time, weights and KV cache on disk."""
    smallest = replace(base, gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=0,
                       w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0,
                       act_gpu_percent=0 if not hw.is_cpu_only else 100,
                       act_cpu_percent=100 if not hw.is_cpu_only else 0)
    peak, _ = peak_memory(smallest, layout, workload, hw, cb, baseline)
    short = [h for h in HOMES if peak[h] > limits[h]]
    if short:
        need = ", ".join(f"{h} {_gib(peak[h])} (given {_gib(limits[h])})" for h in short)
        raise PlacementError(
            f"the memory limits are below the minimum working set of this model and workload "
            f"(prompt {workload.prompt_len}, {workload.gen_len} new tokens): it needs at least {need}. "
            "Raise max_memory, shorten the prompts or generation, or enable compress_cache.")


def solve_lp(policy: Policy, limits, layout: ModelLayout, workload: Workload,
             hw: HardwareProfile, cb: int, baseline: int, measured=None) -> dict | None:
    """Placement fractions minimizing the block time of ``policy``'s block shape under the
    limits (linearized memory), or None when even all-on-disk does not fit."""
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    frac = {kind: {h: _variable(prob, f"{kind}_{h}", 1) for h in HOMES} for kind in ("w", "c", "a")}
    for kind, homes in frac.items():
        prob += pulp.lpSum(homes.values()) == 1
    frac["a"][DISK].upBound = 0
    if hw.is_cpu_only:  # the device is host RAM: cache and activations gain nothing in the
        for kind in ("c", "a"):  # cpu home; weights there stay in the checkpoint's dtype
            frac[kind][CPU].upBound = 0
    epigraphs = []

    def peak(terms):
        t = _variable(prob, f"t{len(epigraphs)}", None)
        epigraphs.append(t)
        for term in terms:
            prob.addConstraint(t >= term)
        return t

    f = Formulas(layout, hw, policy, cb, peak=peak, measured=measured)
    n, s, last = workload.gen_len, workload.prompt_len, len(layout.stages) - 1
    mean_context = s + n // 2

    def step_time(tokens, context):
        edge = [f.stage_time(j, tokens, context, frac["w"], frac["c"], frac["a"]) for j in (0, last)]
        return pulp.lpSum(edge) + layout.num_layers * f.stage_time(1, tokens, context, frac["w"],
                                                                   frac["c"], frac["a"])
    prob += step_time(s, s) + (n - 1) * step_time(1, mean_context)

    # memory, linear in the fractions: each class's bytes with all of it in one home
    add_memory_constraints(prob, frac, policy, limits, layout, workload, hw, cb, baseline)
    with warnings.catch_warnings():  # pulp 3.x announces its 4.0 API changes
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return {kind: {h: max(0.0, v.value() or 0.0) for h, v in homes.items()} for kind, homes in frac.items()}


def _variable(prob, name: str, upper):
    if hasattr(prob, "add_variable"):  # pulp >= 3.3
        return prob.add_variable(name, 0, upper)
    return pulp.LpVariable(name, 0, upper)


def add_memory_constraints(prob, frac, policy, limits, layout, workload, hw, cb, baseline) -> None:
    def terms(**homes):
        p = policy
        for kind, home in homes.items():
            p = _all_in(p, kind, home, hw)
        return memory_terms(p, layout, workload, hw, cb, baseline)

    dev = CPU if hw.is_cpu_only else DEVICE  # where "device" bytes are charged
    on_disk = terms(w=DISK, c=DISK)           # what stays whatever the placement
    fixed = on_disk.peak(hw.is_cpu_only)
    fixed[CPU] -= int(WORKING_MARGIN * on_disk.weight_stream_ram)
    for home in (DEVICE, CPU):
        fixed[CPU if home == CPU else dev] -= on_disk.activations[home]
    fixed[DISK] -= on_disk.kv_cache[DISK]
    load = {h: pulp.LpAffineExpression() + fixed[h] for h in HOMES}
    for home in (DEVICE, CPU):
        charged = dev if home == DEVICE else CPU
        load[charged] += terms(w=home).weights[home] * frac["w"][home]
        load[charged] += terms(c=home).kv_cache[home] * frac["c"][home]
        load[charged] += terms(a=home).activations[home] * frac["a"][home]
    load[CPU] += int(WORKING_MARGIN * on_disk.weight_stream_ram) * frac["w"][DISK]
    load[CPU] += int(WORKING_MARGIN * terms(w=CPU).weight_stream_ram) * frac["w"][CPU]
    load[DISK] += on_disk.kv_cache[DISK] * frac["c"][DISK]
    for home in HOMES:
        if home == DEVICE and hw.is_cpu_only:
            continue
        prob.addConstraint(load[home] <= limits[home])


def _all_in(policy: Policy, kind: str, home: str, hw: HardwareProfile) -> Policy:
    name = {"w": "w", "c": "cache", "a": "act"}[kind]
    gpu, cpu = {DEVICE: (100, 0), CPU: (0, 100), DISK: (0, 0)}[home]
    return replace(policy, **{f"{name}_gpu_percent": gpu, f"{name}_cpu_percent": cpu})


def to_policy(policy: Policy, fractions: dict) -> Policy:
    """Round LP fractions to whole percents, never rounding up the device or cpu share."""
    def pct(kind, home):
        return int(fractions[kind][home] * 100 + 1e-6)
    act_gpu = pct("a", DEVICE)
    return replace(policy, w_gpu_percent=pct("w", DEVICE), w_cpu_percent=pct("w", CPU),
                   cache_gpu_percent=pct("c", DEVICE), cache_cpu_percent=pct("c", CPU),
                   act_gpu_percent=act_gpu, act_cpu_percent=100 - act_gpu)


def fit(policy: Policy, limits, layout, workload, hw, cb, baseline, step: int = 5,
        measured=None) -> Estimate | None:
    """The exact estimate of ``policy``, moving weights then cache a step down the
    hierarchy (device -> cpu -> disk) until the real placement fits."""
    for _ in range(200 // step * 3):
        est = estimate(policy, layout, workload, hw, cb, baseline, measured)
        if est.fits(limits):
            return est
        policy = _step_down(policy, est, limits, hw, step)
        if policy is None:
            return None
    return None


def climb(est: Estimate, limits, layout, workload, hw, cb, baseline, measured=None,
          step: int = 5, rounds: int = 40) -> Estimate:
    """Local search from the LP's answer: the LP's memory is linearized conservatively, so
    moving a step of weights or cache up the hierarchy (disk -> cpu -> device) may still fit
    and run faster; keep the best such move until none helps."""
    for _ in range(rounds):
        better = None
        moves = (m for size in (step, 2 * step, 5 * step, 100) for m in _step_up_moves(est.policy, hw, size))
        for policy in moves:  # larger steps cross plateaus (a home holds whole tensors / units)
            cand = estimate(policy, layout, workload, hw, cb, baseline, measured)
            if cand.fits(limits) and cand.throughput > (better or est).throughput * 1.001:
                better = cand
        if better is None:
            return est
        est = better
    return est


def _step_up_moves(p: Policy, hw: HardwareProfile, step: int):
    for name in ("w", "cache"):
        gpu, cpu = getattr(p, f"{name}_gpu_percent"), getattr(p, f"{name}_cpu_percent")
        disk = 100 - gpu - cpu
        uses_cpu = not hw.is_cpu_only or name == "w"
        if disk > 0:
            moved = min(step, disk)
            yield replace(p, **{f"{name}_gpu_percent": gpu + moved})
            if uses_cpu:
                yield replace(p, **{f"{name}_cpu_percent": cpu + moved})
        if cpu > 0:
            yield replace(p, **{f"{name}_gpu_percent": gpu + min(step, cpu),
                                f"{name}_cpu_percent": cpu - min(step, cpu)})


def _step_down(p: Policy, est: Estimate, limits, hw, step) -> Policy | None:
    over_device = est.peak_bytes[DEVICE] > limits[DEVICE]
    over_ram = est.peak_bytes[CPU] > limits[CPU]
    for name in ("w", "cache"):
        gpu, cpu = getattr(p, f"{name}_gpu_percent"), getattr(p, f"{name}_cpu_percent")
        if over_device and gpu > 0:
            moved = min(step, gpu)
            to_cpu = moved if not hw.is_cpu_only else 0
            return replace(p, **{f"{name}_gpu_percent": gpu - moved, f"{name}_cpu_percent": cpu + to_cpu})
        if over_ram and hw.is_cpu_only and gpu > 0:  # weights: device (fp32) -> cpu (stored dtype)
            moved = min(step, gpu)
            to_cpu = moved if name == "w" else 0
            return replace(p, **{f"{name}_gpu_percent": gpu - moved, f"{name}_cpu_percent": cpu + to_cpu})
        if over_ram and cpu > 0:
            return replace(p, **{f"{name}_cpu_percent": max(0, cpu - step)})
    return None


def _placement(p: Policy) -> tuple:
    return (p.gpu_batch_size, p.num_gpu_batches, p.w_gpu_percent, p.w_cpu_percent,
            p.cache_gpu_percent, p.cache_cpu_percent, p.act_gpu_percent)


def describe(p: Policy) -> str:
    return (f"block {p.gpu_batch_size}x{p.num_gpu_batches}, weights {p.w_gpu_percent:g}/"
            f"{p.w_cpu_percent:g}/{100 - p.w_gpu_percent - p.w_cpu_percent:g}, cache "
            f"{p.cache_gpu_percent:g}/{p.cache_cpu_percent:g}/"
            f"{100 - p.cache_gpu_percent - p.cache_cpu_percent:g}, act {p.act_gpu_percent:g}/"
            f"{p.act_cpu_percent:g} (device/cpu/disk %)")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_limits(values: dict[str, int]) -> str:
    return ", ".join(f"{h} {_gib(values[h])}" for h in HOMES if values.get(h))
