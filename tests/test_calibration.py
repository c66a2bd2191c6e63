"""Layer timing for the cost model: the cache eviction's size comes from sysfs."""
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
