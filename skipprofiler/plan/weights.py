"""A plan's tensors on disk: the linear maps of `compensation: linear` and the neuron subsets of `neurons`, in one
safetensors file beside the plan whose sha256 the plan records; read and checked on load (present, unaltered, every
layer's tensors with the right shapes and dtype, subsets matching the widths the YAML states).

Keys: ``<plan>.<layer>.<part>`` for maps (part bias, weight, down, up) and ``<plan>.neurons.<layer>.<part>`` for
subsets (part kept, bias), ``<plan>`` being ``global`` or ``class.<name>``."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from dataclasses import replace
from typing import Any

from ..atomic import write_bytes_atomic
from .model import LinearMaps, PlanError, PlanFile
from .validate import linear_map_problems, neuron_subset_problems

WEIGHTS_FORMAT = "skipprof-linear-maps"  # files holding linear maps only (as written before neuron subsets existed)
TENSORS_FORMAT = "skipprof-plan-tensors"  # files holding neuron subsets (and maybe maps)
_LINEAR_KEY = re.compile(r"(\d+)\.(bias|weight|down|up)")
_NEURON_KEY = "neurons."


def _entries(plan: PlanFile) -> list[tuple[str, str, Any]]:
    """(plan name, "linear" | "neurons", entry) for every plan's maps and subsets, in file order."""
    return [(name, kind, getattr(p, kind)) for name, p in plan.named_plans() for kind in ("linear", "neurons")
            if getattr(p, kind) is not None]


def load_plan_tensors(plan: PlanFile, base_dir: Path) -> None:
    """Read every plan's linear maps and neuron subsets from their file (relative to `base_dir`); PlanError listing
    every problem (missing file, altered file, missing layers, wrong shapes or dtype, subsets that do not match the
    widths the plan records)."""
    wanting = _entries(plan)
    if not wanting:
        return
    hidden = (plan.model.get("fingerprint") or {}).get("hidden_size")
    problems: list[str] = []
    files: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
    for name, kind, entry in wanting:
        where = f"{name}.{kind}"
        if entry.file not in files:
            files[entry.file] = _read_weights(base_dir / entry.file)
        digest, tensors = files[entry.file]
        path = base_dir / entry.file
        if digest is None:
            problems.append(f"{where}: the tensor file {path} is missing (it is written beside the plan; copy it "
                            "with the YAML)")
            continue
        if digest != entry.sha256:
            problems.append(f"{where}: {path} was altered or belongs to another plan (sha256 {digest[:12]}..., "
                            f"the plan records {str(entry.sha256)[:12]}...)")
            continue
        if isinstance(tensors, str):
            problems.append(f"{where}: {path} is not a readable safetensors file ({tensors})")
            continue
        p = plan.global_plan if name == "global" else plan.classes[name[len("class."):]]
        if kind == "linear":
            own = {k: v for k, v in _own(tensors, name + ".").items() if _LINEAR_KEY.fullmatch(k)}
            problems += linear_map_problems(where, own, entry.rank, hidden, p.skippable_layers())
            p.linear = LinearMaps(entry.rank, own, entry.file, entry.sha256)
        else:
            own = _own(tensors, f"{name}.{_NEURON_KEY}")
            widths = entry.recorded_widths if entry.recorded_widths is not None else {}
            problems += neuron_subset_problems(where, own, entry.fill, widths, entry.intermediate_size, hidden,
                                               entry.rank)
            p.neurons = replace(entry, tensors=own)
    if problems:
        raise PlanError(problems)


def _own(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _read_weights(path: Path) -> tuple[str | None, dict[str, Any] | str | None]:
    """(sha256, tensors) of a file; (None, None) when it is missing; tensors is an error message when unreadable."""
    if not path.is_file():
        return None, None
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    from safetensors.numpy import load

    try:
        return digest, load(data)
    except Exception as e:  # noqa: BLE001 -- any parse failure is one problem (reported when the hash matched)
        return digest, str(e)


def weights_file_for(path: str | Path) -> Path:
    """Where `save_plan` writes a plan's tensors (linear maps, neuron subsets): beside it, same stem, `.safetensors`."""
    return Path(path).with_suffix(".safetensors")


def write_plan_tensors(plan: PlanFile, path: str | Path) -> None:
    """Write every plan's linear maps and neuron subsets into `weights_file_for(path)` (atomically) and record its
    name and sha256 in them. Nothing is written for a plan file that has neither."""
    wanting = _entries(plan)
    if not wanting:
        return
    unread = [f"{name}.{kind}" for name, kind, entry in wanting if not entry.tensors]
    if unread:
        raise PlanError(f"{', '.join(unread)}: no tensors in memory (a plan built with plan_from_dict has only their "
                        "file's name: load it with load_plan before saving it elsewhere)")
    from safetensors.numpy import save

    tensors: dict[str, Any] = {}
    for name, kind, entry in wanting:
        prefix = f"{name}." if kind == "linear" else f"{name}.{_NEURON_KEY}"
        for k, v in entry.tensors.items():
            if prefix + k in tensors:
                raise PlanError(f"{name}.{kind}: tensor {prefix + k} collides with another plan's (rename the class)")
            tensors[prefix + k] = v
    neurons = any(kind == "neurons" for _, kind, _ in wanting)
    data = save(tensors, metadata={"format": TENSORS_FORMAT if neurons else WEIGHTS_FORMAT})
    target = weights_file_for(path)
    write_bytes_atomic(target, data)
    digest = hashlib.sha256(data).hexdigest()
    for name, p in plan.named_plans():
        if p.linear is not None:
            p.linear = LinearMaps(p.linear.rank, p.linear.tensors, target.name, digest)
        if p.neurons is not None:
            p.neurons = replace(p.neurons, file=target.name, sha256=digest)
