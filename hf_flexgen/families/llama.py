"""Llama-style decoders: Llama, Mistral, Qwen2, SmolLM2 (RMSNorm, rotary, grouped-query
attention, tied or untied embeddings, optional sliding-window layers)."""
from __future__ import annotations

from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .base import FamilyAdapter, StepInputs, register, run_module


@register
class LlamaAdapter(FamilyAdapter):
    model_types = ("llama", "mistral", "qwen2")
    layers_path = "model.layers"
    embed_tokens_path = "model.embed_tokens"

    def embed_paths(self):
        return [self.embed_tokens_path]

    def head_paths(self):
        return ["model.norm", "lm_head"]

    def mask_kind(self, j: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[j]
        if getattr(self.config, "sliding_window", None) is not None:  # Mistral: every layer
            return "sliding_attention"
        return "full_attention"

    def embed(self, weights, step: StepInputs):
        hidden = self.embed_tokens(weights, step.input_ids)
        mask_args = dict(config=self.config, inputs_embeds=hidden, attention_mask=step.attention_mask,
                         past_key_values=step.cache, position_ids=step.position_ids)
        kinds = {self.mask_kind(j) for j in range(self.num_layers)}
        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = create_causal_mask(**mask_args)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        rotary = self.model.model.rotary_emb(hidden, position_ids=step.position_ids)
        step.layer_kwargs = {"attention_masks": masks, "position_embeddings": rotary}
        return hidden
