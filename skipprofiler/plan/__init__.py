"""The plan stage: a skip plan's data model and its one rule (`model`, standard library only), and plan files on disk
(`io`: validation reporting every problem, canonical YAML, the linear maps' safetensors file, the JSON schema)."""

from .io import PlanError, dump_plan, load_plan, save_plan, validate_plan_dict
from .model import LinearMaps, PlanFile, Router, SkipPlan, fraction_pattern, is_eligible

__all__ = ["SkipPlan", "PlanFile", "Router", "LinearMaps", "PlanError", "is_eligible", "fraction_pattern",
           "load_plan", "dump_plan", "save_plan", "validate_plan_dict"]
