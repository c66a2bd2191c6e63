"""What the HELM client asks of hf_flexgen, free of HELM types (testable without HELM).

A raw request is a dict (HELM caches responses under it): ``prompt``, ``temperature``,
``num_completions``, ``max_tokens``, ``top_p``, ``echo_prompt``, ``stop_sequences``. Requests
with the same generation arguments are run together: prompts sorted by length into blocks of
``policy.block_size`` for generation, and one scoring pass (``hf_flexgen.scoring``) for the
prompt log-probs that ``echo_prompt`` asks for. Responses mirror HELM's own Hugging Face
client: per completion the full decoded text (cut at the first EOS), each token's text and
log-prob; HELM's ``truncate_sequence`` then cuts at stop sequences.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from hf_flexgen.pipeline import left_pad, plan_blocks
from hf_flexgen.scoring import score_continuations

logger = logging.getLogger(__name__)

GENERATION_KEYS = ("temperature", "num_completions", "max_tokens", "top_p", "echo_prompt")


def batch_key(raw: dict) -> tuple:
    """Requests with equal keys can share blocks."""
    return tuple(raw[k] for k in GENERATION_KEYS)


def serve(model, tokenizer, raws: Sequence[dict]) -> list[dict]:
    """Responses to raw requests that share ``batch_key``, in order."""
    if len({batch_key(r) for r in raws}) > 1:
        raise ValueError("serve() takes requests with the same generation arguments only")
    encoded = [tokenizer(r["prompt"]).input_ids for r in raws]
    if any(not ids for ids in encoded):
        raise ValueError("empty prompt: HELM requests need at least one prompt token")
    first = raws[0]
    prompt_logprobs = _prompt_logprobs(model, encoded) if first["echo_prompt"] else None
    if first["max_tokens"] > 0:
        generated = _generate(model, tokenizer, encoded, first)
    else:
        generated = [[([], [])] * first["num_completions"] for _ in raws]
    responses = []
    for i, ids in enumerate(encoded):
        completions = []
        for new_ids, logprobs in generated[i]:
            tokens = (list(ids) if first["echo_prompt"] else []) + new_ids
            completions.append({
                "text": tokenizer.decode(tokens),
                "tokens": [tokenizer.decode([t]) for t in tokens],
                "logprobs": (prompt_logprobs[i] if first["echo_prompt"] else []) + logprobs,
            })
        responses.append({"completions": completions, "input_length": len(ids)})
    return responses


def _prompt_logprobs(model, encoded: list[list[int]]) -> list[list[float]]:
    """Log-prob of every prompt token given the ones before; the first gets 0.0 (HELM's
    convention: nothing to condition on)."""
    out: list[list[float] | None] = [[0.0] if len(ids) == 1 else None for ids in encoded]
    longer = [i for i, ids in enumerate(encoded) if len(ids) > 1]
    scores = score_continuations(model, [(encoded[i][:1], encoded[i][1:]) for i in longer])
    for i, s in zip(longer, scores):
        out[i] = [0.0, *s.logprobs]
    return out


def _generate(model, tokenizer, encoded: list[list[int]], raw: dict) -> list[list[tuple[list[int], list[float]]]]:
    """Per prompt, ``num_completions`` times (new token ids up to the first EOS, their log-probs
    under the distribution sampled from)."""
    greedy = raw["temperature"] == 0
    if greedy and raw["num_completions"] > 1:
        logger.info("temperature 0 with num_completions=%d: the completions are identical",
                    raw["num_completions"])
    sampling = {} if greedy else {"temperature": raw["temperature"], "top_p": raw["top_p"]}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = raw["num_completions"]
    out: list[list | None] = [None] * len(encoded)
    rows_per_block = max(1, model.policy.block_size // n)
    for block in plan_blocks([len(e) for e in encoded], rows_per_block):
        ids, mask = left_pad([encoded[i] for i in block], pad)
        result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=raw["max_tokens"],
                                do_sample=not greedy, num_return_sequences=n, pad_token_id=pad,
                                return_dict_in_generate=True, output_scores=True, **sampling)
        scores = torch.stack(result.scores, dim=1).float()            # (rows * n, steps, vocab)
        new = result.sequences[:, ids.shape[1]:]                        # (rows * n, steps)
        logprobs = torch.log_softmax(scores, -1).gather(2, new[..., None]).squeeze(-1)
        for r, i in enumerate(block):
            out[i] = []
            for c in range(r * n, (r + 1) * n):
                tokens = new[c].tolist()
                end = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
                out[i].append((tokens[:end], logprobs[c, :end].tolist()))
    return out
