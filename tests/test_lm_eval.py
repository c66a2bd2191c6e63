"""lm-evaluation-harness: ``--model hf_flexgen`` (patches/lm_eval_hf_flexgen.py) gives the same
metrics and per-request results as lm-eval's own ``--model hf`` on SmolLM2, on the local demo
tasks in patches/lm_eval_tasks (multiple choice by log-likelihood, generate_until, rolling
perplexity; JSONL data in the repository, no network). ``max_length=40`` makes the rolling
texts take two windows and cuts some contexts, so truncation is compared too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_flexgen import Policy

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
TASKS = "hf_flexgen_mc,hf_flexgen_gen,hf_flexgen_ppl"
EXACT = ("acc,none", "acc_norm,none", "exact_match,strip")
APPROX = ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")


def run_lm_eval(command: list[str], model: str, model_args: str, out: Path) -> tuple[dict, dict]:
    """(metrics per task, samples per (task, doc_id)) of one lm-eval CLI run."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*command, "--model", model, "--model_args", model_args, "--device", "cpu",
           "--batch_size", "8", "--tasks", TASKS, "--include_path", "patches/lm_eval_tasks",
           "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in TASKS.split(","):
        for path in out.rglob(f"samples_{task}_*.jsonl"):
            for line in path.read_text().splitlines():
                sample = json.loads(line)
                samples[(task, sample["doc_id"])] = sample
    return results, samples


@pytest.mark.slow
def test_hf_flexgen_matches_lm_eval_hf(smollm2_dir, tmp_path):
    common = f"pretrained={smollm2_dir},max_length=40"
    expected, expected_samples = run_lm_eval([sys.executable, "-m", "lm_eval"], "hf",
                                             f"{common},dtype=float32", tmp_path / "hf")
    got, got_samples = run_lm_eval(
        [sys.executable, "patches/lm_eval_hf_flexgen.py"], "hf_flexgen",
        f"{common},gpu_batch_size=4,num_gpu_batches=3,percent=50:50:100:0:50:50", tmp_path / "flexgen")
    for task in TASKS.split(","):
        for metric in EXACT + APPROX:
            if metric in expected[task]:
                assert metric in got[task], (task, metric)
                want = pytest.approx(expected[task][metric], rel=1e-5) if metric in APPROX else expected[task][metric]
                assert got[task][metric] == want, (task, metric)
    assert expected_samples.keys() == got_samples.keys() and len(got_samples) == 30
    for key, sample in expected_samples.items():
        for want, have in zip(sample["resps"], got_samples[key]["resps"]):
            want, have = want[0], have[0]
            if key[0] == "hf_flexgen_mc":      # loglikelihood: [logprob, is_greedy]
                assert float(have[0]) == pytest.approx(float(want[0]), abs=1e-3), key
                assert str(have[1]) == str(want[1]), key
            elif key[0] == "hf_flexgen_gen":   # generate_until: the same text
                assert have == want, key
            else:                              # loglikelihood_rolling: a number
                assert float(have) == pytest.approx(float(want), abs=1e-3), key


@pytest.mark.parametrize("model_args,policy", [
    ("policy=auto", "auto"),
    ("percent=20:80:0:100:100:0,gpu_batch_size=2,num_gpu_batches=3,overlap=True",
     Policy(gpu_batch_size=2, num_gpu_batches=3, overlap=True, w_gpu_percent=20, w_cpu_percent=80,
            cache_gpu_percent=0, cache_cpu_percent=100, act_gpu_percent=100, act_cpu_percent=0)),
    ("gpu_batch_size=16", Policy(gpu_batch_size=16)),
])
def test_model_args_reach_from_pretrained(smollm2_dir, monkeypatch, model_args, policy):
    """lm-eval's own --model_args parsing, then the shim: what from_pretrained receives
    (``policy=auto`` is handed over as the string, for hf_flexgen's planner)."""
    sys.path.insert(0, str(REPO / "patches"))
    import lm_eval_hf_flexgen as shim
    from lm_eval.api.registry import get_model

    seen = {}

    def from_pretrained(directory, **kwargs):
        seen.update(kwargs, directory=directory)
        raise RuntimeError("stop after the arguments")

    monkeypatch.setattr(shim.FlexGenForCausalLM, "from_pretrained", from_pretrained)
    assert get_model("hf_flexgen") is shim.FlexGenLM
    with pytest.raises(RuntimeError, match="stop after the arguments"):
        shim.FlexGenLM.create_from_arg_string(f"pretrained={smollm2_dir},{model_args},dtype=bfloat16",
                                              {"batch_size": 8, "device": "cpu"})
    assert seen["policy"] == policy
    assert seen["directory"] == Path(smollm2_dir) and seen["device"] == "cpu"
    assert seen["dtype"] is torch.bfloat16
