"""The one attention function hf_flexgen registers with transformers.

HF attention modules call it with the query and with what the KV cache's ``update``
returned: plain tensors (dense attention on the compute device, through transformers' own
SDPA path so results match HF's), or a cache handle, for decode steps whose cache should be
read where it lives (CPU delegation: only the query moves to the CPU and the output comes
back) and/or only partly (top-K sparse attention: all keys, the selected value rows only).
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "hf_flexgen"


def flexgen_attention(module: torch.nn.Module, query: torch.Tensor, key, value,
                      attention_mask: torch.Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, **kwargs):
    # query: (batch, heads, q_len, head_dim); key/value: (batch, kv_heads, kv_len, head_dim)
    if isinstance(key, torch.Tensor):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    handle = key
    q = query.to(handle.where)
    mask = attention_mask.to(handle.where) if isinstance(attention_mask, torch.Tensor) else attention_mask
    if handle.sparsity < 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = topk_attention(q, handle.keys(), handle.value_rows, mask, scale, handle.sparsity)
        out = out.transpose(1, 2).contiguous()  # (batch, q_len, heads, head_dim), as SDPA returns
    else:
        out, _ = sdpa_attention_forward(module, q, handle.keys(), handle.values(), mask,
                                        dropout=dropout, scaling=scaling, **kwargs)
    return out.to(query.device), None


def topk_attention(query: torch.Tensor, keys: torch.Tensor, value_rows, mask: torch.Tensor | None,
                   scaling: float, sparsity: float) -> torch.Tensor:
    """Attention over the top ``ceil(sparsity * context)`` keys of each query, where context
    is the row's number of real (unmasked) keys; the newest key is always kept. The kept
    weights are renormalized (softmax over the kept scores): dropping keys without
    renormalizing (FlexGen's choice) shrinks every output by the dropped mass, a bias that
    grows with sparsity; renormalized, the output stays a weighted mean of values.

    query (batch, heads, q_len, head_dim); keys (batch, kv_heads, kv_len, head_dim);
    ``value_rows(batch_idx, kv_head_idx, token_idx)`` returns value rows (..., head_dim).
    Returns (batch, heads, q_len, head_dim).
    """
    b, h, q_len, _ = query.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    groups = h // kv_heads
    k = keys.repeat_interleave(groups, dim=1)                        # (b, h, n, d)
    scores = (query @ k.transpose(-1, -2)).float() * scaling         # (b, h, q, n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    context = torch.isfinite(scores).sum(-1, keepdim=True)           # (b, h, q, 1)
    keep = keep_count(sparsity, context).clamp(1, n)
    select = scores.clone()
    select[..., -1] = float("inf")                                   # newest token always kept
    index = select.topk(int(keep.max()), dim=-1).indices             # (b, h, q, k_max)
    kept = torch.arange(index.shape[-1], device=index.device) < keep
    weights = torch.softmax(scores.gather(-1, index).masked_fill(~kept, float("-inf")), dim=-1)
    index = index.masked_fill(~kept, n - 1)  # unused slots point at the newest token: no read
    batch = torch.arange(b, device=index.device).view(b, 1, 1, 1).expand_as(index)
    kv_head = (torch.arange(h, device=index.device) // groups).view(1, h, 1, 1).expand_as(index)
    values = value_rows(batch, kv_head, index)                       # (b, h, q, k_max, d)
    return (weights.unsqueeze(-2).to(values.dtype) @ values).squeeze(-2)  # (b, h, q, d)


def keep_count(sparsity: float, context):
    """ceil(sparsity * context), immune to float noise (0.3 * 10 is 3, not 4)."""
    if isinstance(context, torch.Tensor):
        return torch.ceil(sparsity * context.double() - 1e-6).long()
    return math.ceil(sparsity * context - 1e-6)


def register_attention() -> str:
    """Register the attention function and its mask builder; returns the name to use as
    ``config._attn_implementation``. Safe to call more than once."""
    AttentionInterface.register(ATTENTION_NAME, flexgen_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
