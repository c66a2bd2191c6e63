"""Tensor homes: checkpoint files read in place, the weight store, the KV cache."""
