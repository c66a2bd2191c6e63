"""Layer timing for the cost model: the cache eviction's size comes from sysfs; rates
learned from the engine's runs."""
import json

import pytest

from hf_flexgen.calibration import last_level_cache_bytes


def test_last_level_cache_size_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "260M"), ("index4", "junk")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 260 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 64 * 2**20


def test_prefill_rate_learned_from_the_engines_runs(tiny_checkpoint, tmp_path, monkeypatch):
    """A run's prefill compute time per token and layer (its I/O waits taken out) becomes
    the cost model's prefill rate: the median of the last five runs long enough to tell."""
    import statistics

    import torch

    from hf_flexgen import FlexGenForCausalLM, Policy
    from hf_flexgen import calibration
    from hf_flexgen.modeling import build_skeleton
    from hf_flexgen.placement.cost_model import LayerCosts

    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path / "cache"))
    timed = LayerCosts(prefill_token_s=1.0, decode_fixed_s=2.0, decode_row_s=3.0,
                       head_fixed_s=4.0, head_row_s=5.0)
    monkeypatch.setattr(calibration, "measure", lambda *a: timed)
    _, directory = tiny_checkpoint("llama-gqa")
    model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=2),
                                               offload_dir=tmp_path / "offload")
    cpu, config, dtype = torch.device("cpu"), model.config, model.dtype
    costs = lambda: calibration.layer_costs(config, build_skeleton(config, cpu), cpu, dtype)  # noqa: E731
    assert costs() == timed  # nothing observed yet

    stats = {"prefill_s": 2.0, "io_wait_s": 0.7, "decode_io_wait_s": 0.2, "prefill_tokens": 100}
    layers = model.adapter.num_layers
    observe = calibration.observe_prefill
    observe(config, cpu, dtype, {**stats, "prefill_s": 0.4}, 8, layers)      # too short to tell
    observe(config, cpu, dtype, stats, calibration.PREFILL_TOKENS + 1, layers)  # longer prompts
    observe(config, cpu, dtype, stats, 8, layers)
    assert costs().prefill_token_s == (2.0 - 0.5) / (100 * layers)
    assert costs().decode_fixed_s == timed.decode_fixed_s  # the rest stays as timed

    # the engine's own figures feed it
    monkeypatch.setattr(calibration, "MIN_OBSERVED_PREFILL_S", 0.0)
    ids = torch.randint(4, 100, (3, 6))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    model.close()
    s = model.last_stats
    assert s["prefill_tokens"] == 18
    run = (s["prefill_s"] - s["io_wait_s"] + s["decode_io_wait_s"]) / (18 * layers)
    assert costs().prefill_token_s == statistics.median([(2.0 - 0.5) / (100 * layers), run])
    assert calibration.layer_costs(config, build_skeleton(config, cpu), cpu, dtype,
                                   refresh=True) == timed  # a refresh forgets them


def test_decode_overhead_learned_from_the_engines_runs(tiny_checkpoint, tmp_path, monkeypatch):
    """A run's decode compute time beyond the timed layer and head costs (I/O waits and
    weight conversions taken out), per micro-batch pass through a layer, is added to the
    timed fixed cost of a decode pass: the median of the last five runs that can tell."""
    import torch

    from hf_flexgen import FlexGenForCausalLM, Policy
    from hf_flexgen import calibration
    from hf_flexgen.modeling import build_skeleton
    from hf_flexgen.placement.cost_model import LayerCosts

    monkeypatch.setenv("HF_FLEXGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "MIN_OBSERVED_DECODE_S", 0.0)
    timed = LayerCosts(prefill_token_s=1e-6, decode_fixed_s=1e-6, decode_row_s=1e-7,
                       head_fixed_s=2e-6, head_row_s=2e-7)
    monkeypatch.setattr(calibration, "measure", lambda *a: timed)
    _, directory = tiny_checkpoint("llama-gqa")
    cpu = torch.device("cpu")

    def run(policy: Policy, prompt: int, new: int):
        model = FlexGenForCausalLM.from_pretrained(directory, policy=policy, offload_dir=tmp_path / "off")
        costs = calibration.layer_costs(model.config, build_skeleton(model.config, cpu), cpu, model.dtype)
        ids = torch.randint(4, 100, (4, prompt))
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False)
        model.close()
        return model, costs, model.last_stats

    model, costs, s = run(Policy(gpu_batch_size=2, num_gpu_batches=2), 6, 4)
    layers = model.adapter.num_layers
    assert costs == timed  # nothing observed before this run
    # 3 decode steps x 2 micro-batches of 2 rows, through every layer
    assert (s["decode_layer_calls"], s["decode_layer_rows"]) == (layers * 3 * 2, layers * 3 * 4)
    calls, rows = s["decode_layer_calls"], s["decode_layer_rows"]
    compute = s["decode_s"] - s["decode_io_wait_s"] - s["decode_convert_s"]
    extra = (compute - calls * 1e-6 - rows * 1e-7 - (calls * 2e-6 + rows * 2e-7) / layers) / calls
    config, dtype = model.config, model.dtype
    learned = calibration.layer_costs(config, build_skeleton(config, cpu), cpu, dtype)
    assert learned.decode_fixed_s == pytest.approx(timed.decode_fixed_s + max(0.0, extra))
    assert learned.decode_row_s == timed.decode_row_s

    # runs that cannot tell it apart from costs modelled elsewhere are not recorded
    path = calibration._path(config, cpu, dtype)
    before = json.loads(path.read_text())[calibration.OVERHEAD_KEY]
    run(Policy(gpu_batch_size=2, cache_gpu_percent=0), 6, 4)                     # cache on disk
    run(Policy(gpu_batch_size=2), calibration.MAX_OBSERVED_CONTEXT, 4)           # long context
    assert json.loads(path.read_text())[calibration.OVERHEAD_KEY] == before

    # a run faster than the timings adds nothing (never a negative fixed cost)
    observe = calibration.observe_decode
    quick = {"decode_s": 0.0, "decode_io_wait_s": 0.0, "decode_convert_s": 0.0,
             "decode_layer_calls": 1, "decode_layer_rows": 1}
    for _ in range(calibration.OBSERVATIONS):
        observe(config, cpu, dtype, quick, Policy(), 8, layers)
    assert calibration.layer_costs(config, build_skeleton(config, cpu), cpu, dtype) == timed
