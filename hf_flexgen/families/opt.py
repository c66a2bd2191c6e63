"""OPT: learned positions (offset 2), optional project_in/out (350m), pre- or post-LN."""
from __future__ import annotations

from transformers.masking_utils import create_causal_mask

from .base import FamilyAdapter, StepInputs, register, run_module

DECODER = "model.decoder"


@register
class OPTAdapter(FamilyAdapter):
    model_types = ("opt",)
    layers_path = f"{DECODER}.layers"
    embed_tokens_path = f"{DECODER}.embed_tokens"

    def _has(self, name: str) -> bool:
        return getattr(self.model.model.decoder, name, None) is not None

    def embed_paths(self):
        paths = [self.embed_tokens_path, f"{DECODER}.embed_positions"]
        return paths + ([f"{DECODER}.project_in"] if self._has("project_in") else [])

    def head_paths(self):
        paths = [f"{DECODER}.{m}" for m in ("final_layer_norm", "project_out") if self._has(m)]
        return paths + ["lm_head"]

    def embed(self, weights, step: StepInputs):
        embeds = self.embed_tokens(weights, step.input_ids)
        past = step.cache.get_seq_length() if step.cache is not None else 0  # None: scoring
        positions = run_module(self.model, f"{DECODER}.embed_positions", weights,
                               step.attention_mask, past, position_ids=step.position_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=embeds,
                                  attention_mask=step.attention_mask, past_key_values=step.cache)
        if self._has("project_in"):
            embeds = run_module(self.model, f"{DECODER}.project_in", weights, embeds)
        step.layer_kwargs = {"attention_masks": {"full_attention": mask}}
        return embeds + positions.to(embeds.device)
