"""Tiny random model configs of every supported family, and prompt helpers for tests."""
from __future__ import annotations

import torch
from transformers import (LlamaConfig, MistralConfig, OPTConfig,
                          Qwen2Config)

VOCAB = 128
PAD, BOS, EOS = 1, 2, 3

TINY_CONFIGS = {
    "opt-pre-ln": lambda: OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
    "opt-post-ln-project": lambda: OPTConfig(  # the opt-350m layout
        hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
        word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=128,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
    "llama-gqa": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=6,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
    "qwen2": lambda: Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
}



def left_padded_prompts(count: int, max_len: int, seed: int = 0):
    """Random prompts of mixed lengths (1..max_len), left-padded like a HF tokenizer does."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=g)
    lengths[0] = max_len
    ids = torch.full((count, max_len), PAD)
    mask = torch.zeros(count, max_len, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, max_len - n:] = torch.randint(4, VOCAB, (n,), generator=g)
        mask[row, max_len - n:] = 1
    return ids, mask
