"""HELM shim (patches/helm_hf_flexgen). Without crfm-helm (CI): the request batcher, and the
runner against HF's own generate/forward on SmolLM2. With crfm-helm installed: the client
against HELM's own Hugging Face client on HELM's Request/RequestResult types, and helm-run end
to end on a local scenario, against helm-run with HELM's Hugging Face client."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hf_flexgen import FlexGenForCausalLM, Policy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "patches"))

from helm_hf_flexgen.batcher import RequestBatcher
from helm_hf_flexgen.runner import serve

PROMPTS = ["The capital of France is", "Question: Is 24 even or odd?\nAnswer:", "1, 2, 3, 4,",
           "Water is made of hydrogen and", "Once upon a time"]


def test_batcher_runs_concurrent_calls_with_one_key_together():
    batches, lock = [], threading.Lock()

    def run(key, items):
        with lock:
            batches.append((key, list(items)))
        return [f"{key}:{i}" for i in items]

    batcher = RequestBatcher(run, max_batch=4, wait_s=1.0)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: batcher.submit(i % 2, i), range(8)))
    assert results == [f"{i % 2}:{i}" for i in range(8)]
    assert all(key == i % 2 for key, items in batches for i in items)
    assert sorted(i for _, items in batches for i in items) == list(range(8))
    assert max(len(items) for _, items in batches) > 1 and all(len(items) <= 4 for _, items in batches)


def test_batcher_hands_errors_to_every_caller():
    def run(key, items):
        raise RuntimeError(f"batch {items} failed")

    batcher = RequestBatcher(run, max_batch=2, wait_s=0.0)
    with pytest.raises(RuntimeError, match="failed"):
        batcher.submit("k", 1)


def raw_request(prompt, max_tokens=6, echo=False):
    return {"engine": "smollm2", "prompt": prompt, "temperature": 0.0, "num_completions": 1,
            "max_tokens": max_tokens, "top_p": 1, "echo_prompt": echo, "stop_sequences": []}


@pytest.mark.slow
def test_runner_matches_hf_generate_and_forward(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    model = FlexGenForCausalLM.from_pretrained(
        smollm2_dir, policy=Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=50),
        offload_dir=tmp_path)
    generated = serve(model, tokenizer, [raw_request(p) for p in PROMPTS])
    echoed = serve(model, tokenizer, [raw_request(p, max_tokens=0, echo=True) for p in PROMPTS])
    model.close()
    eos = reference.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for prompt, gen, echo in zip(PROMPTS, generated, echoed):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=6, do_sample=False,
                                     return_dict_in_generate=True, output_scores=True)
            prompt_logits = reference(ids).logits[0, :-1].float()
        new = out.sequences[0, ids.shape[1]:].tolist()
        end = next((k for k, t in enumerate(new) if t in eos), len(new))
        logprobs = [torch.log_softmax(out.scores[k][0].float(), -1)[new[k]].item() for k in range(end)]
        (completion,) = gen["completions"]
        assert completion["tokens"] == [tokenizer.decode([t]) for t in new[:end]]
        assert completion["text"] == tokenizer.decode(new[:end])
        assert completion["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        expected = torch.log_softmax(prompt_logits, -1).gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        (completion,) = echo["completions"]
        assert echo["input_length"] == ids.shape[1]
        assert completion["tokens"] == [tokenizer.decode([t]) for t in ids[0].tolist()]
        assert completion["logprobs"] == pytest.approx([0.0, *expected], abs=1e-4)


# -- with crfm-helm installed (not in CI: it pulls spacy, torchvision and more) ---------------
@pytest.mark.slow
def test_client_matches_helm_huggingface_client(smollm2_dir, tmp_path):
    pytest.importorskip("helm.clients.huggingface_client", reason="crfm-helm is not installed")
    from helm.clients.huggingface_client import HuggingFaceClient
    from helm.common.cache import BlackHoleCacheConfig
    from helm.common.request import Request
    from helm.tokenizers.huggingface_tokenizer import HuggingFaceTokenizer
    from helm_hf_flexgen.client import FlexGenClient

    cache = BlackHoleCacheConfig()
    tokenizer = HuggingFaceTokenizer(cache, "hf_flexgen/smollm2", pretrained_model_name_or_path=str(smollm2_dir))
    eos = "<|im_end|>"
    ours = FlexGenClient(cache, tokenizer, str(smollm2_dir), end_of_text_token=eos, apply_chat_template=False,
                         batch_wait_s=1.0, percent="50 50 100 0 50 50", gpu_batch_size=2,
                         num_gpu_batches=2, offload_dir=str(tmp_path))
    theirs = HuggingFaceClient(cache, tokenizer, pretrained_model_name_or_path=str(smollm2_dir),
                               end_of_text_token=eos, apply_chat_template=False, device="cpu")
    name = {"model": "hf_flexgen/smollm2", "model_deployment": "hf_flexgen/smollm2"}
    generation = [Request(prompt=p, temperature=0.0, max_tokens=8, stop_sequences=["\n"], **name) for p in PROMPTS]
    scoring = [Request(prompt=p, echo_prompt=True, max_tokens=0, **name) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # as helm-run --num-threads does
        got = list(pool.map(ours.make_request, generation + scoring))
    expected = [theirs.make_request(r) for r in generation + scoring]
    for request, have, want in zip(generation + scoring, got, expected):
        assert have.success and want.success, (have.error, want.error)
        (h,), (w,) = have.completions, want.completions
        assert h.text == w.text, request.prompt
        assert [t.text for t in h.tokens] == [t.text for t in w.tokens], request.prompt
        if request.echo_prompt:  # HELM's client samples at temperature 1e-7 otherwise: no real log-probs
            assert [t.logprob for t in h.tokens] == pytest.approx([t.logprob for t in w.tokens], abs=1e-4)
            assert h.logprob == pytest.approx(w.logprob, abs=1e-3)
    from helm_hf_flexgen.client import _Server
    (server,) = [s for s in _Server._servers.values() if s.model.offload_dir == tmp_path]
    assert max(server.batcher.batch_sizes) > 1, "concurrent requests should share blocks"
    server.model.close()


def helm_run(args: list[str], cwd: Path) -> None:
    helm_run_bin = Path(sys.executable).parent / "helm-run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "patches"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([str(helm_run_bin), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def run_outputs(out: Path, suite: str) -> tuple[dict, list[str]]:
    """(test-split exact_match stats, completions in instance order) of one helm-run run."""
    (run_dir,) = (out / "runs" / suite).glob("*:model=*")
    stats = {s["name"]["name"]: s["mean"] for s in json.loads((run_dir / "stats.json").read_text())
             if s["name"].get("split") == "test" and not s["name"].get("perturbation")
             and "exact_match" in s["name"]["name"]}
    states = json.loads((run_dir / "scenario_state.json").read_text())["request_states"]
    return stats, [s["result"]["completions"][0]["text"] for s in states]


@pytest.mark.slow
def test_helm_run_end_to_end(smollm2_dir, tmp_path):
    """``helm-run`` on HELM's simple_classification scenario (built in, no download) through
    the hf_flexgen deployment gives the completions and metrics of HELM's own Hugging Face
    client on the same checkpoint."""
    if shutil.which("helm-run", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("crfm-helm is not installed (helm-run not found)")
    from helm_hf_flexgen.prod_env import write_prod_env

    write_prod_env(tmp_path / "prod_env", smollm2_dir, "hf_flexgen/smollm2",
                   {"percent": "50 50 100 0 50 50", "gpu_batch_size": 4, "num_gpu_batches": 2})
    # HELM's --enable-local-huggingface-models refuses SmolLM2 (no model_max_length in its
    # tokenizer config): the same files, with HELM's own Hugging Face client
    write_prod_env(tmp_path / "prod_env_hf", smollm2_dir, "huggingface/smollm2", {"device": "cpu"},
                   client_class="helm.clients.huggingface_client.HuggingFaceClient")
    common = ["--max-eval-instances", "8", "--num-threads", "8", "--output-path", "out"]
    helm_run(["--run-entries", "simple_classification:model=hf_flexgen/smollm2", "--suite", "flexgen",
              "--local-path", "prod_env", *common], tmp_path)
    helm_run(["--run-entries", "simple_classification:model=huggingface/smollm2", "--suite", "hf",
              "--local-path", "prod_env_hf", *common], tmp_path)
    got_stats, got_texts = run_outputs(tmp_path / "out", "flexgen")
    want_stats, want_texts = run_outputs(tmp_path / "out", "hf")
    assert len(got_texts) == 8 and got_texts == want_texts
    assert got_stats == want_stats and "exact_match" in got_stats
