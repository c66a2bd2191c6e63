"""Shared fixtures: tiny random checkpoints built from configs, and the real SmolLM2."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import TINY_CONFIGS


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name -> (HF reference model, checkpoint directory written by HF's save_pretrained)."""
    made = {}

    def make(name: str):
        if name not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]()).eval()
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            made[name] = (model, directory)
        return made[name]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    from hf_flexgen.default_model import default_model_dir
    return default_model_dir()
