"""policy="auto": limits parsing, the memory model against what the engine really allocates,
the LP + rounding against a brute-force search of the same cost model, and the refusals."""
from __future__ import annotations

import itertools
import json
import logging
import threading
from dataclasses import replace

import pytest
import torch
from transformers import OPTConfig

from hf_flexgen import FlexGenForCausalLM, Policy
from hf_flexgen.memory.checkpoint import CheckpointIndex
from hf_flexgen.memory.kv_cache import FlexKVCache
from hf_flexgen.modeling import config_layout, model_layout
from hf_flexgen.placement import (HardwareProfile, PlacementError, Workload, estimate,
                                  load_or_measure, parse_max_memory, plan)
from hf_flexgen.placement import hardware as hardware_module
from hf_flexgen.placement.cost_model import LayerCosts, memory_terms, peak_memory
from hf_flexgen.placement.limits import with_headroom
from hf_flexgen.placement.profile_store import write_json
from hf_flexgen.policy import CPU, DEVICE, DISK, assign_homes

from tiny_models import left_padded_prompts

CPU_DEVICE = torch.device("cpu")
GiB, MiB = 2**30, 2**20

# a fixed CPU-only machine (1 GB/s disk, 100 GFLOP/s) so the tests do not depend on timing
HW = HardwareProfile(device="cpu", disk_read_bw=1e9, disk_request_s=2e-4, disk_write_bw=5e8, cpu_to_device_bw=float("inf"),
                     device_to_cpu_bw=float("inf"), device_flops=1e11, device_mem_bw=1e10,
                     cpu_flops=1e11, cpu_mem_bw=1e10, cast_bw=4e9, disk_cache_op_s=2e-3,
                     torch_threads=2)
GPU_HW = replace(HW, device="cuda", cpu_to_device_bw=1.2e10, device_to_cpu_bw=1.2e10,
                 device_flops=6e13, device_mem_bw=1e12)
MEASURED = LayerCosts(prefill_token_s=2e-5, decode_fixed_s=1e-3, decode_row_s=2e-5,
                      head_fixed_s=5e-3, head_row_s=2e-5)


def layout_of(directory):
    from transformers import AutoConfig
    index = CheckpointIndex.from_directory(directory)
    try:
        return model_layout(AutoConfig.from_pretrained(directory), index, CPU_DEVICE)
    finally:
        index.close()


# -- limits ----------------------------------------------------------------------------------
def test_parse_max_memory_hf_convention(tmp_path):
    limits = parse_max_memory({"cpu": "2GiB", "disk": "10GB"}, CPU_DEVICE, tmp_path)
    assert limits == {CPU: 2 * GiB, DISK: 10 * 10**9, DEVICE: 0}
    defaults = parse_max_memory(None, CPU_DEVICE, tmp_path)
    assert defaults[CPU] > 0 and defaults[DISK] > 0
    with pytest.raises(ValueError, match="compute device is cpu"):
        parse_max_memory({"cuda:0": "16GiB"}, CPU_DEVICE, tmp_path)
    with pytest.raises(ValueError, match="not understood"):
        parse_max_memory({"ram": "16GiB"}, CPU_DEVICE, tmp_path)
    with pytest.raises(ValueError, match="not a size"):
        parse_max_memory({"cpu": "lots"}, CPU_DEVICE, tmp_path)


# -- homes ----------------------------------------------------------------------------------
def test_homes_follow_the_midpoint_rule_but_keep_small_tensors_off_disk():
    """FlexGen's rule by cumulative size; biases and norms (under 1/256 of their stage) that it
    sends to disk stay in the cpu home instead (one read request each is not worth it)."""
    layer = [4000, 16, 4000, 16, 8000]  # two matrices with biases, and one more matrix
    assert assign_homes(layer, {DEVICE: 0, CPU: 0, DISK: 1}) == [DISK, CPU, DISK, CPU, DISK]
    assert assign_homes(layer, {DEVICE: 0.25, CPU: 0.25, DISK: 0.5}) == [DEVICE, CPU, CPU, CPU, DISK]
    assert assign_homes(layer, {DEVICE: 0.5, CPU: 0.5, DISK: 0}) == [DEVICE, DEVICE, DEVICE, CPU, CPU]
    assert assign_homes([100], {DEVICE: 0, CPU: 0, DISK: 1}) == [DISK]  # alone, not small


# -- hardware profile ------------------------------------------------------------------------
def test_profile_measured_once_cached_refreshable_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware_module, "measure", lambda *a: calls.append(1) or HW)
    first = load_or_measure(CPU_DEVICE, torch.float32)
    again = load_or_measure(CPU_DEVICE, torch.float32)
    assert first == again == HW and len(calls) == 1
    saved = json.loads(hardware_module.profile_path(CPU_DEVICE).read_text())
    assert saved["disk_read_bw"] == 1e9 and saved["cpu_to_device_bw"] is None  # inf as null
    assert load_or_measure(CPU_DEVICE, torch.float32, disk_read_bw=5e8).disk_read_bw == 5e8
    load_or_measure(CPU_DEVICE, torch.float32, refresh=True)
    assert len(calls) == 2


def test_disk_read_rate_learned_from_the_engines_reads(tiny_checkpoint, tmp_path, monkeypatch):
    """A run that streams weights from disk records the rate its reads reached (bytes over
    the seconds spent reading, the profile's time per request taken out, as the engine's
    stats say); the profile's rate becomes the median of the last few; small runs,
    overrides and refreshes behave."""
    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware_module, "measure", lambda *a: HW)
    observe = hardware_module.observe_disk_reads
    observe(CPU_DEVICE, 2 * GiB, 1.0, 0)  # no profile yet: nothing to learn into
    assert load_or_measure(CPU_DEVICE, torch.float32).disk_read_bw == HW.disk_read_bw
    observe(CPU_DEVICE, hardware_module.MIN_OBSERVED_BYTES - 1, 1e-3, 1)  # too small to say
    observe(CPU_DEVICE, 2 * GiB, 1.0, 4000)  # 4000 requests of 0.2 ms: all request time
    assert load_or_measure(CPU_DEVICE, torch.float32).disk_read_bw == HW.disk_read_bw
    for gb_per_s in (3, 1, 2, 5, 4, 6):  # six observations: the first falls out of the five kept
        observe(CPU_DEVICE, gb_per_s * GiB, 1.1, 500)  # 0.1 s of it in requests
    assert load_or_measure(CPU_DEVICE, torch.float32).disk_read_bw == pytest.approx(4 * GiB)
    assert load_or_measure(CPU_DEVICE, torch.float32, disk_read_bw=5e8).disk_read_bw == 5e8
    assert load_or_measure(CPU_DEVICE, torch.float32, refresh=True).disk_read_bw == HW.disk_read_bw

    # the engine's own figures feed it: every weight on disk
    monkeypatch.setattr(hardware_module, "MIN_OBSERVED_BYTES", 1)
    _, directory = tiny_checkpoint("llama-gqa")
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(
        gpu_batch_size=2, w_gpu_percent=0, w_cpu_percent=0), offload_dir=tmp_path / "offload")
    # reads of a tiny model's tensors take microseconds: no request time to take out here
    write_json(hardware_module.profile_path(CPU_DEVICE), replace(HW, disk_request_s=0.0).to_json())
    ids = torch.randint(4, 100, (2, 5))
    reads_before = model.store.reads
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3)
    model.close()
    stats = model.last_stats
    assert stats["weight_bytes_read"] > 0 and stats["weight_read_s"] > 0
    assert stats["weight_reads"] == model.store.reads - reads_before > 0
    saved = json.loads(hardware_module.profile_path(CPU_DEVICE).read_text())
    assert saved[hardware_module.OBSERVED_KEY] == [stats["weight_bytes_read"] / stats["weight_read_s"]]


def test_disk_rate_sampled_from_the_checkpoint_until_runs_measure_it(tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware_module, "measure", lambda *a: replace(HW, disk_request_s=0.0))
    monkeypatch.setattr(hardware_module, "SAMPLE_TENSOR_MIN", 1)
    monkeypatch.setattr(hardware_module, "SAMPLE_BYTES", 4096)
    _, directory = tiny_checkpoint("llama-gqa")
    index = CheckpointIndex.from_directory(directory)
    hardware_module.sample_checkpoint_reads(index, CPU_DEVICE)  # no profile yet: nothing
    assert index.reads == 0
    load_or_measure(CPU_DEVICE, torch.float32)
    threads = []
    read_into = index.read_into
    monkeypatch.setattr(index, "read_into", lambda *a: threads.append(threading.current_thread())
                        or read_into(*a))
    hardware_module.sample_checkpoint_reads(index, CPU_DEVICE)
    assert index.bytes_read >= 4096 and index.reads > 0
    # read as the engine reads: off the thread that computes
    assert threads and threading.main_thread() not in threads
    rate = index.bytes_read / index.read_s
    assert load_or_measure(CPU_DEVICE, torch.float32).disk_read_bw == rate
    hardware_module.sample_checkpoint_reads(index, CPU_DEVICE)  # a rate is known: no more
    assert index.bytes_read / index.read_s == rate
    index.close()
    # the first run's own rate replaces the sample (not a median with it)
    hardware_module.observe_disk_reads(CPU_DEVICE, 2 * GiB, 2.0, 0)
    assert load_or_measure(CPU_DEVICE, torch.float32).disk_read_bw == GiB


def test_real_measurement_is_sane(tmp_path):
    hw = hardware_module.measure(CPU_DEVICE, torch.float32, tmp_path)
    assert hw.is_cpu_only and hw.cpu_to_device_bw == float("inf")
    for name in ("disk_read_bw", "disk_write_bw", "device_flops", "device_mem_bw", "cast_bw"):
        assert 1e6 < getattr(hw, name) < 1e15, name
    assert 0 < hw.disk_cache_op_s < 10


# -- the memory model against the engine ---------------------------------------------------
POLICIES = [
    Policy(gpu_batch_size=4, num_gpu_batches=2),
    Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=40, cache_gpu_percent=50),
    Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=30, w_cpu_percent=40),
    Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=0, cache_gpu_percent=0),
    Policy(gpu_batch_size=4, num_gpu_batches=1, w_gpu_percent=30, compress_weight=True),
]


@pytest.fixture(scope="module")
def half_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoints stored in fp16 (computed in fp32): streamed weights are cast."""
    made = {}

    def make(family):
        if family not in made:
            reference, _ = tiny_checkpoint(family)
            directory = tmp_path_factory.mktemp(f"{family}-fp16")
            copy = type(reference)(reference.config)
            copy.load_state_dict(reference.state_dict())
            copy.to(torch.float16).save_pretrained(directory)
            made[family] = directory
        return made[family]
    return make


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
@pytest.mark.parametrize("family", ["opt-pre-ln", "llama-tied", "llama-gqa"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"b{p.gpu_batch_size}x{p.num_gpu_batches}"
                         f"-w{p.w_gpu_percent}-c{p.cache_gpu_percent}{'-q' if p.compress_weight else ''}")
def test_memory_terms_match_engine_allocations(tiny_checkpoint, half_checkpoint, tmp_path, monkeypatch,
                                               family, policy, storage):
    """Resident weights, disk staging buffers and KV cache per home, as predicted, equal what
    the engine holds after generating the same workload."""
    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path / "cache"))
    directory = tiny_checkpoint(family)[1] if storage == "fp32" else half_checkpoint(family)
    layout = layout_of(directory)
    ids = torch.randint(4, 100, (policy.block_size, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)  # unpadded: every micro-batch's cache holds the full width
    workload = Workload(prompt_len=9, gen_len=5, num_prompts=policy.block_size)
    terms = memory_terms(policy, layout, workload, HW, 4, baseline=0)
    model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path)
    try:
        stored = []  # each micro-batch's cache bytes per home, read as the block ends
        real_close = FlexKVCache.close
        monkeypatch.setattr(FlexKVCache, "close",
                            lambda self: stored.append(self.nbytes_by_home()) or real_close(self))
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                       do_sample=False)
        kv_by_home = {home: sum(s[home] for s in stored) for home in (DEVICE, CPU, DISK)}
        held = model.store.bytes_by_home()
        assert terms.weights[DEVICE] + terms.weights[CPU] == held[DEVICE] + held[CPU]
        staged = model.store.staging_bytes()
        store = model.store
        largest_disk = max((store.compressed.nbytes(s.key) if store._is_compressed(s)
                            else s.numel * store.index.locations[s.key].dtype.itemsize
                            for s in store.all_specs() if s.home == DISK), default=0)
        assert terms.weight_stream_ram - largest_disk == staged
        assert kv_by_home == {h: terms.kv_cache[h] for h in (DEVICE, CPU, DISK)}
    finally:
        model.close()


# -- the solver --------------------------------------------------------------------------------
def brute_force(layout, workload, hw, limits, base):
    """Best exact estimate over a grid of hand-set percents and block shapes."""
    best = None
    shapes = [(b, k) for b in (1, 4, 16, 32, 64) for k in (1, 2, 4)
              if b * k <= workload.num_prompts + b - 1]
    weights = [(g, c) for g in range(0, 101, 20) for c in range(0, 101 - g, 20)]
    caches = [(g, 0) for g in range(0, 101, 10)] if hw.is_cpu_only else weights
    for (b, k), (wg, wc), (cg, cc) in itertools.product(shapes, weights, caches):
        policy = replace(base, gpu_batch_size=b, num_gpu_batches=k, w_gpu_percent=wg, w_cpu_percent=wc,
                         cache_gpu_percent=cg, cache_cpu_percent=cc,
                         act_gpu_percent=100 if hw.is_cpu_only else 0,
                         act_cpu_percent=0 if hw.is_cpu_only else 100)
        est = estimate(policy, layout, workload, hw, 4, 100 * MiB, MEASURED)
        if est.fits(limits) and (best is None or est.throughput > best.throughput):
            best = est
    return best


@pytest.mark.parametrize("hw", [HW, GPU_HW], ids=["cpu-only", "gpu"])
@pytest.mark.parametrize("cap_mib", [1100, 1600])
def test_plan_fits_and_is_near_brute_force(hw, cap_mib):
    """The LP's rounded, fitted answer fits the limits and reaches 90% of the best policy a
    brute-force grid finds under the same cost model."""
    layout = config_layout(OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                                     num_attention_heads=12, vocab_size=50272), torch.float16)
    workload = Workload(prompt_len=64, gen_len=16, num_prompts=64)
    limits = {DEVICE: 0 if hw.is_cpu_only else 900 * MiB, CPU: cap_mib * MiB, DISK: 50 * GiB}
    base = Policy(overlap=True)
    chosen = plan(layout, workload, hw, limits, 4, 100 * MiB, base=base, measured=MEASURED)
    assert chosen.best.fits(limits)
    for runner in chosen.runners_up:
        assert runner.fits(limits)
    best = brute_force(layout, workload, hw, limits, base)
    assert chosen.best.throughput >= 0.9 * best.throughput, (chosen.best.policy, best.policy)


def test_headroom_is_a_bounded_share_of_the_cpu_limit():
    for cpu, room in ((1 * GiB, 64 * MiB), (4 * GiB, int(0.05 * 4 * GiB)), (100 * GiB, 1 * GiB)):
        limits = {DEVICE: 3 * GiB, CPU: cpu, DISK: 9 * GiB}
        assert with_headroom(limits) == {DEVICE: 3 * GiB, CPU: cpu - room, DISK: 9 * GiB}


def test_plan_keeps_the_headroom_and_uses_it_only_when_nothing_else_fits(caplog):
    layout = config_layout(OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                                     num_attention_heads=12, vocab_size=50272), torch.float16)
    workload = Workload(prompt_len=64, gen_len=16, num_prompts=64)
    limits = {DEVICE: 0, CPU: 1000 * MiB, DISK: 50 * GiB}  # unreserved, the plan peaks at 956 MiB
    chosen = plan(layout, workload, HW, limits, 4, 100 * MiB, measured=MEASURED)
    assert chosen.best.peak_bytes[CPU] <= with_headroom(limits)[CPU]
    # a limit only the smallest working set fits, and only inside the headroom
    smallest = Policy(overlap=True, gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=0,
                      w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0)
    least = peak_memory(smallest, layout, workload, HW, 4, 100 * MiB)[0][CPU]
    tight = {**limits, CPU: least + 16 * MiB}
    assert with_headroom(tight)[CPU] < least
    with caplog.at_level(logging.WARNING):
        chosen = plan(layout, workload, HW, tight, 4, 100 * MiB, measured=MEASURED)
    assert chosen.best.fits(tight)
    assert "headroom" in caplog.text


def test_impossible_limits_refused_before_any_weight_is_read(tiny_checkpoint, tmp_path, monkeypatch):
    _, directory = tiny_checkpoint("llama-gqa")
    monkeypatch.setattr(CheckpointIndex, "read", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(PlacementError, match=r"needs at least cpu \d+\.\d+ GiB \(given 0\.01 GiB\)"):
        FlexGenForCausalLM.from_pretrained(directory, policy="auto", max_memory={"cpu": "10MiB"},
                                           workload=Workload(16, 4, 8))
    with pytest.raises(PlacementError, match="disk"):
        FlexGenForCausalLM.from_pretrained(directory, policy="auto",
                                           max_memory={"disk": "1KiB", "cpu": "300MiB"},
                                           workload=Workload(16, 4, 8),
                                           auto_base=Policy(compress_weight=True))


def test_auto_policy_generates_like_hf(tiny_checkpoint, tmp_path):
    reference, directory = tiny_checkpoint("llama-gqa")
    ids, mask = left_padded_prompts(count=6, max_len=10)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                      do_sample=False)
    model = FlexGenForCausalLM.from_pretrained(directory, policy="auto", offload_dir=tmp_path,
                                               max_memory={"cpu": "4GiB"}, workload=Workload(10, 6, 6))
    try:
        assert model.plan is not None and model.plan.best.fits(model.plan.limits)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                          do_sample=False), expected)
        with pytest.raises(ValueError, match="planned for 10 prompt \\+ 6 new tokens"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    finally:
        model.close()


def test_policy_argument_errors(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama-gqa")
    with pytest.raises(ValueError, match="'auto'"):
        FlexGenForCausalLM.from_pretrained(directory, policy="fast")
    with pytest.raises(ValueError, match="only apply to policy='auto'"):
        FlexGenForCausalLM.from_pretrained(directory, policy=Policy(), max_memory={"cpu": "1GiB"})
