"""Plan files v1 on disk: canonical YAML load/dump (validation: `validate`, the mapping: `convert`, the file of linear
maps and neuron subsets: `weights`).

The format is documented in docs/plan-format.md; `skipprofiler/schema/plan-v1.json` describes the same shape for
editors and other tools. This module imports only the standard library and yaml (the runtime loads plans with it),
and safetensors for the maps of `compensation: linear` and the subsets of `neurons`.

Canonical YAML (what `dump_plan` writes): fixed key order, plan keys that equal the file's `defaults` left out, a
single `tau` written as one number, floats in Python's shortest round-trip repr, lists of scalars in flow style, free-form
mappings (`fit`, extra `provenance` keys) sorted by key. `dump_plan(load_plan(text)) == text` for every canonical text;
comments and non-canonical spelling are not preserved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_text_atomic
from .convert import plan_from_dict, plan_to_dict
from .model import PlanError, PlanFile
from .validate import validate_plan_dict
from .weights import load_plan_tensors, write_plan_tensors

__all__ = ["load_plan", "dump_plan", "save_plan", "read_plan_dict", "PlanError"]


class _CanonicalDumper(yaml.SafeDumper):
    """Mappings in insertion order, lists of scalars (and skip_layers entries) in flow style, the rest in block style."""


def _is_flat(value: Any) -> bool:
    return not isinstance(value, (list, dict)) or (isinstance(value, dict) and all(_is_flat(v) and not isinstance(v, dict)
                                                                                    for v in value.values()))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=all(_is_flat(v) for v in data))


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=False)


_CanonicalDumper.add_representer(list, _represent_list)
_CanonicalDumper.add_representer(dict, _represent_dict)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: let the base constructor report it
            duplicate = False
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def dump_plan(plan: PlanFile) -> str:
    """Canonical YAML text of a plan (validated first: a plan that could not be loaded back is never written).
    Linear maps and neuron subsets must have been written (`save_plan`) first: the YAML records their file and hash."""
    unsaved = [f"{what} of {name}" for name, p in plan.named_plans()
               for what, entry in (("the linear maps", p.linear), ("the neuron subsets", p.neurons))
               if entry is not None and not entry.file]
    if unsaved:
        raise PlanError(f"{', '.join(unsaved)} are not saved yet: write the plan with save_plan (it writes their "
                        "safetensors file beside the YAML)")
    d = plan_to_dict(plan)
    problems = validate_plan_dict(d)
    if problems:
        raise PlanError(problems)
    return yaml.dump(d, Dumper=_CanonicalDumper, sort_keys=False, allow_unicode=True, width=120, indent=2)


def _yaml_error_line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"malformed YAML: {where}{what}"


def read_plan_dict(path_or_text: str | Path) -> tuple[Any, str]:
    """Parse YAML from a path (Path, or a one-line str naming a file) or from YAML text; returns (data, source)."""
    text, source = _read_text(path_or_text)
    try:
        return yaml.load(text, Loader=_StrictLoader), source
    except yaml.YAMLError as e:
        raise PlanError(f"{source}: {_yaml_error_line(e)}") from None


def _read_text(path_or_text: str | Path) -> tuple[str, str]:
    looks_like_path = isinstance(path_or_text, Path) or ("\n" not in path_or_text and (
        path_or_text.endswith((".yaml", ".yml")) or os.path.exists(path_or_text)))
    if not looks_like_path:
        return str(path_or_text), "<text>"
    path = Path(path_or_text)
    if not path.is_file():
        raise PlanError(f"plan file not found: {path}")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError:
        raise PlanError(f"{path} is not a YAML plan but a binary file (a profile? read those with "
                        "`skipprof inspect`)") from None
    except OSError as e:
        raise PlanError(f"cannot read plan file {path}: {e}") from None


def load_plan(path_or_text: str | Path, num_layers: int | None = None, fingerprint: dict | None = None,
              base_dir: str | Path | None = None) -> PlanFile:
    """Load and validate a plan (file path or YAML text); raises PlanError listing every problem.

    Linear maps (`compensation: linear`) and neuron subsets (`neurons`) are read from their file, relative to the plan
    file (YAML text: to `base_dir`, default the working directory), and checked: present, the recorded sha256, shapes
    and dtype, the widths the plan records."""
    data, source = read_plan_dict(path_or_text)
    plan = plan_from_dict(data, num_layers, fingerprint)
    if source != "<text>":
        base_dir = Path(source).parent
    load_plan_tensors(plan, Path(base_dir) if base_dir is not None else Path.cwd())
    return plan


def save_plan(plan: PlanFile, path: str | Path) -> Path:
    """Write the canonical YAML atomically (a reader never sees half a plan), mode 0666 & ~umask. Linear maps and
    neuron subsets go first, into `weights.weights_file_for(path)` (also atomic); the YAML then records its name and
    sha256."""
    write_plan_tensors(plan, path)
    return write_text_atomic(path, dump_plan(plan))
