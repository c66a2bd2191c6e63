"""hf_flexgen: FlexGen-style high-throughput offloaded generation for Hugging Face models."""
from .modeling import FlexGenForCausalLM
from .pipeline import pipeline
from .policy import CompressionConfig, Policy

__all__ = ["FlexGenForCausalLM", "Policy", "CompressionConfig", "pipeline"]
__version__ = "0.1.0"
