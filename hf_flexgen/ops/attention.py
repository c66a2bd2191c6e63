"""The one attention function hf_flexgen registers with transformers.

HF attention modules call it with the query and with what the KV cache's ``update``
returned. It decides where and how attention is computed; today: dense attention on the
compute device, through transformers' own SDPA path so results match HF's.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "hf_flexgen"


def flexgen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs):
    # query: (batch, heads, q_len, head_dim); key/value: (batch, kv_heads, kv_len, head_dim)
    return sdpa_attention_forward(module, query, key, value, attention_mask,
                                  dropout=dropout, scaling=scaling, **kwargs)


def register_attention() -> str:
    """Register the attention function and its mask builder; returns the name to use as
    ``config._attn_implementation``. Safe to call more than once."""
    AttentionInterface.register(ATTENTION_NAME, flexgen_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
