"""``hf-flexgen generate``: a killed job resumes to the same results; bad input gets a
one-line error (exit code 2) before any weight is loaded."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, T5Config

from hf_flexgen import FlexGenForCausalLM
from hf_flexgen.cli import CliError, ResultsFile, main

TOPICS = ["rain", "bread", "the moon", "chess", "rivers", "bees", "clocks", "glass", "salt",
          "maps", "violins", "snow", "bridges"]
FILLER = "It rained all day in the town. "


def mixed_jobs() -> list[dict]:
    """52 prompts of 2 to ~40 tokens, in no particular length order."""
    jobs = []
    for n, topic in enumerate(TOPICS):
        jobs += [
            {"id": f"{topic}-a", "prompt": f"{topic.capitalize()} is"},
            {"id": f"{topic}-b", "prompt": FILLER * (1 + n % 4) + f"Meanwhile, {topic}"},
            {"id": f"{topic}-c", "messages": [{"role": "user", "content": f"One fact about {topic}?"}]},
            {"id": f"{topic}-d", "prompt": f"Here is a short sentence about {topic} for a child:"},
        ]
    return jobs


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def complete_ids(path: Path) -> set:
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            pass  # the kill cut this line short
    return ids


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "hf_flexgen.cli", "generate", *map(str, args)]


# One thread: on a shared 2-core runner, multi-threaded small GEMMs wait a scheduler tick each.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_main(capsys, *args) -> tuple[int, str]:
    rc = main(["generate", *map(str, args)])
    return rc, capsys.readouterr().err


# -- end to end: SIGKILL part-way, rerun, same results as an uninterrupted run ---------------
def test_killed_job_resumes_to_the_uninterrupted_results(smollm2_dir, tmp_path):
    jobs = mixed_jobs()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", jobs)
    common = ["--model", smollm2_dir, "--input", prompts, "--gpu-batch-size", 7,
              "--num-gpu-batches", 2, "--max-new-tokens", 3, "--no-chat-template", "--quiet"]  # 4 blocks
    reference, resumed = tmp_path / "reference.jsonl", tmp_path / "resumed.jsonl"
    done = subprocess.run(cli(*common, "--output", reference), timeout=600, capture_output=True,
                          text=True, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    expected = {r["id"]: r for r in read_results(reference)}
    assert sorted(expected) == sorted(j["id"] for j in jobs)

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cli(*common, "--output", resumed), stdout=log, stderr=log, env=ONE_THREAD)
        try:  # SIGKILL as soon as the first block is in the file
            deadline = time.monotonic() + 600
            while not (resumed.exists() and resumed.read_text().count("\n") >= 1):
                assert proc.poll() is None and time.monotonic() < deadline, "no block was written"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    written = complete_ids(resumed)
    assert 0 < len(written) < len(jobs)
    pending = next(j["id"] for j in jobs if j["id"] not in written)
    with open(resumed, "a") as f:  # as if the crash had cut a line short
        f.write(json.dumps({"id": pending, "completion": "cut sho"})[:30])

    rerun = subprocess.run(cli(*common, "--output", resumed), timeout=600, capture_output=True,
                           text=True, env=ONE_THREAD)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "cut short by a crash" in rerun.stderr
    results = read_results(resumed)
    assert sorted(r["id"] for r in results) == sorted(expected)  # every id exactly once
    assert {r["id"]: r for r in results} == expected


def test_default_run_and_rerun(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert run_main(capsys, "--output", out, "--max-new-tokens", 2, "--quiet")[0] == 0
    first = out.read_text()
    assert sorted(r["id"] for r in read_results(out)) == list(range(6))
    assert all(r["new_tokens"] <= 2 and isinstance(r["completion"], str) for r in read_results(out))
    assert run_main(capsys, "--output", out, "--max-new-tokens", 2)[0] == 0
    assert out.read_text() == first


def test_messages_and_stop_strings(smollm2_dir, tmp_path, capsys):
    chat = [{"role": "user", "content": "Write a list of three fruits, one per line."}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "list", "messages": chat}])
    plain, stopped = tmp_path / "plain.jsonl", tmp_path / "stopped.jsonl"
    common = ["--model", smollm2_dir, "--input", prompts, "--max-new-tokens", 8, "--quiet"]
    assert run_main(capsys, *common, "--output", plain)[0] == 0
    assert run_main(capsys, *common, "--output", stopped, "--stop", "\n", "--stop", "never")[0] == 0
    [full], [cut] = read_results(plain), read_results(stopped)
    assert "\n" in full["completion"] and cut["completion"] == full["completion"].split("\n")[0]
    assert cut["new_tokens"] < full["new_tokens"]


# -- results file ---------------------------------------------------------------------------
def test_results_file_drops_a_cut_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    good = ('{"id": 1, "completion": "a", "new_tokens": 1}\n'
            '{"id": "b", "completion": "b", "new_tokens": 1}\n')
    for tail in ('{"id": 3, "compl', '\x00\x00\x00\n', '{"id": 3}'):
        path.write_text(good + tail)
        results = ResultsFile(path)
        assert results.done == {1, "b"}
        results.write_block([{"id": 3, "completion": "c", "new_tokens": 2}])
        results.close()
        assert path.read_text() == good + '{"id": 3, "completion": "c", "new_tokens": 2}\n'


def test_results_file_is_one_run_at_a_time(tmp_path):
    first = ResultsFile(tmp_path / "out.jsonl")
    with pytest.raises(CliError, match="another run is writing"):
        ResultsFile(tmp_path / "out.jsonl")
    first.close()
    ResultsFile(tmp_path / "out.jsonl").close()


def test_results_file_refuses_a_bad_line_in_the_middle(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", ['{"id": 1}', "oops", '{"id": 2}'])
    with pytest.raises(CliError, match=r"out.jsonl:2: not a result line"):
        ResultsFile(path)


# -- bad input: one-line errors, exit code 2, before any weight is loaded ---------------------
GOOD = {"id": 1, "prompt": "hello"}


@pytest.mark.parametrize("line, message", [
    ("not json", r"prompts.jsonl:2: not valid JSON"),
    ("[1, 2]", r"prompts.jsonl:2: expected a JSON object"),
    ('{"prompt": "x"}', r'prompts.jsonl:2: missing "id"'),
    ('{"id": [1], "prompt": "x"}', r'prompts.jsonl:2: "id" must be a string or an integer'),
    ('{"id": 1, "prompt": "again"}', r"prompts.jsonl:2: duplicate id 1 \(first on line 1\)"),
    ('{"id": 2}', r'prompts.jsonl:2: needs exactly one of "prompt" or "messages"'),
    ('{"id": 2, "prompt": 5}', r'prompts.jsonl:2: "prompt" must be a string'),
    ('{"id": 2, "messages": [{"content": "x"}]}', r'prompts.jsonl:2: "messages" must be a non-empty list'),
])
def test_bad_input_lines_named_before_the_model_is_touched(tmp_path, capsys, line, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [GOOD, line])
    rc, err = run_main(capsys, "--input", prompts, "--model", tmp_path / "no-such-model")
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_error_from_the_real_command_line_is_one_line(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [GOOD, GOOD])
    done = subprocess.run(cli("--input", prompts), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("hf-flexgen: error: " + str(prompts) +
                                   ":2: duplicate id 1 (first on line 1)")


@pytest.mark.parametrize("kind, message", [
    ("missing", r"does not exist"),
    ("empty", r"has no config.json: not a transformers checkpoint"),
    ("t5", r"'t5' model, which is not a causal language model"),
    ("gpt2", r"model_type 'gpt2' is not supported by hf_flexgen; supported: .*llama"),
])
def test_bad_model_paths(tmp_path, capsys, kind, message):
    model = tmp_path / "model"
    if kind != "missing":
        model.mkdir()
    if kind == "t5":
        T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(model)
    if kind == "gpt2":
        GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(model)
    rc, err = run_main(capsys, "--input", write_jsonl(tmp_path / "prompts.jsonl", [GOOD]), "--model", model)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def tokenizer_only_checkpoint(smollm2_dir: Path, directory: Path, **config_changes) -> Path:
    """SmolLM2's config (changed) and tokenizer, without weights."""
    directory.mkdir()
    for name in os.listdir(smollm2_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(Path(smollm2_dir) / name, directory / name)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **config_changes}))
    return directory


def test_prompt_longer_than_context_before_loading_weights(smollm2_dir, tmp_path, capsys):
    model = tokenizer_only_checkpoint(smollm2_dir, tmp_path / "short-context", max_position_embeddings=64)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [GOOD, {"id": "long", "prompt": "word " * 60}])
    rc, err = run_main(capsys, "--input", prompts, "--model", model, "--max-new-tokens", 16)
    assert rc == 2
    assert "prompts.jsonl:2 (id 'long') has" in err and "more than the 48 that fit" in err
    assert "max_position_embeddings" in err
    # the short prompt alone gets past the check and on to the (missing) weights
    write_jsonl(prompts, [GOOD])
    rc, err = run_main(capsys, "--input", prompts, "--model", model, "--max-new-tokens", 16)
    assert rc == 2 and "no *.safetensors or *.bin weight files" in err and "Traceback" not in err


def test_policy_auto_generates_what_a_fixed_policy_does(smollm2_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", mixed_jobs()[:10])
    common = ["--model", smollm2_dir, "--input", prompts, "--max-new-tokens", 3, "--quiet"]
    fixed, auto = tmp_path / "fixed.jsonl", tmp_path / "auto.jsonl"
    assert run_main(capsys, *common, "--output", fixed)[0] == 0
    rc, err = run_main(capsys, *common, "--output", auto, "--policy", "auto", "--max-memory", "cpu=3GiB")
    assert rc == 0, err
    # greedy tokens do not depend on placement or block shape
    assert {r["id"]: r for r in read_results(auto)} == {r["id"]: r for r in read_results(fixed)}


def test_policy_auto_below_the_minimum_is_refused(smollm2_dir, capsys):
    rc, err = run_main(capsys, "--model", smollm2_dir, "--policy", "auto", "--max-memory", "cpu=50MiB")
    assert rc == 2 and "needs at least cpu" in err and "Traceback" not in err
    rc, err = run_main(capsys, "--policy", "auto", "--max-memory", "cpu")
    assert rc == 2 and "HOME=SIZE" in err


def test_plan_prints_policy_prediction_and_runners_up(smollm2_dir, capsys):
    rc = main(["plan", "--model", str(smollm2_dir), "--prompt-len", "32", "--gen-len", "8",
               "--num-prompts", "64", "--max-memory", "cpu=2GiB", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out)
    assert report["limits"]["cpu"] == 2 * 2**30 and len(report["plans"]) >= 2
    for plan in report["plans"]:
        assert plan["throughput_tok_s"] > 0 and plan["peak_bytes"]["cpu"] <= 2 * 2**30
    assert main(["plan", "--model", str(smollm2_dir), "--max-memory", "cpu=2GiB"]) == 0
    table = capsys.readouterr().out
    assert "chosen" in table and "runner-up" in table and "--percent" in table


def test_bad_policy_percent(capsys):
    rc, err = run_main(capsys, "--percent", 120, 0, 100, 0, 100, 0)
    assert rc == 2 and "bad policy: Policy.w_gpu_percent" in err


@pytest.mark.parametrize("where", ["load", "generate"])
def test_policy_that_does_not_fit(smollm2_dir, tmp_path, capsys, monkeypatch, where):
    def out_of_memory(*args, **kwargs):
        if where == "load":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise MemoryError()

    target = "from_pretrained" if where == "load" else "generate"
    monkeypatch.setattr(FlexGenForCausalLM, target,
                        classmethod(out_of_memory) if where == "load" else out_of_memory)
    rc, err = run_main(capsys, "--model", smollm2_dir, "--gpu-batch-size", 64,
                       "--output", tmp_path / "out.jsonl", "--quiet")
    assert rc == 2 and "Traceback" not in err
    assert "the policy does not fit in this machine's memory or disk" in err
    assert "lower --gpu-batch-size (64)" in err
    assert not (tmp_path / "out.jsonl").exists()  # no empty results file left behind


@pytest.mark.parametrize("output", ["a-directory", "missing-dir/out.jsonl"])
def test_output_not_writable_before_the_model(tmp_path, capsys, output):
    (tmp_path / "a-directory").mkdir()
    rc, err = run_main(capsys, "--output", tmp_path / output, "--model", tmp_path / "no-such-model")
    assert rc == 2 and "cannot write the output file" in err and "no-such-model" not in err
