"""The plan stage: a skip plan's data model and its one rule (`model`, standard library only), validation reporting
every problem at once (`validate`), raw mapping <-> data model (`convert`), the safetensors file of linear maps and
neuron subsets (`weights`) and canonical YAML files (`io`)."""

from .convert import plan_from_dict, plan_to_dict, skip_plan_problems
from .io import dump_plan, load_plan, read_plan_dict, save_plan
from .model import LinearMaps, NeuronSubsets, PlanError, PlanFile, Router, SkipPlan, fraction_pattern, is_eligible
from .validate import (eligibility_problems, fingerprint_problems, linear_map_problems, neuron_problems,
                       neuron_subset_problems, schema_path, validate_plan_dict)
from .weights import load_plan_tensors, weights_file_for, write_plan_tensors

__all__ = ["SkipPlan", "PlanFile", "Router", "LinearMaps", "NeuronSubsets", "PlanError", "is_eligible",
           "fraction_pattern", "load_plan", "dump_plan", "save_plan", "read_plan_dict", "plan_from_dict",
           "plan_to_dict", "validate_plan_dict", "skip_plan_problems", "eligibility_problems", "fingerprint_problems",
           "linear_map_problems", "neuron_problems", "neuron_subset_problems", "schema_path", "load_plan_tensors",
           "write_plan_tensors", "weights_file_for"]
