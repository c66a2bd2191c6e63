"""One small adapter per model family: how to split an HF model into stages."""
from .base import FamilyAdapter, StepInputs, adapter_for, supported_model_types

__all__ = ["FamilyAdapter", "StepInputs", "adapter_for", "supported_model_types"]
