"""Harness arguments -> hf_flexgen load arguments, shared by the lm-eval and HELM shims.

Harnesses hand models flat key=value strings; this turns them into a ``Policy`` (or the
policy string, e.g. ``"auto"``, passed to ``from_pretrained`` unchanged) and a torch dtype.
"""
from __future__ import annotations

import re

import torch

from hf_flexgen import Policy

POLICY_FLAGS = ("gpu_batch_size", "num_gpu_batches", "overlap", "compress_weight", "compress_cache",
                "cpu_cache_compute", "attn_sparsity", "pin_weight")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_policy(policy: str | Policy | None = None, percent: str | None = None, **flags):
    """``policy``: a Policy, or a string for the planner ("auto"); otherwise FlexGen's
    ``percent`` (six numbers: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu, separated by
    spaces, ``:`` or ``/``) and the Policy flags in ``POLICY_FLAGS``; neither: everything on
    the compute device."""
    unknown = set(flags) - set(POLICY_FLAGS)
    if unknown:
        raise ValueError(f"unknown policy arguments: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(POLICY_FLAGS)}")
    flags = {k: v for k, v in flags.items() if v is not None}
    if isinstance(policy, Policy):
        if percent is not None or flags:
            raise ValueError("a Policy object was given: leave percent and the policy flags unset")
        return policy
    if policy is not None:
        if percent is not None or flags:
            raise ValueError(f"policy={policy} lets hf_flexgen choose the placement and batch "
                             "sizes: drop percent=... and the policy flags, or drop policy=")
        return str(policy)
    if percent is None:
        return Policy(**flags)
    values = [v for v in re.split(r"[\s:/]+", str(percent).strip()) if v]
    return Policy.from_percent(values, **flags)


def parse_dtype(dtype) -> torch.dtype | None:
    """None or "auto": hf_flexgen's default (fp32 on CPU, the checkpoint's half type on GPU)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
