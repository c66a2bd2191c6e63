"""What every family adapter provides, and the registry that picks one for a config.

A model is cut into stages: the embedding stage (token ids -> hidden states, plus the
per-step inputs every layer needs: mask, positions, rotary embeddings), one stage per
decoder layer (HF's own layer module, weights supplied per call), and the head stage
(final norm -> logits of the last position).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from transformers.cache_utils import Cache

from ..memory.weights import StoredTable


@dataclass
class StepInputs:
    """What one micro-batch feeds the model for one token step."""

    input_ids: torch.Tensor        # (batch, new_tokens)
    attention_mask: torch.Tensor   # (batch, past + new_tokens), 1 = real token
    position_ids: torch.Tensor     # (batch, new_tokens)
    cache: Cache | None            # None: a forward pass that keeps no KV cache (scoring)
    layer_kwargs: dict = field(default_factory=dict)  # filled by the embedding stage


def run_module(root: torch.nn.Module, path: str, weights: dict[str, torch.Tensor], *args, **kwargs):
    """Call the submodule at ``path`` with its parameters taken from ``weights``."""
    module = root.get_submodule(path)
    prefix = path + "."
    local = {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}
    return functional_call(module, local, args, kwargs)


class FamilyAdapter:
    """Subclasses name their module paths and build the per-step layer inputs."""

    model_types: tuple[str, ...] = ()
    layers_path: str = ""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed_paths(self) -> list[str]:
        raise NotImplementedError

    def head_paths(self) -> list[str]:
        raise NotImplementedError

    def stage_paths(self) -> list[list[str]]:
        """Module paths of every stage: embedding, each layer, head."""
        layers = [[f"{self.layers_path}.{j}"] for j in range(self.num_layers)]
        return [self.embed_paths(), *layers, self.head_paths()]

    def stage_parameters(self) -> list[list[str]]:
        """HF parameter names used by each stage (tied weights appear in both stages)."""
        out = []
        for paths in self.stage_paths():
            names = []
            for path in paths:
                module = self.model.get_submodule(path)
                names += [n for n, _ in module.named_parameters(prefix=path, remove_duplicate=False)]
            out.append(names)
        return out

    def tied_parameters(self) -> dict[str, str]:
        """Parameter name -> the name whose checkpoint tensor it shares."""
        if getattr(self.config, "tie_word_embeddings", False):
            return {"lm_head.weight": self.embed_tokens_path + ".weight"}
        return {}

    embed_tokens_path: str = ""

    def embed_tokens(self, weights: dict, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> token embeddings (a :class:`StoredTable` casts only these rows)."""
        table = weights.get(self.embed_tokens_path + ".weight")
        if isinstance(table, StoredTable):
            return table.embedding(ids)
        return run_module(self.model, self.embed_tokens_path, weights, ids)

    def embed(self, weights: dict, step: StepInputs) -> torch.Tensor:
        """Token ids -> hidden states; fills ``step.layer_kwargs`` for the decoder layers."""
        raise NotImplementedError

    def layer(self, j: int, weights: dict, hidden: torch.Tensor, step: StepInputs) -> torch.Tensor:
        kwargs = dict(step.layer_kwargs)
        masks = kwargs.pop("attention_masks")
        out = run_module(self.model, f"{self.layers_path}.{j}", weights, hidden,
                         attention_mask=masks[self.mask_kind(j)], position_ids=step.position_ids,
                         past_key_values=step.cache, use_cache=True, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def mask_kind(self, j: int) -> str:
        return "full_attention"

    def head(self, weights: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (batch, seq, hidden) -> logits of the last position (batch, vocab).
        The head acts per position, so the last one is cut out first, and made contiguous:
        a strided slice sends the LM head's matmul down a path about 10x slower on CPU."""
        last = hidden[:, -1, :].contiguous()
        return self.head_logits(weights, self.head_hidden(weights, last))

    # Scoring reads the logits of chosen positions only: the head stage split in two. Every
    # family's head_paths() ends with the LM head; the modules before it act per position.
    def head_hidden(self, weights: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (batch, seq, hidden) -> what the LM head reads (final norm etc.)."""
        for path in self.head_paths()[:-1]:
            hidden = run_module(self.model, path, weights, hidden)
        return hidden

    def head_logits(self, weights: dict, hidden: torch.Tensor) -> torch.Tensor:
        """``head_hidden`` output (..., hidden) -> logits (..., vocab)."""
        path = self.head_paths()[-1]
        table = weights.get(path + ".weight")
        if isinstance(table, StoredTable):
            bias = weights.get(path + ".bias")
            logits = table.linear(hidden)
            return logits if bias is None else logits + bias
        return run_module(self.model, path, weights, hidden)


_REGISTRY: list[type[FamilyAdapter]] = []


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    _REGISTRY.append(cls)
    return cls


def supported_model_types() -> list[str]:
    from . import llama, opt  # noqa: F401  (registers the adapters)
    return sorted(t for cls in _REGISTRY for t in cls.model_types)


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    model_type = model.config.model_type
    supported = supported_model_types()
    for cls in _REGISTRY:
        if model_type in cls.model_types:
            return cls(model)
    raise ValueError(f"model_type {model_type!r} is not supported by hf_flexgen; "
                     f"supported: {', '.join(supported)}")
