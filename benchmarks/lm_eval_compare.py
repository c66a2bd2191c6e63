"""lm-eval metrics of ``--model hf`` and ``--model hf_flexgen`` side by side on one checkpoint
(default: the built-in SmolLM2) and the offline demo tasks in patches/lm_eval_tasks; prints a
table and writes JSON (metrics, largest per-request log-likelihood difference, wall times).

    python benchmarks/lm_eval_compare.py [--model DIR] [--model-args-flexgen ...] [--out FILE]

Run from the repository root, with lm_eval installed (``pip install -e ".[eval]"``).
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
TASKS = "hf_flexgen_mc,hf_flexgen_gen,hf_flexgen_ppl"


def run(command: list[str], model: str, model_args: str, out: Path) -> tuple[dict, dict, float]:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [*command, "--model", model, "--model_args", model_args, "--device", "cpu", "--batch_size", "8",
           "--tasks", TASKS, "--include_path", "patches/lm_eval_tasks", "--output_path", str(out),
           "--log_samples"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in TASKS.split(","):
        for path in out.rglob(f"samples_{task}_*.jsonl"):
            for line in path.read_text().splitlines():
                s = json.loads(line)
                samples[(task, s["doc_id"])] = s["resps"]
    return results, samples, wall


def largest_loglik_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for key, resps in a.items():
        if key[0] == "hf_flexgen_gen":
            continue
        for x, y in zip(resps, b[key]):
            x, y = x[0], y[0]
            x, y = (x[0], y[0]) if isinstance(x, list) else (x, y)
            worst = max(worst, abs(float(x) - float(y)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in SmolLM2)")
    parser.add_argument("--common-args", default="max_length=40")
    parser.add_argument("--model-args-flexgen", default="gpu_batch_size=4,num_gpu_batches=3,percent=50:50:100:0:50:50")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/lm_eval_compare.json"))
    args = parser.parse_args()
    if args.model is None:
        from hf_flexgen.default_model import default_model_dir
        args.model = str(default_model_dir())
    common = f"pretrained={args.model},{args.common_args}"
    with tempfile.TemporaryDirectory() as tmp:
        hf = run([sys.executable, "-m", "lm_eval"], "hf", f"{common},dtype=float32", Path(tmp) / "hf")
        fg = run([sys.executable, "patches/lm_eval_hf_flexgen.py"], "hf_flexgen",
                 f"{common},{args.model_args_flexgen}", Path(tmp) / "fg")
    rows = []
    for task in TASKS.split(","):
        for metric, value in hf[0][task].items():
            if isinstance(value, (int, float)) and "stderr" not in metric and metric != "alias":
                rows.append({"task": task, "metric": metric, "hf": value, "hf_flexgen": fg[0][task].get(metric)})
    same_text = all(hf[1][k] == fg[1][k] for k in hf[1] if k[0] == "hf_flexgen_gen")
    report = {"model": args.model, "common_args": args.common_args, "flexgen_args": args.model_args_flexgen,
              "metrics": rows, "max_loglik_abs_diff": largest_loglik_difference(hf[1], fg[1]),
              "generations_identical": same_text, "wall_s": {"hf": hf[2], "hf_flexgen": fg[2]}}
    print(f"{'task':16} {'metric':22} {'hf':>12} {'hf_flexgen':>12}")
    for r in rows:
        print(f"{r['task']:16} {r['metric']:22} {r['hf']:12.6f} {r['hf_flexgen']:12.6f}")
    print(f"largest per-request log-likelihood difference: {report['max_loglik_abs_diff']:.2e}; "
          f"generations identical: {same_text}; wall s: hf {hf[2]:.0f}, hf_flexgen {fg[2]:.0f}")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
