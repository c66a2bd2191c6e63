"""Batch generation over many prompts: length-sorted blocks, results in input order."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    index: int          # position in the input list
    text: str
    new_tokens: int


def render_prompt(tokenizer, item: str | list[dict], use_chat_template: bool) -> str:
    """A string prompt as is (or as one user turn with a chat template); messages templated."""
    if isinstance(item, str) and not use_chat_template:
        return item
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat messages need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_blocks(model, tokenizer, prompts: list[str | list[dict]], use_chat_template: bool = True,
                    **generate_kwargs) -> Iterator[list[Completion]]:
    """Yield each block's completions as soon as the block is done. Prompts are sorted by
    token length so a block holds prompts of similar length (little padding)."""
    texts = [render_prompt(tokenizer, p, use_chat_template) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    block = model.policy.block_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = generate_kwargs.pop("eos_token_id", model.generation_config.eos_token_id)
    for start in range(0, len(order), block):
        rows = order[start:start + block]
        ids, mask = _left_pad([encoded[i] for i in rows], pad)
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                             eos_token_id=eos, **generate_kwargs)
        yield [_completion(i, out[r, ids.shape[1]:], tokenizer, pad, eos) for r, i in enumerate(rows)]


def generate_all(model, tokenizer, prompts, **kwargs) -> list[str]:
    """Completions of every prompt, in input order."""
    out: list[str] = [""] * len(prompts)
    for block in generate_blocks(model, tokenizer, prompts, **kwargs):
        for c in block:
            out[c.index] = c.text
    return out


def _left_pad(rows: Iterable[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(rows)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        if r:
            ids[k, width - len(r):] = torch.tensor(r)
            mask[k, width - len(r):] = 1
    return ids, mask


def _completion(index: int, new: torch.Tensor, tokenizer, pad: int, eos) -> Completion:
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    tokens = new.tolist()
    for n, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[:n]
            break
    return Completion(index, tokenizer.decode(tokens, skip_special_tokens=True), len(tokens))
