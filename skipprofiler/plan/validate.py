"""Plan validation: every problem of a raw plan mapping (as loaded from YAML) at once, each with its path; the checks
of one `SkipPlan` against a model's layer count and width, of a fingerprint, of linear maps and of neuron subsets; the
key sets the JSON schema (`skipprofiler/schema/plan-v1.json`) is tested against. Standard library only (tensors are
checked through their own methods: numpy arrays or torch tensors alike)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .model import (APPLY_TO, BATCH_DECISIONS, COMPENSATIONS, DEFAULT_KEYS, LINEAR, MODES, NEURON_FILLS,
                    NEURON_TENSOR_PARTS, PLAN_VERSION, ROUTER_POOLINGS, STATIC)

BUILTIN_DEFAULTS: dict[str, Any] = {"apply_to": "decode", "warmup_tokens": 0, "dense_every": 0, "compensation": "none"}
TOP_KEYS = ("version", "model", "provenance", "defaults", "global", "classes", "router")
MODEL_KEYS = ("name", "fingerprint")
FINGERPRINT_KEYS = ("model_type", "num_layers", "hidden_size", "vocab_size", "config_hash")
PROVENANCE_ORDER = ("profile", "profile_sha256", "corpus", "tokens", "tool_version", "created")
STATIC_KEYS = ("skip_layers",)
ADAPTIVE_KEYS = ("tau", "cold_start", "cold_end", "max_skip")
ADAPTIVE_OPTIONAL_KEYS = ("batch_decision",)
PLAN_KEYS = (("mode",) + DEFAULT_KEYS + STATIC_KEYS + ADAPTIVE_KEYS + ADAPTIVE_OPTIONAL_KEYS
             + ("norm_gain", "ffn_mean", "linear", "neurons", "expected_skip_ratio", "fit"))
LINEAR_KEYS = ("file", "sha256", "rank")
NEURON_KEYS = ("fill", "rank", "intermediate_size", "file", "sha256", "widths")  # canonical order (widths, the long one, last)
ROUTER_KEYS = ("layer", "metric", "pooling", "heldout_accuracy", "classes", "centroids")
ROUTER_METRICS = ("cosine",)


def schema_path() -> Path:
    """The JSON Schema of plan files v1 (shape only; layer counts and cross-references are checked by validation)."""
    return Path(__file__).resolve().parent.parent / "schema" / "plan-v1.json"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {v!r}"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return f"string {v!r}"
    return f"{type(v).__name__} {v!r}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _Checker:
    """Collects problems; each check appends `path: what is wrong, got X` and returns whether the value is usable."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path or 'plan'}: {message}")

    def mapping(self, path: str, value: Any, allowed: tuple[str, ...] | None, required: tuple[str, ...] = ()) -> bool:
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, got {_kind(value)}")
            return False
        for key in value:
            if not isinstance(key, str):
                self.add(path, f"keys must be strings, got {_kind(key)}")
            elif allowed is not None and key not in allowed:
                self.add(_join(path, key), f"unknown key (allowed here: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.add(_join(path, key), "is required")
        return True

    def integer(self, path: str, value: Any, lo: int | None = None, hi: int | None = None) -> bool:
        if not _is_int(value):
            self.add(path, f"must be an integer, got {_kind(value)}")
            return False
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.add(path, f"must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], "
                           f"got {value}")
            return False
        return True

    def number(self, path: str, value: Any, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> bool:
        if not _is_number(value):
            self.add(path, f"must be a finite number, got {_kind(value)}")
            return False
        below = lo is not None and (value <= lo if lo_open else value < lo)
        if below or (hi is not None and value > hi):
            bracket = "(" if lo_open else "["
            self.add(path, f"must be in {bracket}{lo if lo is not None else '-inf'}, "
                           f"{hi if hi is not None else 'inf'}], got {value}")
            return False
        return True

    def choice(self, path: str, value: Any, options: tuple[str, ...]) -> bool:
        if value not in options or not isinstance(value, str):
            self.add(path, f"must be one of {', '.join(options)}, got {_kind(value)}")
            return False
        return True

    def string(self, path: str, value: Any) -> bool:
        if not isinstance(value, str) or not value:
            self.add(path, f"must be a non-empty string, got {_kind(value)}")
            return False
        return True

    def plain_data(self, path: str, value: Any) -> None:
        """Free-form values (fit, provenance) must be JSON-like so they dump and reload identically."""
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    self.add(path, f"keys must be strings, got {_kind(k)}")
                else:
                    self.plain_data(_join(path, k), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.plain_data(f"{path}[{i}]", v)
        elif isinstance(value, float) and not math.isfinite(value):
            self.add(path, f"must be a finite number, got {value}")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            self.add(path, f"must be a string, number, boolean, list or mapping, got {_kind(value)}")


def validate_plan_dict(d: Any, num_layers: int | None = None, fingerprint: dict | None = None) -> list[str]:
    """Every problem in a raw plan mapping (as loaded from YAML), each prefixed with its path; empty when valid.

    `num_layers` / `fingerprint` describe the model the plan will be used with (e.g. `skipprof validate --model`):
    layer indices are checked against it and the plan's fingerprint must match it.
    """
    check = _Checker()
    if not check.mapping("", d, TOP_KEYS, required=("version", "model", "global")):
        return check.problems
    if "version" in d and check.integer("version", d["version"]) and d["version"] != PLAN_VERSION:
        check.add("version", f"unsupported plan version {d['version']} (this skipprofiler reads version {PLAN_VERSION})")
        return check.problems  # a future format: the rest would only produce noise
    plan_layers = _check_model(check, d.get("model"))
    layers = num_layers if num_layers is not None else plan_layers
    if fingerprint is not None and isinstance(d.get("model"), dict):
        check.problems += fingerprint_problems(d["model"].get("fingerprint"), fingerprint)
    if "provenance" in d and check.mapping("provenance", d["provenance"], None):
        check.plain_data("provenance", d["provenance"])
    hidden = (d["model"].get("fingerprint") or {}).get("hidden_size") if isinstance(d.get("model"), dict) else None
    hidden = hidden if _is_int(hidden) else None
    defaults = dict(BUILTIN_DEFAULTS)
    if "defaults" in d and check.mapping("defaults", d["defaults"], DEFAULT_KEYS):
        _check_overrides(check, "defaults", d["defaults"])
        defaults.update({k: v for k, v in d["defaults"].items() if k in DEFAULT_KEYS})
    if "global" in d:
        _check_plan(check, "global", d["global"], layers, defaults, hidden)
    class_names: list[str] = []
    if "classes" in d and check.mapping("classes", d["classes"], None):
        for name, plan in d["classes"].items():
            if isinstance(name, str):
                class_names.append(name)
                _check_plan(check, f"classes.{name}", plan, layers, defaults, hidden)
    if "router" in d and d["router"] is not None:
        _check_router(check, d["router"], layers, class_names, hidden)
    return check.problems


def fingerprint_problems(plan_fp: Any, model_fp: dict) -> list[str]:
    """Mismatches between a plan's fingerprint and a model's (keys both sides know); one problem per key."""
    if not isinstance(plan_fp, dict):
        return []
    return [f"model.fingerprint.{k}: plan was fitted for {plan_fp[k]!r}, the model has {model_fp[k]!r} "
            f"(fingerprint mismatch: this plan is for another model)"
            for k in FINGERPRINT_KEYS if k in plan_fp and model_fp.get(k) is not None and plan_fp[k] != model_fp[k]]


def _check_model(check: _Checker, model: Any) -> int | None:
    """Check `model`; return the plan's layer count (needed to check layer indices) when it is usable."""
    if model is None or not check.mapping("model", model, MODEL_KEYS, required=MODEL_KEYS):
        return None
    if "name" in model:
        check.string("model.name", model["name"])
    fp = model.get("fingerprint")
    if fp is None or not check.mapping("model.fingerprint", fp, FINGERPRINT_KEYS, required=("num_layers",)):
        return None
    layers = fp.get("num_layers")
    ok = "num_layers" in fp and check.integer("model.fingerprint.num_layers", layers, lo=1)
    for key in ("hidden_size", "vocab_size"):
        if fp.get(key) is not None:
            check.integer(f"model.fingerprint.{key}", fp[key], lo=1)
    for key in ("model_type", "config_hash"):
        if fp.get(key) is not None:
            check.string(f"model.fingerprint.{key}", fp[key])
    return layers if ok else None


def _check_overrides(check: _Checker, path: str, d: dict) -> None:
    if "apply_to" in d:
        check.choice(f"{path}.apply_to", d["apply_to"], APPLY_TO)
    if "warmup_tokens" in d:
        check.integer(f"{path}.warmup_tokens", d["warmup_tokens"], lo=0)
    if "dense_every" in d:
        check.integer(f"{path}.dense_every", d["dense_every"], lo=0)
        if d["dense_every"] == 1:
            check.add(f"{path}.dense_every", "1 would make every token dense (use 0 for never, or >= 2)")
    if "compensation" in d:
        check.choice(f"{path}.compensation", d["compensation"], COMPENSATIONS)


def eligibility_problems(owner: str, values: dict[str, Any]) -> list[str]:
    """The plan-file rules for the keys every plan may override (apply_to, warmup_tokens, dense_every, compensation),
    applied to `values` (None = not set), each problem as `<owner>.<key>: ...`: fit settings are checked with the
    rules their plans will be checked with."""
    check = _Checker()
    _check_overrides(check, owner, {k: v for k, v in values.items() if v is not None})
    return check.problems


def _check_layer(check: _Checker, path: str, value: Any, layers: int | None) -> bool:
    if not check.integer(path, value, lo=0):
        return False
    if layers is not None and value >= layers:
        check.add(path, f"layer {value} is beyond the model's {layers} layers (0..{layers - 1})")
        return False
    return True


def _check_plan(check: _Checker, path: str, plan: Any, layers: int | None, defaults: dict,
                hidden: int | None = None, maps_in_memory: bool = False, neurons_in_memory: bool = False) -> None:
    if not check.mapping(path, plan, PLAN_KEYS, required=("mode",)):
        return
    _check_overrides(check, path, plan)
    mode = plan.get("mode")
    if "mode" in plan and not check.choice(f"{path}.mode", mode, MODES):
        mode = None
    if mode == "static":
        for key in ADAPTIVE_KEYS + ADAPTIVE_OPTIONAL_KEYS:
            if key in plan:
                check.add(f"{path}.{key}", "only applies to adaptive plans (this plan is static)")
        _check_skip_layers(check, f"{path}.skip_layers", plan.get("skip_layers", []), layers)
    elif mode == "adaptive":
        for key in STATIC_KEYS:
            if key in plan:
                check.add(f"{path}.{key}", "only applies to static plans (this plan is adaptive)")
        _check_adaptive(check, path, plan, layers)
    compensation = plan.get("compensation", defaults.get("compensation"))
    if "norm_gain" in plan:
        _check_per_layer(check, f"{path}.norm_gain", plan["norm_gain"], layers, lo=0.0, lo_open=True, hi=None,
                         allow_scalar=False)
    elif compensation == "norm_ratio":
        check.add(f"{path}.norm_gain", "is required with compensation: norm_ratio (one gain per layer)")
    if "ffn_mean" in plan:
        _check_ffn_mean(check, f"{path}.ffn_mean", plan["ffn_mean"], layers, hidden)
        missing = sorted(set(_skippable_layers(plan, mode, layers)) - set(plan["ffn_mean"]))
        if compensation == "mean_output" and isinstance(plan["ffn_mean"], dict) and missing:
            check.add(f"{path}.ffn_mean", f"needs a mean output for every layer the plan may skip; missing {missing}")
    elif compensation == "mean_output":
        check.add(f"{path}.ffn_mean", "is required with compensation: mean_output (a mean FFN output per skipped "
                                      "layer)")
    if "linear" in plan:
        _check_linear(check, f"{path}.linear", plan["linear"])
    elif compensation == LINEAR and not maps_in_memory:
        check.add(f"{path}.linear", "is required with compensation: linear (the maps' file, its sha256 and rank)")
    if "neurons" in plan:
        if mode == "adaptive":
            check.add(f"{path}.neurons", "only applies to static plans (this plan is adaptive)")
        else:
            _check_neurons(check, f"{path}.neurons", plan["neurons"], layers, in_memory=neurons_in_memory)
            if mode == "static":
                _check_neurons_against_skips(check, path, plan)
    if "expected_skip_ratio" in plan:
        check.number(f"{path}.expected_skip_ratio", plan["expected_skip_ratio"], lo=0.0, hi=1.0)
    if "fit" in plan and check.mapping(f"{path}.fit", plan["fit"], None):
        check.plain_data(f"{path}.fit", plan["fit"])


def _skippable_layers(plan: dict, mode: str | None, layers: int | None) -> list[int]:
    """The layers a raw plan mapping may skip (static: its skip_layers; adaptive: between the cold ends)."""
    if mode == "static" and isinstance(plan.get("skip_layers"), list):
        return [e.get("layer") if isinstance(e, dict) else e for e in plan["skip_layers"]]
    if mode == "adaptive" and layers is not None and all(_is_int(plan.get(k)) for k in ("cold_start", "cold_end")):
        return list(range(plan["cold_start"], layers - plan["cold_end"]))
    return []


def _check_ffn_mean(check: _Checker, path: str, means: Any, layers: int | None, hidden: int | None) -> None:
    """{layer: [hidden_size numbers]}: the mean FFN output that replaces a skipped FFN (compensation mean_output)."""
    if not isinstance(means, dict) or not means:
        check.add(path, f"must be a non-empty mapping of layer -> mean output, got {_kind(means)}")
        return
    for layer, vector in means.items():
        if not _check_layer(check, f"{path}.{layer}", layer, layers):
            continue
        if not isinstance(vector, list) or not vector or not all(_is_number(x) and math.isfinite(x) for x in vector):
            check.add(f"{path}.{layer}", "must be a non-empty list of finite numbers")
        elif hidden is not None and len(vector) != hidden:
            check.add(f"{path}.{layer}", f"has {len(vector)} numbers but the model's hidden size is {hidden}")


def _check_linear(check: _Checker, path: str, linear: Any) -> None:
    """{file, sha256, rank}: where the maps of compensation linear are (a file name relative to the plan)."""
    if not check.mapping(path, linear, LINEAR_KEYS, required=("file", "sha256")):
        return
    _check_tensor_file(check, path, linear)
    if linear.get("rank") is not None:
        check.integer(f"{path}.rank", linear["rank"], lo=1)


def _check_tensor_file(check: _Checker, path: str, entry: dict) -> None:
    """`file` (a .safetensors name relative to the plan) and its `sha256`, where they are given."""
    if "file" in entry and check.string(f"{path}.file", entry.get("file")):
        name = entry["file"]
        if os.path.isabs(name) or ".." in Path(name).parts or not name.endswith(".safetensors"):
            check.add(f"{path}.file", f"must be a .safetensors file name relative to the plan file, got {name!r}")
    if "sha256" in entry:
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            check.add(f"{path}.sha256", f"must be 64 lowercase hex digits, got {_kind(sha)}")


def _check_neurons(check: _Checker, path: str, neurons: Any, layers: int | None, in_memory: bool = False) -> None:
    """{fill, intermediate_size, file, sha256, widths}: the neuron subsets' file and, per layer, the kept width
    (1 <= width < intermediate_size where that is recorded). Subsets built in code (`in_memory`) have no file yet."""
    required = ("fill", "widths") if in_memory else ("fill", "file", "sha256", "widths")
    if not check.mapping(path, neurons, NEURON_KEYS, required=required):
        return
    if "fill" in neurons:
        check.choice(f"{path}.fill", neurons["fill"], NEURON_FILLS)
    if neurons.get("fill") == "map" and "rank" not in neurons:
        check.add(f"{path}.rank", "is required with fill map (the rank of its maps)")
    elif "rank" in neurons and neurons.get("fill") != "map":
        check.add(f"{path}.rank", f"applies to fill map only (fill is {neurons.get('fill')})")
    elif "rank" in neurons:
        check.integer(f"{path}.rank", neurons["rank"], lo=1)
    size = neurons.get("intermediate_size")
    if size is not None and not check.integer(f"{path}.intermediate_size", size, lo=2):
        size = None
    _check_tensor_file(check, path, neurons)
    if "widths" not in neurons:
        return
    widths = neurons["widths"]
    if not isinstance(widths, dict) or not widths:
        check.add(f"{path}.widths", f"must be a non-empty mapping of layer -> kept width, got {_kind(widths)}")
        return
    for layer, width in widths.items():
        if _check_layer(check, f"{path}.widths.{layer}", layer, layers):
            if size is None:
                check.integer(f"{path}.widths.{layer}", width, lo=1)
            elif _is_int(width) and width >= size:
                check.add(f"{path}.widths.{layer}", f"must be below the FFN's {size} neurons (a layer that keeps "
                                                    f"them all is left out of widths), got {width}")
            else:
                check.integer(f"{path}.widths.{layer}", width, lo=1, hi=size - 1)


def _check_neurons_against_skips(check: _Checker, path: str, plan: dict) -> None:
    """A layer skipped whole at every eligible position (skip_layers, fraction 1) never runs narrowed."""
    widths = plan["neurons"].get("widths") if isinstance(plan["neurons"], dict) else None
    entries = plan.get("skip_layers")
    if not isinstance(widths, dict) or not isinstance(entries, list):
        return
    for entry in entries:
        layer, fraction = (entry.get("layer"), entry.get("fraction")) if isinstance(entry, dict) else (entry, 1.0)
        if _is_int(layer) and layer in widths and _is_number(fraction) and fraction >= 1.0:
            check.add(f"{path}.neurons.widths.{layer}", f"layer {layer} is in skip_layers with fraction 1 (skipped "
                                                        "whole at every eligible position), so it never runs "
                                                        "narrowed: drop it here or give it a fraction below 1")


def _check_skip_layers(check: _Checker, path: str, entries: Any, layers: int | None) -> None:
    if not isinstance(entries, list):
        check.add(path, f"must be a list of layers (int or {{layer, fraction}}), got {_kind(entries)}")
        return
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        item = f"{path}[{i}]"
        if isinstance(entry, dict):
            if not check.mapping(item, entry, ("layer", "fraction"), required=("layer", "fraction")):
                continue
            layer = entry.get("layer")
            if "fraction" in entry:
                check.number(f"{item}.fraction", entry["fraction"], lo=0.0, hi=1.0, lo_open=True)
            ok = "layer" in entry and _check_layer(check, f"{item}.layer", layer, layers)
        else:
            layer = entry
            ok = _check_layer(check, item, layer, layers)
        if ok:
            if layer in seen:
                check.add(item, f"layer {layer} is listed twice")
            seen.add(layer)


def _check_per_layer(check: _Checker, path: str, value: Any, layers: int | None, lo: float, hi: float | None,
                     lo_open: bool = False, allow_scalar: bool = True) -> None:
    if allow_scalar and not isinstance(value, list):
        check.number(path, value, lo=lo, hi=hi, lo_open=lo_open)
        return
    if not isinstance(value, list):
        check.add(path, f"must be a list with one number per layer, got {_kind(value)}")
        return
    if layers is not None and len(value) != layers:
        check.add(path, f"must have one entry per layer ({layers}), got {len(value)}")
    for i, v in enumerate(value):
        check.number(f"{path}[{i}]", v, lo=lo, hi=hi, lo_open=lo_open)


def _check_adaptive(check: _Checker, path: str, plan: dict, layers: int | None) -> None:
    for key in ADAPTIVE_KEYS:
        if key not in plan:
            check.add(f"{path}.{key}", "is required for adaptive plans")
    if "tau" in plan:
        _check_per_layer(check, f"{path}.tau", plan["tau"], layers, lo=-1.0, hi=1.0)
    ok_start = "cold_start" in plan and check.integer(f"{path}.cold_start", plan["cold_start"], lo=0)
    ok_end = "cold_end" in plan and check.integer(f"{path}.cold_end", plan["cold_end"], lo=0)
    if "max_skip" in plan:
        check.integer(f"{path}.max_skip", plan["max_skip"], lo=0, hi=layers)
    if "batch_decision" in plan:
        check.choice(f"{path}.batch_decision", plan["batch_decision"], BATCH_DECISIONS)
    if ok_start and ok_end and layers is not None and plan["cold_start"] + plan["cold_end"] > layers:
        check.add(f"{path}.cold_start", f"cold_start {plan['cold_start']} + cold_end {plan['cold_end']} exceed the "
                                        f"model's {layers} layers")


def _check_router(check: _Checker, router: Any, layers: int | None, class_names: list[str],
                  hidden: int | None) -> None:
    if not check.mapping("router", router, ROUTER_KEYS, required=("layer", "classes", "centroids")):
        return
    if "layer" in router:
        _check_layer(check, "router.layer", router["layer"], layers)
    if "metric" in router:
        check.choice("router.metric", router["metric"], ROUTER_METRICS)
    if "pooling" in router:
        check.choice("router.pooling", router["pooling"], ROUTER_POOLINGS)
    if router.get("heldout_accuracy") is not None:
        check.number("router.heldout_accuracy", router["heldout_accuracy"], lo=0.0, hi=1.0)
    names = router.get("classes")
    if "classes" in router:
        if not isinstance(names, list) or not names:
            check.add("router.classes", f"must be a non-empty list of class names, got {_kind(names)}")
            names = None
        else:
            for i, name in enumerate(names):
                if check.string(f"router.classes[{i}]", name) and name not in class_names:
                    check.add(f"router.classes[{i}]", f"class {name!r} has no plan under `classes` "
                                                      f"(known: {', '.join(class_names) or 'none'})")
            if len(set(map(str, names))) != len(names):
                check.add("router.classes", "lists a class twice")
    if "centroids" in router:
        _check_centroids(check, router["centroids"], names, hidden)


def _check_centroids(check: _Checker, centroids: Any, names: list | None, hidden: int | None) -> None:
    if not isinstance(centroids, list):
        check.add("router.centroids", f"must be a list of vectors (one per router class), got {_kind(centroids)}")
        return
    if names is not None and len(centroids) != len(names):
        check.add("router.centroids", f"has {len(centroids)} vectors for {len(names)} classes")
    dims = set()
    for i, vec in enumerate(centroids):
        if not isinstance(vec, list) or not vec:
            check.add(f"router.centroids[{i}]", f"must be a non-empty list of numbers, got {_kind(vec)}")
            continue
        dims.add(len(vec))
        bad = [j for j, x in enumerate(vec) if not _is_number(x)]
        if bad:
            check.add(f"router.centroids[{i}][{bad[0]}]", f"must be a finite number, got {_kind(vec[bad[0]])}")
    if len(dims) > 1:
        check.add("router.centroids", f"vectors have different lengths {sorted(dims)}")
    elif dims and hidden is not None and dims != {hidden}:
        check.add("router.centroids", f"vectors have length {dims.pop()}, the model's hidden size is {hidden}")


def linear_map_problems(path: str, tensors: dict[str, Any], rank: int | None, hidden: int | None,
                        layers: list[int]) -> list[str]:
    """Every problem of one plan's maps ({"<layer>.<part>": array}) against its rank, the model width and the
    layers the plan may skip."""
    problems = []
    have = sorted({int(k.split(".")[0]) for k in tensors if k.split(".")[0].isdigit()})
    missing = [l for l in layers if l not in have]
    if missing:
        problems.append(f"{path}: no map for skipped layers {missing}")
    parts = ("bias", "weight") if rank is None else ("bias", "down", "up")
    for layer in have:
        for part in parts:
            t = tensors.get(f"{layer}.{part}")
            if t is None:
                problems.append(f"{path}: layer {layer} has no {part!r} tensor (rank {rank or 'full'})")
                continue
            if str(t.dtype) != "float32":
                problems.append(f"{path}: layer {layer} {part} is {t.dtype}, expected float32")
            if hidden is not None:
                r = rank if rank is not None else hidden
                want = {"bias": (hidden,), "weight": (hidden, hidden), "down": (hidden, r), "up": (r, hidden)}[part]
                if tuple(t.shape) != want:
                    problems.append(f"{path}: layer {layer} {part} has shape {tuple(t.shape)}, expected {want}")
    return problems


def neuron_subset_problems(path: str, tensors: dict[str, Any], fill: str, widths: dict[int, int],
                           intermediate_size: int | None, hidden: int | None, rank: int | None = None) -> list[str]:
    """Every problem of one plan's neuron subsets ({"<layer>.kept": int64 [k], "<layer>.bias": float32 [hidden],
    "<layer>.map_in": float32 [r, k], "<layer>.map_out": float32 [hidden, r], "<layer>.regression": float16 or
    float32 [I - k, k]}) against the widths the plan records, its fill (the parts NEURON_TENSOR_PARTS names, no
    others) and rank and the FFN / model widths where known: kept indices int64, 1-D, strictly ascending (so unique),
    in [0, intermediate_size), as many as the recorded width; float32 bias and maps (the regression float16 or
    float32) of those shapes, finite; no layer the widths do not list."""
    problems = []
    parts = NEURON_TENSOR_PARTS.get(fill, ("kept",))
    every_part = {p for ps in NEURON_TENSOR_PARTS.values() for p in ps}
    layer_of = {k: k.split(".", 1) for k in tensors}
    odd = sorted(k for k, kp in layer_of.items() if len(kp) != 2 or not kp[0].isdigit() or kp[1] not in every_part)
    if odd:
        problems.append(f"{path}: unexpected tensors {odd} (expected <layer>.{{{', '.join(sorted(every_part))}}})")
    have = sorted({int(kp[0]) for k, kp in layer_of.items() if k not in odd})
    missing = [l for l in sorted(widths) if f"{l}.kept" not in tensors]
    if missing:
        problems.append(f"{path}: no kept indices for layers {missing} (widths lists them)")
    extra = [l for l in have if l not in widths]
    if extra:
        problems.append(f"{path}: the file holds subsets for layers {extra} that widths does not list")
    for layer in sorted(widths):
        kept = tensors.get(f"{layer}.kept")
        if kept is not None:
            problems += _kept_problems(f"{path}: layer {layer} kept", kept, widths[layer], intermediate_size)
        for part in sorted(every_part - {"kept"}):
            t = tensors.get(f"{layer}.{part}")
            if part in parts and t is None:
                problems.append(f"{path}: layer {layer} has no {part!r} tensor (fill {fill} stores "
                                f"{', '.join(parts)})")
            elif part not in parts and t is not None:
                problems.append(f"{path}: layer {layer} has a {part!r} tensor but fill is {fill} (it stores "
                                f"{', '.join(parts)})")
            elif t is not None:
                k = widths[layer] if _is_int(widths[layer]) else None
                rows = None if intermediate_size is None or k is None else intermediate_size - k
                want = {"bias": (hidden,), "map_in": (rank, k), "map_out": (hidden, rank), "regression": (rows, k)}
                # the regression may be float16: it is (I - k) x k numbers per layer, half the sidecar
                dtypes = ("float16", "float32") if part == "regression" else ("float32",)
                problems += _float_problems(f"{path}: layer {layer} {part}", t, want[part], dtypes)
    return problems


def _dtype(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def _kept_problems(path: str, kept: Any, width: Any, intermediate_size: int | None) -> list[str]:
    if _dtype(kept) != "int64":
        return [f"{path} is {_dtype(kept)}, expected int64"]
    if len(kept.shape) != 1:
        return [f"{path} has shape {tuple(kept.shape)}, expected one dimension"]
    problems = []
    if _is_int(width) and kept.shape[0] != width:
        problems.append(f"{path} holds {kept.shape[0]} indices but widths records {width}")
    if kept.shape[0] == 0:
        return problems + [f"{path} is empty (a layer skipped whole belongs in skip_layers)"]
    if kept.shape[0] > 1 and not bool((kept[1:] > kept[:-1]).all()):
        problems.append(f"{path} must be strictly ascending (sorted, each index once)")
    lo, hi = int(kept.min()), int(kept.max())
    if lo < 0 or (intermediate_size is not None and hi >= intermediate_size):
        allowed = "must be >= 0" if intermediate_size is None else f"the FFN's neurons are 0..{intermediate_size - 1}"
        problems.append(f"{path} has indices {lo}..{hi} ({allowed})")
    elif intermediate_size is not None and kept.shape[0] >= intermediate_size:
        problems.append(f"{path} keeps {kept.shape[0]} of the FFN's {intermediate_size} neurons (a layer that keeps "
                        "them all is left out)")
    return problems


def _float_problems(path: str, t: Any, want: tuple[int | None, ...], dtypes: tuple[str, ...] = ("float32",)
                    ) -> list[str]:
    """A float tensor (one of `dtypes`) of shape `want` (None: a dimension not checked), finite."""
    problems = []
    if _dtype(t) not in dtypes:
        problems.append(f"{path} is {_dtype(t)}, expected {' or '.join(dtypes)}")
    shape = tuple(t.shape)
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        expected = "(" + ", ".join("?" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
        problems.append(f"{path} has shape {shape}, expected {expected}")
    elif _dtype(t).startswith("float") and not bool((abs(t) < float("inf")).all()):
        problems.append(f"{path} holds NaN or infinite values")
    return problems


def neuron_problems(plan: Any, intermediate_size: int | None, hidden: int | None, label: str = "plan") -> list[str]:
    """What keeps a `SkipPlan`'s neuron subsets (`plan.neurons`) from running on a model whose FFNs have
    `intermediate_size` neurons and whose width is `hidden` (either None: not checked). The plan rules themselves
    (static only, fill, widths, skip_layers overlap) are `skip_plan_problems`'; this checks the loaded arrays: present,
    the width the plan recorded, chosen for this FFN width, indices and biases as `neuron_subset_problems` says."""
    subsets = getattr(plan, "neurons", None)
    if subsets is None or plan.mode != STATIC:
        return []
    path = f"{label}: neurons"
    if not subsets.tensors:
        return [f"{path}: needs its neuron subsets (load the plan from its file, beside which they are stored)"]
    problems = []
    recorded = subsets.intermediate_size
    if recorded is not None and intermediate_size is not None and recorded != intermediate_size:
        problems.append(f"{path}: chosen for FFNs of {recorded} neurons, the model's have {intermediate_size} "
                        "(this plan is for another model)")
    widths = subsets.recorded_widths if subsets.recorded_widths is not None else subsets.widths
    size = intermediate_size if intermediate_size is not None else recorded
    return problems + neuron_subset_problems(path, subsets.tensors, subsets.fill, widths, size, hidden, subsets.rank)
