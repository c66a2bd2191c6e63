"""Find a checkpoint's files: a local directory or a Hugging Face hub id; safetensors read in
place, ``.bin``-only checkpoints converted once to safetensors in a cache directory."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def cache_root() -> Path:
    return Path(os.environ.get("HF_FLEXGEN_CACHE", Path.home() / ".cache" / "hf_flexgen"))


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                           token: str | None = None) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    from huggingface_hub import list_repo_files, snapshot_download
    try:
        files = list_repo_files(name, revision=revision, token=token)
        patterns = HUB_PATTERNS + ([] if any(f.endswith(".safetensors") for f in files) else ["*.bin"])
        return Path(snapshot_download(name, revision=revision, token=token, allow_patterns=patterns))
    except Exception as err:
        raise FileNotFoundError(
            f"{name!r} is neither a local directory nor a reachable Hugging Face hub model "
            f"({type(err).__name__}: {err}). Pass a local checkpoint directory, or check the "
            "model id and the network.") from err


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files, converting ``.bin`` weights once if that is all."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(p for p in directory.glob("*.bin") if p.name != "training_args.bin")
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {directory}")
    return [convert_bin(p) for p in bins]


def convert_bin(path: Path) -> Path:
    from safetensors.torch import save_file
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "converted" / digest / (path.stem + ".safetensors")
    if not out.exists():
        logger.info("converting %s to safetensors once (%s)", path.name, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tmp = out.with_suffix(".tmp")
        seen = {}
        save_file({k: _own_storage(v, seen) for k, v in state.items()}, tmp)
        tmp.rename(out)
    return out


def _own_storage(tensor: torch.Tensor, seen: dict) -> torch.Tensor:
    """safetensors refuses shared storage (tied weights in .bin files): give each its own."""
    ptr = tensor.untyped_storage().data_ptr()
    if ptr in seen:
        return tensor.clone().contiguous()
    seen[ptr] = True
    return tensor.contiguous()
