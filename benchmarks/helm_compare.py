"""helm-run on one checkpoint twice, through the hf_flexgen client and through HELM's own
Hugging Face client, on a scenario that needs no download (default: simple_classification);
prints the test-split metrics side by side and writes JSON.

    PYTHONPATH=.:patches python benchmarks/helm_compare.py [--model DIR] [--scenario NAME] [--out FILE]

Needs crfm-helm (see README, Evaluation harnesses); run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "patches"))

from helm_hf_flexgen.prod_env import write_prod_env


def helm_run(work: Path, local_path: str, model: str, scenario: str, suite: str, extra: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "patches"), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(Path(sys.executable).parent / "helm-run"), "--run-entries", f"{scenario}:model={model}",
           "--suite", suite, "--local-path", local_path, "--output-path", "out", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def outputs(work: Path, suite: str) -> tuple[dict, list[str]]:
    (run_dir,) = (work / "out" / "runs" / suite).glob("*:model=*")
    stats = {s["name"]["name"]: s["mean"] for s in json.loads((run_dir / "stats.json").read_text())
             if s["name"].get("split") == "test" and not s["name"].get("perturbation") and "mean" in s}
    states = json.loads((run_dir / "scenario_state.json").read_text())["request_states"]
    return stats, [s["result"]["completions"][0]["text"] for s in states]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in SmolLM2)")
    parser.add_argument("--scenario", default="simple_classification")
    parser.add_argument("--client-args", default='{"percent": "50 50 100 0 50 50", "gpu_batch_size": 4, "num_gpu_batches": 2}')
    parser.add_argument("--max-eval-instances", default="20")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="plain prompts for both clients (apply_chat_template: false)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/helm_compare.json"))
    args = parser.parse_args()
    if args.model is None:
        from hf_flexgen.default_model import default_model_dir
        args.model = str(default_model_dir())
    extra = ["--max-eval-instances", args.max_eval_instances, "--num-threads", "8"]
    template = {"apply_chat_template": False} if args.no_chat_template else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_prod_env(work / "prod_env", args.model, "hf_flexgen/model",
                       {**json.loads(args.client_args), **template})
        write_prod_env(work / "prod_env_hf", args.model, "huggingface/model", {"device": "cpu", **template},
                       client_class="helm.clients.huggingface_client.HuggingFaceClient")
        wall = {"hf_flexgen": helm_run(work, "prod_env", "hf_flexgen/model", args.scenario, "fg", extra),
                "hf": helm_run(work, "prod_env_hf", "huggingface/model", args.scenario, "hf", extra)}
        fg_stats, fg_texts = outputs(work, "fg")
        hf_stats, hf_texts = outputs(work, "hf")
    names = [n for n in hf_stats if any(k in n for k in ("exact_match", "num_prompt_tokens", "num_output_tokens"))]
    print(f"{'metric':28} {'hf':>10} {'hf_flexgen':>10}")
    for n in names:
        print(f"{n:28} {hf_stats[n]:10.4f} {fg_stats.get(n, float('nan')):10.4f}")
    same = hf_texts == fg_texts
    print(f"{len(hf_texts)} requests; completions identical: {same}; wall s: hf {wall['hf']:.0f}, "
          f"hf_flexgen {wall['hf_flexgen']:.0f}")
    report = {"model": args.model, "scenario": args.scenario, "client_args": json.loads(args.client_args),
              "chat_template": not args.no_chat_template,
              "metrics": {n: {"hf": hf_stats[n], "hf_flexgen": fg_stats.get(n)} for n in names},
              "requests": len(hf_texts), "completions_identical": same, "wall_s": wall}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
