"""Harness model arguments (lm-eval --model_args, HELM client args) -> hf_flexgen Policy."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_flexgen import Policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patches"))

from hf_flexgen_args import build_policy, parse_dtype


@pytest.mark.parametrize("percent", ["20 80 0 100 100 0", "20:80:0:100:100:0", "20/80/0/100/100/0"])
def test_percent_is_flexgen_percent(percent):
    got = build_policy(percent=percent, gpu_batch_size=32, num_gpu_batches=4, overlap=True)
    assert got == Policy(gpu_batch_size=32, num_gpu_batches=4, overlap=True, w_gpu_percent=20,
                         w_cpu_percent=80, cache_gpu_percent=0, cache_cpu_percent=100,
                         act_gpu_percent=100, act_cpu_percent=0)


def test_policy_string_goes_to_from_pretrained_unchanged():
    assert build_policy("auto") == "auto"
    assert build_policy() == Policy()
    assert build_policy(gpu_batch_size=3) == Policy(gpu_batch_size=3)


def test_conflicting_or_unknown_arguments_are_refused():
    with pytest.raises(ValueError, match="drop percent"):
        build_policy("auto", percent="100 0 100 0 100 0")
    with pytest.raises(ValueError, match="unknown policy arguments: gpu_batchsize"):
        build_policy(gpu_batchsize=4)
    with pytest.raises(ValueError, match="six numbers"):
        build_policy(percent="20:80")


def test_dtypes():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    with pytest.raises(ValueError, match="not one of"):
        parse_dtype("float8")
