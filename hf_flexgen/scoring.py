"""Scoring mode: log-likelihoods of given continuations, and rolling log-likelihoods of whole
texts, the two requests evaluation harnesses make most.

Each (context, continuation) pair becomes one input row, ``(context + continuation)[:-1]``
cut from the left to ``max_length`` tokens (as lm-evaluation-harness does). Rows are sorted
by length into blocks of ``policy.block_size`` and every block is one forward pass through
the layer-major schedule (``BlockEngine.run_forward``): each stage's weights are fetched once
per block, activations live in their policy home, and no KV cache is kept. At the head only
the positions that predict continuation tokens are normed and projected, ``logits_chunk``
rows at a time, so a (batch, seq, vocab) tensor is never built.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .engine import EngineStats
from .families import StepInputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContinuationScore:
    """Per-token results for one scored continuation (or one whole text, when rolling)."""

    tokens: tuple[int, ...]         # the scored tokens
    logprobs: tuple[float, ...]     # log P(token | everything before it), one per token
    greedy_tokens: tuple[int, ...]  # the most likely token at each of those positions

    @property
    def total(self) -> float:
        """Log-likelihood of the whole continuation."""
        return float(sum(self.logprobs))

    @property
    def greedy(self) -> tuple[bool, ...]:
        """Per token: is it the most likely one?"""
        return tuple(g == t for g, t in zip(self.greedy_tokens, self.tokens))

    @property
    def is_greedy(self) -> bool:
        """Would greedy decoding have produced the whole continuation?"""
        return all(self.greedy)


@dataclass(frozen=True)
class _Row:
    input_ids: tuple[int, ...]  # what the model reads
    targets: tuple[int, ...]    # predicted by the last len(targets) positions


def default_max_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def build_row(context: Sequence[int], continuation: Sequence[int], max_length: int | None,
              name: str = "pair") -> _Row:
    context, continuation = list(context), list(continuation)
    if not context:
        raise ValueError(f"{name}: the context is empty; start it with a prefix token (BOS or "
                         "EOS) so the first continuation token has something to condition on")
    if not continuation:
        raise ValueError(f"{name}: the continuation is empty: there is nothing to score")
    if max_length is not None and len(continuation) > max_length:
        raise ValueError(f"{name}: the continuation has {len(continuation)} tokens, more than "
                         f"max_length={max_length}; score it with score_rolling instead")
    inputs = (context + continuation)[:-1]
    if max_length is not None:
        inputs = inputs[-max_length:]  # the context loses its oldest tokens
    return _Row(tuple(inputs), tuple(continuation))


def rolling_windows(num_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """How a text of ``num_tokens`` tokens, read after one prefix token, is scored in passes
    of at most ``max_length`` input tokens: ``(input_start, first, end)`` per pass, in
    coordinates of ``[prefix] + tokens``, predicting ``tokens[first:end]`` from
    ``([prefix] + tokens)[input_start:end]``. Every token is predicted once; each pass
    predicts up to ``max_length`` tokens and reads as much earlier text as still fits
    (the same windows as lm-evaluation-harness's rolling log-likelihood)."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    windows, first = [], 0
    while first < num_tokens:
        end = min(num_tokens, first + max_length)
        windows.append((max(0, end - max_length), first, end))
        first = end
    return windows


def _step_inputs(rows: list[_Row], pad: int, device: torch.device) -> StepInputs:
    """Right-padded micro-batch: real tokens start at position 0 of every row."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, :len(r.input_ids)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return StepInputs(ids.to(device), mask.to(device), positions.to(device), cache=None)


def _score_micro_batch(adapter, weights, hidden: torch.Tensor, rows: list[_Row],
                       logits_chunk: int) -> list[ContinuationScore]:
    """hidden (batch, seq, hidden): decoder output of a right-padded micro-batch."""
    batch_idx, pos_idx, targets = [], [], []
    for b, r in enumerate(rows):
        n, length = len(r.targets), len(r.input_ids)
        batch_idx += [b] * n
        pos_idx += range(length - n, length)
        targets += r.targets
    device = hidden.device
    picked = hidden[torch.tensor(batch_idx, device=device), torch.tensor(pos_idx, device=device)]
    picked = adapter.head_hidden(weights, picked[None])[0]              # (positions, hidden)
    target = torch.tensor(targets, device=device)
    logprobs, greedy = [], []
    for s in range(0, len(target), logits_chunk):
        logits = adapter.head_logits(weights, picked[s:s + logits_chunk])  # (chunk, vocab)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logprobs.append(logp.gather(1, target[s:s + logits_chunk, None]).squeeze(1).cpu())
        greedy.append(logits.argmax(dim=-1).cpu())
    logprobs, greedy = torch.cat(logprobs).tolist(), torch.cat(greedy).tolist()
    out, start = [], 0
    for r in rows:
        n = len(r.targets)
        out.append(ContinuationScore(r.targets, tuple(logprobs[start:start + n]),
                                     tuple(greedy[start:start + n])))
        start += n
    return out


@torch.inference_mode()
def score_rows(model, rows: list[_Row], logits_chunk: int = 1024,
               progress: bool = False) -> list[ContinuationScore]:
    """Score every row in length-sorted blocks; results in input order."""
    if logits_chunk < 1:
        raise ValueError(f"logits_chunk must be a positive integer, got {logits_chunk!r}")
    policy, engine = model.policy, model.engine
    pad = model.generation_config.pad_token_id
    pad = int(pad[0] if isinstance(pad, (list, tuple)) else pad) if pad is not None else 0
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))
    results: list[ContinuationScore | None] = [None] * len(rows)
    engine.stats = EngineStats()
    blocks = [order[s:s + policy.block_size] for s in range(0, len(order), policy.block_size)]
    for block in tqdm(blocks, desc="scoring blocks", disable=not progress):
        micro = [block[s:s + policy.gpu_batch_size]
                 for s in range(0, len(block), policy.gpu_batch_size)]
        steps = [_step_inputs([rows[i] for i in m], pad, model.device) for m in micro]

        def on_head(k, weights, hidden, micro=micro):
            scored = _score_micro_batch(model.adapter, weights, hidden,
                                        [rows[i] for i in micro[k]], logits_chunk)
            for i, s in zip(micro[k], scored):
                results[i] = s

        engine.run_forward(steps, on_head)
        logger.debug("scored a block of %d rows (longest input %d tokens)", len(block),
                     len(rows[block[0]].input_ids))
    model.record_stats()
    return results


def score_continuations(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        max_length: int | None = None, logits_chunk: int = 1024,
                        progress: bool = False) -> list[ContinuationScore]:
    """Log-probabilities of each continuation given its context (token ids), in input order.

    ``max_length``: most input tokens per row (default: the model's
    ``max_position_embeddings``); longer contexts lose their oldest tokens."""
    max_length = max_length or default_max_length(model.config)
    rows = [build_row(c, t, max_length, f"pair {i}") for i, (c, t) in enumerate(pairs)]
    return score_rows(model, rows, logits_chunk, progress)


def score_rolling(model, texts: Sequence[Sequence[int]], prefix_token: int,
                  max_length: int | None = None, logits_chunk: int = 1024,
                  progress: bool = False) -> list[ContinuationScore]:
    """Every token of each text scored (perplexity-style), the first one after
    ``prefix_token``, in passes of at most ``max_length`` tokens (see ``rolling_windows``).
    One result per text covering all its tokens (``.total``: the text's log-likelihood)."""
    max_length = max_length or default_max_length(model.config)
    if max_length is None:
        raise ValueError("score_rolling needs max_length: the model config has no "
                         "max_position_embeddings")
    rows, owner = [], []
    for t, tokens in enumerate(texts):
        full = [int(prefix_token), *tokens]
        for start, first, end in rolling_windows(len(tokens), max_length):
            rows.append(_Row(tuple(full[start:end]), tuple(full[first + 1:end + 1])))
            owner.append(t)
    scored = score_rows(model, rows, logits_chunk, progress)
    parts: list[list[ContinuationScore]] = [[] for _ in texts]
    for t, s in zip(owner, scored):
        parts[t].append(s)
    return [ContinuationScore(tuple(x for p in ps for x in p.tokens),
                              tuple(x for p in ps for x in p.logprobs),
                              tuple(x for p in ps for x in p.greedy_tokens)) for ps in parts]


__all__ = ["ContinuationScore", "rolling_windows", "score_continuations", "score_rolling"]
