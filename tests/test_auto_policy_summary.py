"""benchmarks/auto_policy.py compares the auto policy with the grid by medians of repeats."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import auto_policy  # noqa: E402
from auto_policy import summarize  # noqa: E402


def run(tag, tok_s, status="ok", peak=2**30):
    row = {"scenario": "s", "tag": tag, "requested": tag.split("#")[0], "status": status,
           "peak_rss_bytes": peak, "policy": {"gpu_batch_size": 8}}
    if status == "ok":
        row.update(tok_s=tok_s, predicted_tok_s=10.0, predicted_peak_bytes=2**30)
    return row


def test_medians_of_repeats_decide():
    rows = [run("auto", 9.0), run("grid0", 12.0), run("grid1", 10.0), run("grid2", 0, "killed at cap"),
            run("auto#2", 7.0), run("auto#3", 8.0),
            run("grid0#2", 6.0), run("grid0#3", 7.0),   # a lucky first run: median 7
            run("grid1#2", 10.5), run("grid1#3", 9.5)]  # median 10
    (summary,) = summarize(rows)
    assert summary["auto_tok_s"] == 8.0 and summary["auto_runs"] == [9.0, 7.0, 8.0]
    assert summary["grid_best"] == "grid1" and summary["grid_best_tok_s"] == 10.0
    assert summary["auto_vs_grid_best"] == pytest.approx(0.8)
    assert summary["grid_runs"] == 3 and summary["grid_killed"] == 1


def test_a_policy_killed_in_any_repeat_is_not_the_best():
    rows = [run("auto", 9.0), run("grid0", 12.0), run("grid0#2", 0, "killed at cap"), run("grid1", 5.0)]
    (summary,) = summarize(rows)
    assert summary["grid_best"] == "grid1" and summary["auto_vs_grid_best"] == pytest.approx(1.8)


def test_grid_policies_above_the_cap_in_rss_are_compared_apart(monkeypatch):
    monkeypatch.setitem(auto_policy.CAPS, "s", 2**30)
    rows = [run("auto", 9.0), run("grid0", 12.0, peak=2**30 + 1), run("grid1", 10.0)]
    (summary,) = summarize(rows)
    assert summary["auto_vs_grid_best"] == pytest.approx(0.75)
    assert summary["grid_best_within_cap_tok_s"] == 10.0
    assert summary["auto_vs_grid_best_within_cap"] == pytest.approx(0.9)
