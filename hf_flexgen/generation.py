"""Decoding rules shared by every block: HF's own logits processors (in HF's order), greedy
or sampled choice, EOS and padding after it exactly as ``transformers``' ``generate``."""
from __future__ import annotations

import copy
import logging

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper)

logger = logging.getLogger(__name__)

# Generation options the block schedule cannot honour yet; a non-default value is refused.
UNSUPPORTED = ("num_beams", "num_beam_groups", "penalty_alpha", "no_repeat_ngram_size",
               "bad_words_ids", "sequence_bias", "typical_p", "epsilon_cutoff", "eta_cutoff",
               "diversity_penalty", "encoder_repetition_penalty", "forced_bos_token_id",
               "forced_eos_token_id", "guidance_scale", "prompt_lookup_num_tokens",
               "assistant_early_exit", "max_time", "stop_strings", "top_h")


def resolve_generation_config(base: GenerationConfig, generation_config: GenerationConfig | None,
                              **kwargs) -> GenerationConfig:
    """HF's precedence: the model's defaults, then ``generation_config``, then kwargs."""
    config = copy.deepcopy(generation_config if generation_config is not None else base)
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unexpected arguments: {', '.join(sorted(unknown))}")
    defaults = GenerationConfig()
    for name in UNSUPPORTED:
        if getattr(config, name, None) != getattr(defaults, name, None):
            raise NotImplementedError(
                f"generation option {name}={getattr(config, name)!r} is not supported by "
                f"hf_flexgen yet; leave it at {getattr(defaults, name, None)!r}")
    return config


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_id(config: GenerationConfig) -> int | None:
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    eos = eos_ids(config)
    if eos:
        logger.info("pad_token_id not set: using eos_token_id %d for padding, as HF does", eos[0])
        return eos[0]
    return None


def max_new_tokens(config: GenerationConfig, prompt_len: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(0, int(config.max_length) - prompt_len)


class TokenChooser:
    """Turns the logits of one micro-batch into its next tokens, HF's way."""

    def __init__(self, config: GenerationConfig, prompt_len: int, device: torch.device):
        self.config, self.device = config, device
        self.eos = torch.tensor(eos_ids(config), dtype=torch.long, device=device)
        self.pad = pad_id(config)
        processors = LogitsProcessorList()
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
        if len(self.eos):
            if config.min_length:
                processors.append(MinLengthLogitsProcessor(config.min_length, self.eos, device=device))
            if config.min_new_tokens:
                processors.append(MinNewTokensLengthLogitsProcessor(
                    prompt_len, config.min_new_tokens, self.eos, device=device))
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None and config.top_k != 0:
                processors.append(TopKLogitsWarper(top_k=config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=config.top_p))
            if config.min_p is not None:
                processors.append(MinPLogitsWarper(min_p=config.min_p))
        self.processors = processors

    def scores(self, sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Processed scores (batch, vocab) for the next token after ``sequences``."""
        return self.processors(sequences, logits.to(torch.float32))

    def choose(self, scores: torch.Tensor, unfinished: torch.Tensor):
        """Next tokens (pad for finished rows) and the updated ``unfinished`` flags."""
        if self.config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if self.pad is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, self.pad))
        if len(self.eos):
            unfinished = unfinished & ~torch.isin(tokens, self.eos)
        return tokens, unfinished
