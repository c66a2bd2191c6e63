"""Compression: quality (perplexity on real text) and measured bytes.

quality: SmolLM2-135M-Instruct (the built-in model), fp32 on CPU, perplexity of the GNU GPL
v3 text shipped by Debian (/usr/share/common-licenses/GPL-3: real English prose, written by
people, neither by the model nor for this test). Windows of --window tokens are scored
token by token through hf_flexgen's block schedule (FlexGenForCausalLM.score): the first
token of each window is the prompt, every later token is teacher-forced, so a compressed KV
cache is exercised exactly as in generation.

bytes: an OPT-6.7B-shaped random checkpoint (fp16): compressed weights on disk and in memory,
and the KV cache of a real prefill, versus fp16.

    python benchmarks/compression.py quality --out benchmarks/results/compression_quality.json
    python benchmarks/compression.py bytes --out benchmarks/results/compression_bytes.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_flexgen import CompressionConfig, FlexGenForCausalLM, Policy  # noqa: E402

logger = logging.getLogger("compression")
C = CompressionConfig
QUALITY_CASES = {
    "none": {},
    "w4 g32 input-dim": dict(compress_weight=True, comp_weight_config=C(4, 32, 1)),
    "w4 g64 input-dim": dict(compress_weight=True, comp_weight_config=C(4, 64, 1)),
    "w4 g32 output-dim": dict(compress_weight=True, comp_weight_config=C(4, 32, 0)),
    "w4 g64 output-dim (default)": dict(compress_weight=True),
    "cache4 g32": dict(compress_cache=True, comp_cache_config=C(4, 32, -1)),
    "cache4 g64 (default)": dict(compress_cache=True),
    "w4 + cache4 (defaults)": dict(compress_weight=True, compress_cache=True),
    "w8 + cache8 g64": dict(compress_weight=True, comp_weight_config=C(8, 64, 1),
                            compress_cache=True, comp_cache_config=C(8, 64, -1)),
}


def perplexity(model, windows: torch.Tensor) -> float:
    logprobs = model.score(windows[:, :1], None, windows[:, 1:])
    return math.exp(-logprobs.mean().item())


def run_quality(args) -> dict:
    from transformers import AutoTokenizer

    from hf_flexgen.default_model import default_model_dir
    directory = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = Path(args.text).read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    count = min(args.windows, len(ids) // args.window)
    windows = torch.tensor(ids[:count * args.window]).view(count, args.window)
    logger.info("text: %s, %d tokens, %d windows of %d (%d scored tokens)", args.text, len(ids),
                count, args.window, count * (args.window - 1))
    rows, base = [], None
    for name, fields in QUALITY_CASES.items():
        model = FlexGenForCausalLM.from_pretrained(directory, policy=Policy(gpu_batch_size=count, **fields))
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        model.close()
        base = base if base is not None else ppl
        rows.append({"case": name, "perplexity": ppl, "vs_uncompressed": ppl / base - 1,
                     "seconds": time.perf_counter() - start})
        logger.info("%-28s ppl %8.4f  %+6.2f%%", name, ppl, 100 * rows[-1]["vs_uncompressed"])
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)", "text": args.text,
            "scored_tokens": count * (args.window - 1), "rows": rows}


def run_bytes(args) -> dict:
    from make_checkpoint import make_checkpoint
    checkpoint = make_checkpoint("opt-6.7b", Path(args.checkpoint_root) / "opt-6.7b")
    fp16_bytes = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))
    out = {"checkpoint_fp16_bytes": fp16_bytes}
    for name, fields in {"fp16 reference": {}, "compressed": dict(compress_weight=True, compress_cache=True)}.items():
        rss_before = _rss_now()
        policy = Policy(gpu_batch_size=4, w_gpu_percent=0, w_cpu_percent=100 if fields else 0,
                        cache_gpu_percent=0, cache_cpu_percent=100, **fields)
        model = FlexGenForCausalLM.from_pretrained(checkpoint, policy=policy, device="cpu",
                                                   dtype=torch.float32)
        row = {"weights_in_memory_bytes": model.store.bytes_by_home()["cpu"],
               "rss_growth_bytes": _rss_now() - rss_before}
        if fields:
            row["weights_on_disk_bytes"] = sum(p.stat().st_size for p in
                                               model.store.compressed.directory.glob("*.safetensors"))
        ids = torch.randint(10, 50000, (4, args.prompt_len), generator=torch.Generator().manual_seed(0))
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        row["kv_cache_bytes"] = model.last_stats["kv_bytes_stored"]
        model.close()
        out[name] = row
        logger.info("%s: %s", name, row)
    comp, ref = out["compressed"], out["fp16 reference"]
    # the reference keeps weights on disk (fp16) and its KV cache in the fp32 compute dtype
    out["ratios_vs_fp16"] = {
        "weights_on_disk": comp["weights_on_disk_bytes"] / fp16_bytes,
        "weights_in_memory": comp["weights_in_memory_bytes"] / fp16_bytes,
        "kv_cache": comp["kv_cache_bytes"] / (ref["kv_cache_bytes"] / 2),
    }
    logger.info("ratios vs fp16: %s", out["ratios_vs_fp16"])
    return out


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
    size = sub.add_parser("bytes")
    size.add_argument("--checkpoint-root", default="/tmp/hf_flexgen_ckpt")
    size.add_argument("--prompt-len", type=int, default=256)
    for p in (quality, size):
        p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_quality(args) if args.mode == "quality" else run_bytes(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
