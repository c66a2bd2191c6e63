"""Compression: quality (perplexity on real text) and measured bytes.

quality: SmolLM2-135M-Instruct (the built-in model), fp32 on CPU, perplexity of the GNU GPL
v3 text shipped by Debian (/usr/share/common-licenses/GPL-3: real English prose, written by
people, neither by the model nor for this test). Windows of --window tokens are scored
token by token through hf_flexgen's block schedule (FlexGenForCausalLM.score): the first
token of each window is the prompt, every later token is teacher-forced, so a compressed KV
cache is exercised exactly as in generation.

bytes: an OPT-6.7B-shaped random checkpoint (fp16, benchmarks/make_checkpoint.py): the
compressed linear-layer weights on disk (files of the compressed copy) and in memory (the
weight store's resident tensors), the whole model (the uncompressed embeddings and vectors
included), and the KV cache storage after a real prefill, each versus fp16.

    python benchmarks/compression.py quality --out benchmarks/results/compression_quality.json
    python benchmarks/compression.py bytes --out benchmarks/results/compression_bytes.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_flexgen

from hf_flexgen import CompressionConfig, FlexGenForCausalLM, Policy  # noqa: E402

logger = logging.getLogger("compression")
C = CompressionConfig
QUALITY_CASES = {
    "none": {},
    "w4 g32 input-dim": {"compress_weight": True, "comp_weight_config": C(4, 32, 1)},
    "w4 g64 input-dim (default)": {"compress_weight": True},
    "w4 g32 output-dim": {"compress_weight": True, "comp_weight_config": C(4, 32, 0)},
    "w4 g64 output-dim (FlexGen's)": {"compress_weight": True, "comp_weight_config": C(4, 64, 0)},
    "cache4 g32": {"compress_cache": True, "comp_cache_config": C(4, 32, -1)},
    "cache4 g64 (default)": {"compress_cache": True},
    "w4 g32 input-dim + cache4 g64": {"compress_weight": True, "comp_weight_config": C(4, 32, 1),
                                      "compress_cache": True},
    "w4 g64 output-dim + cache4 g64": {"compress_weight": True, "comp_weight_config": C(4, 64, 0),
                                       "compress_cache": True},
    "w4 + cache4 (defaults)": {"compress_weight": True, "compress_cache": True},
    "w8 g64 input-dim + cache8 g64": {"compress_weight": True, "comp_weight_config": C(8, 64, 1),
                                      "compress_cache": True, "comp_cache_config": C(8, 64, -1)},
    "attn_sparsity 0.1": {"attn_sparsity": 0.1},
}


def perplexity(model, windows: torch.Tensor) -> float:
    logprobs = model.score(windows[:, :1], None, windows[:, 1:])
    return math.exp(-logprobs.double().mean().item())


def run_quality(args) -> dict:
    from transformers import AutoTokenizer

    from hf_flexgen.default_model import default_model_dir
    directory = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = Path(args.text).read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    count = min(args.windows, len(ids) // args.window)
    windows = torch.tensor(ids[:count * args.window]).view(count, args.window)
    decode_steps = args.window - 2  # step 0 runs the prompt token (no past); the rest decode
    logger.info("text: %s, %d tokens, %d windows of %d (%d scored tokens)", args.text, len(ids),
                count, args.window, count * (args.window - 1))
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, token embedding Q8_0; dequantized to fp32)",
           "text": args.text, "text_tokens": len(ids), "windows": count, "window": args.window,
           "scored_tokens": count * (args.window - 1), "torch_threads": torch.get_num_threads(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": []}
    cases = args.cases or list(QUALITY_CASES)
    base = None
    for name in cases:
        load_before = os.getloadavg()
        model = FlexGenForCausalLM.from_pretrained(
            directory, policy=Policy(gpu_batch_size=count, **QUALITY_CASES[name]))
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        seconds = time.perf_counter() - start
        stats = model.last_stats
        model.close()
        base = base if base is not None else ppl
        out["rows"].append({
            "case": name, "perplexity": ppl, "vs_first_row": ppl / base - 1, "seconds": seconds,
            "v_bytes_read": stats["v_bytes_read"], "decode_steps": decode_steps,
            "v_bytes_read_per_decode_step": stats["v_bytes_read"] / decode_steps,
            "kv_bytes_stored": stats["kv_bytes_stored"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
        logger.info("%-32s ppl %8.4f  %+6.2f%%  V bytes/step %.0f  (%.0f s)", name, ppl,
                    100 * out["rows"][-1]["vs_first_row"],
                    out["rows"][-1]["v_bytes_read_per_decode_step"], seconds)
        _write(args.out, out)  # keep finished rows if a later one fails
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return out


def run_bytes(args) -> dict:
    """Compressed bytes of an OPT-6.7B-shaped checkpoint, each figure read from what was
    stored: file sizes, the weight store's resident tensors, the KV cache's storage."""
    from make_checkpoint import make_checkpoint
    checkpoint = Path(make_checkpoint("opt-6.7b", Path(args.checkpoint_root) / "opt-6.7b"))
    out = {"checkpoint": str(checkpoint), "checkpoint_fp16_bytes": _file_bytes(checkpoint),
           "prompts": args.prompts, "prompt_len": args.prompt_len,
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    ids = torch.randint(10, 50000, (args.prompts, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    cases = {"reference (uncompressed)": {},
             "compressed (defaults: w4 g64, cache4 g64)": {"compress_weight": True,
                                                           "compress_cache": True}}
    for name, fields in cases.items():
        rss_before = _rss_now()
        # compressed weights resident in RAM; the uncompressed reference reads them from disk
        policy = Policy(gpu_batch_size=args.prompts, w_gpu_percent=0,
                        w_cpu_percent=100 if fields else 0, cache_gpu_percent=0,
                        cache_cpu_percent=100, **fields)
        model = FlexGenForCausalLM.from_pretrained(checkpoint, policy=policy, device="cpu",
                                                   dtype=torch.float32)
        row = {"weights_resident_bytes": model.store.bytes_by_home()["cpu"],
               "rss_growth_after_load_bytes": _rss_now() - rss_before}
        if fields:
            row.update(_weight_bytes(model))
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        row["kv_cache_storage_bytes"] = model.last_stats["kv_bytes_stored"]
        model.close()
        out[name] = row
        logger.info("%s: %s", name, row)
    comp, ref = (out[name] for name in reversed(list(cases)))
    # the reference cache is stored in the fp32 compute dtype: fp16 holds half its bytes
    kv_fp16 = ref["kv_cache_storage_bytes"] // 2
    out["ratios_vs_fp16"] = {
        "compressed_linear_weights_on_disk": comp["linear_compressed_file_bytes"] / comp["linear_fp16_bytes"],
        "compressed_linear_weights_in_memory": comp["linear_resident_bytes"] / comp["linear_fp16_bytes"],
        "whole_model_on_disk": (comp["linear_compressed_file_bytes"] + comp["other_fp16_bytes"])
        / out["checkpoint_fp16_bytes"],
        "whole_model_in_memory": comp["weights_resident_bytes"] / out["checkpoint_fp16_bytes"],
        "kv_cache": comp["kv_cache_storage_bytes"] / kv_fp16,
    }
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    logger.info("ratios vs fp16: %s", out["ratios_vs_fp16"])
    return out


def _weight_bytes(model) -> dict:
    """The compressed (linear) weights and the rest, each in fp16 (source) and as stored."""
    store, compressed = model.store, model.store.compressed
    keys = {spec.key for spec in store.all_specs()}
    linear = [k for k in keys if k in compressed]
    other = [k for k in keys if k not in compressed]
    source = store.index.locations
    return {"linear_tensors": len(linear), "other_tensors": len(other),
            "linear_fp16_bytes": sum(source[k].nbytes for k in linear),
            "linear_compressed_file_bytes": _file_bytes(compressed.directory),
            "linear_resident_bytes": sum(compressed.nbytes(k) for k in linear),
            "other_fp16_bytes": sum(source[k].nbytes for k in other),
            "other_resident_bytes": sum(source[k].nbytes // source[k].dtype.itemsize * model.dtype.itemsize
                                        for k in other)}


def _file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    quality = sub.add_parser("quality")
    quality.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    quality.add_argument("--window", type=int, default=256)
    quality.add_argument("--windows", type=int, default=12)
    quality.add_argument("--cases", nargs="+", choices=list(QUALITY_CASES),
                         help="run these rows only (default: all; the first is the reference)")
    size = sub.add_parser("bytes")
    size.add_argument("--checkpoint-root", default="/tmp/hf_flexgen_ckpt")
    size.add_argument("--prompts", type=int, default=4)
    size.add_argument("--prompt-len", type=int, default=64)
    for p in (quality, size):
        p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_quality(args) if args.mode == "quality" else run_bytes(args)
    _write(args.out, result)
    return 0


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
