"""benchmarks/vs_accelerate.py's search over Accelerate's batch sizes: which runs it skips."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_accelerate as harness  # noqa: E402

BUDGET = 2 * 2**30


def search(tmp_path, monkeypatch, outcomes: dict[tuple[int, float], dict]) -> dict[tuple[int, float], str]:
    """Run the search over batches 128, 64, 32 and runtime floors 1.0, 1.5 GiB with
    ``run_spec`` faked by ``outcomes`` ((batch, floor) -> row fields); returns
    (batch, floor) -> status of each row the search recorded."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
         "vocab_size": 100, "max_position_embeddings": 64, "torch_dtype": "float16"}))
    workload = harness.Workload("tiny", str(checkpoint), prompt_len=8, gen_len=4, num_prompts=128)
    ran = []

    def fake_run_spec(spec, timeout_s, settings, tag):
        key = (spec.config["batch_size"], spec.config["runtime_floor_gib"])
        ran.append(key)
        return {"peer": harness.ACCELERATE, "label": spec.label(), "config": spec.config,
                "budget_bytes": spec.budget_bytes, "time_limit_s": timeout_s, **outcomes[key]}

    monkeypatch.setattr(harness, "run_spec", fake_run_spec)
    settings = harness.Settings(tmp_path, max_run_s=900, timeout_factor=1, budget_step=1.5,
                                max_budget_bytes=BUDGET)
    rows = []
    groups = harness.accelerate_configs(workload, ["float16"], [1.0, 1.5], [128, 64, 32])
    harness.run_accelerate_search(groups, workload, BUDGET, settings, rows, "cpu", None, lambda: None)
    return {(row["config"]["batch_size"], row["config"]["runtime_floor_gib"]): row["status"]
            for row in rows}


OK = {"status": "ok", "generate_s": 100.0, "peak_rss_bytes": BUDGET // 2}


@pytest.mark.parametrize("peak_share", [0.5, 0.95], ids=["room-left", "pressed"])
def test_smaller_batches_skipped_only_after_an_unsqueezed_time_limit(tmp_path, monkeypatch, peak_share):
    """Batch 64 stopped by the time limit batch 128 set: with room left under the budget a
    smaller batch (more weight passes) cannot win and is not run, nor is a larger floor; with
    its RSS pressed against the budget it may have been thrashing, so the larger floor and
    batch 32 still run."""
    limited = {"status": "time limit", "peak_rss_bytes": int(peak_share * BUDGET)}
    statuses = search(tmp_path, monkeypatch, {(128, 1.0): OK, (64, 1.0): limited,
                                              (64, 1.5): limited, (32, 1.0): OK})
    assert statuses[(128, 1.0)] == "ok" and statuses[(64, 1.0)] == "time limit"
    if peak_share < harness.PRESSED_RSS_SHARE:
        assert (64, 1.5) not in statuses and statuses[(32, 1.0)].startswith("not run")
    else:
        assert statuses[(64, 1.5)] == "time limit" and statuses[(32, 1.0)] == "ok"


def test_a_killed_floor_is_followed_by_the_next(tmp_path, monkeypatch):
    killed = {"status": "killed at budget", "peak_rss_bytes": BUDGET}
    statuses = search(tmp_path, monkeypatch, {(128, 1.0): killed, (128, 1.5): OK,
                                              (64, 1.0): OK, (32, 1.0): OK})
    assert statuses == {(128, 1.0): "killed at budget", (128, 1.5): "ok", (64, 1.0): "ok",
                        (32, 1.0): "ok"}
