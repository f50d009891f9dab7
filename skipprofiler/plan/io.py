"""Plan files v1 on disk: canonical YAML load/dump, validation that reports every problem, the JSON schema.

The format is documented in docs/plan-format.md; `skipprofiler/schema/plan-v1.json` describes the same shape for
editors and other tools. This module imports only the standard library and yaml (the runtime loads plans with it),
and safetensors for the maps of `compensation: linear`.

Canonical YAML (what `dump_plan` writes): fixed key order, plan keys that equal the file's `defaults` left out, a
single `tau` written as one number, floats in Python's shortest round-trip repr, lists of scalars in flow style, free-form
mappings (`fit`, extra `provenance` keys) sorted by key. `dump_plan(load_plan(text)) == text` for every canonical text;
comments and non-canonical spelling are not preserved.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_bytes_atomic, write_text_atomic
from .model import (APPLY_TO, BATCH_DECISIONS, COMPENSATIONS, DEFAULT_KEYS, LINEAR, MODES, PLAN_VERSION,
                   ROUTER_POOLINGS, LinearMaps, PlanError, PlanFile, Router, SkipPlan)

__all__ = ["load_plan", "dump_plan", "save_plan", "validate_plan_dict", "plan_to_dict", "plan_from_dict",
           "schema_path", "fingerprint_problems", "PlanError"]

BUILTIN_DEFAULTS: dict[str, Any] = {"apply_to": "decode", "warmup_tokens": 0, "dense_every": 0, "compensation": "none"}
TOP_KEYS = ("version", "model", "provenance", "defaults", "global", "classes", "router")
MODEL_KEYS = ("name", "fingerprint")
FINGERPRINT_KEYS = ("model_type", "num_layers", "hidden_size", "vocab_size", "config_hash")
PROVENANCE_ORDER = ("profile", "profile_sha256", "corpus", "tokens", "tool_version", "created")
STATIC_KEYS = ("skip_layers",)
ADAPTIVE_KEYS = ("tau", "cold_start", "cold_end", "max_skip")
ADAPTIVE_OPTIONAL_KEYS = ("batch_decision",)
PLAN_KEYS = (("mode",) + DEFAULT_KEYS + STATIC_KEYS + ADAPTIVE_KEYS + ADAPTIVE_OPTIONAL_KEYS
             + ("norm_gain", "ffn_mean", "linear", "expected_skip_ratio", "fit"))
LINEAR_KEYS = ("file", "sha256", "rank")
WEIGHTS_FORMAT = "skipprof-linear-maps"
ROUTER_KEYS = ("layer", "metric", "pooling", "heldout_accuracy", "classes", "centroids")
ROUTER_METRICS = ("cosine",)


def schema_path() -> Path:
    """The JSON Schema of plan files v1 (shape only; layer counts and cross-references are checked by validation)."""
    return Path(__file__).resolve().parent.parent / "schema" / "plan-v1.json"


# --------------------------------------------------------------------------------------------------------------------
# Validation: walk the raw mapping, collect every problem with its path


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


def skip_plan_problems(plan: SkipPlan, label: str, num_layers: int, hidden: int | None = None) -> list[str]:
    """The rules `validate_plan_dict` applies to a file's plan, applied to one in-memory plan (the runtime checks plans
    built in code with them): one place says what a valid plan is. Its linear maps, when in memory, need no file yet
    (`linear_map_problems` checks their tensors)."""
    d = _skip_plan_to_dict(plan, BUILTIN_DEFAULTS)
    if plan.tau is not None:
        d["tau"] = list(plan.tau)  # in memory every layer needs its own entry: no scalar shorthand
    if plan.linear is not None:
        del d["linear"]
    check = _Checker()
    _check_plan(check, label, d, num_layers, BUILTIN_DEFAULTS, hidden, maps_in_memory=plan.linear is not None)
    return check.problems


def _check_plan(check: _Checker, path: str, plan: Any, layers: int | None, defaults: dict,
                hidden: int | None = None, maps_in_memory: bool = False) -> None:
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
    if check.string(f"{path}.file", linear.get("file")):
        name = linear["file"]
        if os.path.isabs(name) or ".." in Path(name).parts or not name.endswith(".safetensors"):
            check.add(f"{path}.file", f"must be a .safetensors file name relative to the plan file, got {name!r}")
    sha = linear.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        check.add(f"{path}.sha256", f"must be 64 lowercase hex digits, got {_kind(sha)}")
    if linear.get("rank") is not None:
        check.integer(f"{path}.rank", linear["rank"], lo=1)


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


# --------------------------------------------------------------------------------------------------------------------
# dict <-> data model


def plan_from_dict(d: Any, num_layers: int | None = None, fingerprint: dict | None = None) -> PlanFile:
    """Validate a raw mapping and build the PlanFile; raises PlanError listing every problem."""
    problems = validate_plan_dict(d, num_layers, fingerprint)
    if problems:
        raise PlanError(problems)
    layers = d["model"]["fingerprint"]["num_layers"]
    defaults = {k: d.get("defaults", {})[k] for k in DEFAULT_KEYS if k in d.get("defaults", {})}
    effective = {**BUILTIN_DEFAULTS, **defaults}
    router = None
    if d.get("router") is not None:
        r = d["router"]
        router = Router(layer=r["layer"], classes=list(r["classes"]),
                        centroids=[[float(x) for x in vec] for vec in r["centroids"]],
                        metric=r.get("metric", "cosine"), pooling=r.get("pooling", "mean"),
                        heldout_accuracy=None if r.get("heldout_accuracy") is None else float(r["heldout_accuracy"]))
    return PlanFile(
        model={"name": d["model"]["name"],
               "fingerprint": {k: d["model"]["fingerprint"][k] for k in FINGERPRINT_KEYS
                               if k in d["model"]["fingerprint"]}},
        global_plan=_skip_plan_from_dict(d["global"], effective, layers),
        classes={name: _skip_plan_from_dict(p, effective, layers) for name, p in (d.get("classes") or {}).items()},
        router=router,
        defaults=defaults,
        provenance=dict(d.get("provenance") or {}),
        version=d["version"],
    )


def _skip_plan_from_dict(p: dict, defaults: dict, layers: int) -> SkipPlan:
    settings = {k: p.get(k, defaults[k]) for k in DEFAULT_KEYS}
    plan = SkipPlan(mode=p["mode"], **settings)
    if plan.mode == "static":
        for entry in p.get("skip_layers", []):
            if isinstance(entry, dict):
                plan.skip_layers[entry["layer"]] = float(entry["fraction"])
            else:
                plan.skip_layers[entry] = 1.0
    else:
        tau = p["tau"]
        plan.tau = [float(t) for t in tau] if isinstance(tau, list) else [float(tau)] * layers
        plan.cold_start, plan.cold_end, plan.max_skip = p["cold_start"], p["cold_end"], p["max_skip"]
        plan.batch_decision = p.get("batch_decision", "per_sequence")
    if "norm_gain" in p:
        plan.norm_gain = [float(g) for g in p["norm_gain"]]
    if "ffn_mean" in p:
        plan.ffn_mean = {int(l): [float(x) for x in v] for l, v in p["ffn_mean"].items()}
    if "linear" in p:  # the tensors are read by `load_plan`, which knows where the plan file is
        plan.linear = LinearMaps(rank=p["linear"].get("rank"), tensors={}, file=p["linear"]["file"],
                                 sha256=p["linear"]["sha256"])
    if "expected_skip_ratio" in p:
        plan.expected_skip_ratio = float(p["expected_skip_ratio"])
    plan.fit = dict(p.get("fit") or {})
    return plan


def plan_to_dict(plan: PlanFile) -> dict:
    """The canonical mapping of a PlanFile (key order as written by `dump_plan`)."""
    out: dict[str, Any] = {"version": plan.version}
    fp = plan.model.get("fingerprint") or {}
    out["model"] = {"name": plan.model.get("name"), "fingerprint": {k: fp[k] for k in FINGERPRINT_KEYS if k in fp}}
    if plan.provenance:
        known = [k for k in PROVENANCE_ORDER if k in plan.provenance]
        extra = sorted(k for k in plan.provenance if k not in PROVENANCE_ORDER)
        out["provenance"] = {k: _sorted_data(plan.provenance[k]) for k in known + extra}
    defaults = {k: plan.defaults[k] for k in DEFAULT_KEYS if k in plan.defaults}
    if defaults:
        out["defaults"] = defaults
    effective = {**BUILTIN_DEFAULTS, **defaults}
    out["global"] = _skip_plan_to_dict(plan.global_plan, effective)
    if plan.classes:
        out["classes"] = {name: _skip_plan_to_dict(plan.classes[name], effective) for name in sorted(plan.classes)}
    if plan.router is not None:
        r = plan.router
        router: dict[str, Any] = {"layer": r.layer, "metric": r.metric, "pooling": r.pooling}
        if r.heldout_accuracy is not None:
            router["heldout_accuracy"] = float(r.heldout_accuracy)
        router["classes"] = list(r.classes)
        router["centroids"] = [[float(x) for x in vec] for vec in r.centroids]
        out["router"] = router
    return out


def _skip_plan_to_dict(plan: SkipPlan, defaults: dict) -> dict:
    out: dict[str, Any] = {"mode": plan.mode}
    for key in DEFAULT_KEYS:
        value = getattr(plan, key)
        if value != defaults[key]:
            out[key] = value
    if plan.mode == "static":
        out["skip_layers"] = [int(l) if f >= 1.0 else {"layer": int(l), "fraction": float(f)}
                              for l, f in sorted(plan.skip_layers.items())]
    else:
        tau = [float(t) for t in (plan.tau or [])]
        out["tau"] = tau[0] if tau and all(t == tau[0] for t in tau) else tau
        out["cold_start"], out["cold_end"], out["max_skip"] = plan.cold_start, plan.cold_end, plan.max_skip
        if plan.batch_decision != "per_sequence":
            out["batch_decision"] = plan.batch_decision
    if plan.norm_gain is not None:
        out["norm_gain"] = [float(g) for g in plan.norm_gain]
    if plan.ffn_mean:
        out["ffn_mean"] = {int(l): [float(x) for x in plan.ffn_mean[l]] for l in sorted(plan.ffn_mean)}
    if plan.linear is not None:
        linear = plan.linear
        out["linear"] = {"file": linear.file, "sha256": linear.sha256}
        if linear.rank is not None:
            out["linear"]["rank"] = int(linear.rank)
    if plan.expected_skip_ratio is not None:
        out["expected_skip_ratio"] = float(plan.expected_skip_ratio)
    if plan.fit:
        out["fit"] = _sorted_data(plan.fit)
    return out


def _sorted_data(value: Any) -> Any:
    """Free-form data in canonical form: mappings sorted by key, tuples as lists, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _sorted_data(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_sorted_data(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------------------------
# YAML


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
    Linear maps must have been written (`save_plan`) first: the YAML records their file and hash."""
    unsaved = [name for name, p in _named_plans(plan) if p.linear is not None and not p.linear.file]
    if unsaved:
        raise PlanError(f"the linear maps of {', '.join(unsaved)} are not saved yet: write the plan with save_plan "
                        "(it writes the maps' safetensors file beside the YAML)")
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

    Linear maps (`compensation: linear`) are read from their file, relative to the plan file (YAML text: to
    `base_dir`, default the working directory), and checked: present, the recorded sha256, shapes and dtype."""
    data, source = read_plan_dict(path_or_text)
    plan = plan_from_dict(data, num_layers, fingerprint)
    if source != "<text>":
        base_dir = Path(source).parent
    load_linear_maps(plan, Path(base_dir) if base_dir is not None else Path.cwd())
    return plan


def _named_plans(plan: PlanFile) -> list[tuple[str, SkipPlan]]:
    return [("global", plan.global_plan)] + [(f"class.{n}", p) for n, p in sorted(plan.classes.items())]


def load_linear_maps(plan: PlanFile, base_dir: Path) -> None:
    """Read every plan's linear maps from its file; PlanError listing every problem (missing file, altered file,
    missing layers, wrong shapes or dtype)."""
    wanting = [(name, p) for name, p in _named_plans(plan) if p.linear is not None]
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


def weights_file_for(path: str | Path) -> Path:
    """Where `save_plan` writes a plan's linear maps: beside it, same stem, `.safetensors`."""
    return Path(path).with_suffix(".safetensors")


def save_plan(plan: PlanFile, path: str | Path) -> Path:
    """Write the canonical YAML atomically (a reader never sees half a plan), mode 0666 & ~umask. Linear maps go
    first, into `weights_file_for(path)` (also atomic); the YAML then records its name and sha256."""
    wanting = [(name, p) for name, p in _named_plans(plan) if p.linear is not None]
    if wanting:
        from safetensors.numpy import save

        tensors = {f"{name}.{k}": v for name, p in wanting for k, v in p.linear.tensors.items()}
        data = save(tensors, metadata={"format": WEIGHTS_FORMAT})
        target = weights_file_for(path)
        write_bytes_atomic(target, data)
        digest = hashlib.sha256(data).hexdigest()
        for _, p in wanting:
            p.linear = LinearMaps(p.linear.rank, p.linear.tensors, target.name, digest)
    return write_text_atomic(path, dump_plan(plan))
