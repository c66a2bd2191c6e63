"""hf_flexgen: FlexGen-style high-throughput offloaded generation for Hugging Face models."""
from .modeling import FlexGenForCausalLM
from .policy import CompressionConfig, Policy

__all__ = ["FlexGenForCausalLM", "Policy", "CompressionConfig"]
__version__ = "0.1.0"
