"""policy="auto": hardware profile, cost model and the linear program that picks a Policy."""
from .cost_model import Estimate, ModelLayout, Workload, estimate
from .hardware import HardwareProfile, load_or_measure
from .limits import parse_max_memory
from .solver import Plan, PlacementError, describe, plan

__all__ = ["Estimate", "HardwareProfile", "ModelLayout", "PlacementError", "Plan", "Workload",
           "describe", "estimate", "load_or_measure", "parse_max_memory", "plan"]
