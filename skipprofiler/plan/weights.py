"""The linear maps of `compensation: linear` on disk: one safetensors file beside the plan, whose sha256 the plan
records; read and checked on load (present, unaltered, every layer's tensors with the right shapes and dtype)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic
from .model import LinearMaps, PlanError, PlanFile
from .validate import linear_map_problems

WEIGHTS_FORMAT = "skipprof-linear-maps"


def load_linear_maps(plan: PlanFile, base_dir: Path) -> None:
    """Read every plan's linear maps from its file; PlanError listing every problem (missing file, altered file,
    missing layers, wrong shapes or dtype)."""
    wanting = [(name, p) for name, p in plan.named_plans() if p.linear is not None]
    if not wanting:
        return
    hidden = (plan.model.get("fingerprint") or {}).get("hidden_size")
    problems: list[str] = []
    files: dict[str, dict[str, Any] | None] = {}
    for name, p in wanting:
        linear = p.linear
        if linear.file not in files:
            files[linear.file] = _read_weights(base_dir / linear.file, linear.sha256, name, problems)
        tensors = files[linear.file]
        if tensors is None:
            continue
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        problems += linear_map_problems(f"{name}.linear", own, linear.rank, hidden, p.skippable_layers())
        p.linear = LinearMaps(linear.rank, own, linear.file, linear.sha256)
    if problems:
        raise PlanError(problems)


def _read_weights(path: Path, sha256: str | None, name: str, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"{name}.linear: the maps' file {path} is missing (it is written beside the plan; copy it "
                        "with the YAML)")
        return None
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        problems.append(f"{name}.linear: {path} was altered or belongs to another plan (sha256 {digest[:12]}..., "
                        f"the plan records {str(sha256)[:12]}...)")
        return None
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 -- any parse failure of a file whose hash matched is one problem
        problems.append(f"{name}.linear: {path} is not a readable safetensors file ({e})")
        return None


def weights_file_for(path: str | Path) -> Path:
    """Where `save_plan` writes a plan's linear maps: beside it, same stem, `.safetensors`."""
    return Path(path).with_suffix(".safetensors")


def write_linear_maps(plan: PlanFile, path: str | Path) -> None:
    """Write every plan's maps into `weights_file_for(path)` (atomically) and record its name and sha256 in them."""
    wanting = [(name, p) for name, p in plan.named_plans() if p.linear is not None]
    if not wanting:
        return
    from safetensors.numpy import save

    tensors = {f"{name}.{k}": v for name, p in wanting for k, v in p.linear.tensors.items()}
    data = save(tensors, metadata={"format": WEIGHTS_FORMAT})
    target = weights_file_for(path)
    write_bytes_atomic(target, data)
    digest = hashlib.sha256(data).hexdigest()
    for _, p in wanting:
        p.linear = LinearMaps(p.linear.rank, p.linear.tensors, target.name, digest)
