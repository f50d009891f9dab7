"""Raw plan mappings <-> the data model: `plan_from_dict` validates (every problem at once) and builds a `PlanFile`;
`plan_to_dict` gives the canonical mapping (plan keys equal to the file's defaults left out, free-form data sorted);
`skip_plan_problems` checks a plan built in code through the same mapping."""

from __future__ import annotations

from typing import Any

from .model import (DEFAULT_KEYS, LinearMaps, NeuronSubsets, PlanError, PlanFile, Router, SkipPlan)
from .validate import BUILTIN_DEFAULTS, FINGERPRINT_KEYS, PROVENANCE_ORDER, _check_plan, _Checker, validate_plan_dict


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
    if "neurons" in p:  # likewise: the widths the file records now, the index arrays (checked against them) on load
        n = p["neurons"]
        plan.neurons = NeuronSubsets(fill=n["fill"], tensors={}, file=n["file"], sha256=n["sha256"],
                                     intermediate_size=n.get("intermediate_size"), rank=n.get("rank"),
                                     recorded_widths={int(l): int(w) for l, w in n["widths"].items()})
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
    if plan.neurons is not None:
        subsets = plan.neurons
        neurons: dict[str, Any] = {"fill": subsets.fill}
        if subsets.intermediate_size is not None:
            neurons["intermediate_size"] = int(subsets.intermediate_size)
        if subsets.rank is not None:
            neurons["rank"] = int(subsets.rank)
        neurons["file"], neurons["sha256"] = subsets.file, subsets.sha256
        neurons["widths"] = {int(l): int(w) for l, w in sorted(subsets.widths.items())}
        out["neurons"] = neurons
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


def skip_plan_problems(plan: SkipPlan, label: str, num_layers: int, hidden: int | None = None) -> list[str]:
    """The rules `validate_plan_dict` applies to a file's plan, applied to one in-memory plan (the runtime checks plans
    built in code with them): one place says what a valid plan is. Its linear maps and neuron subsets, when in memory,
    need no file yet (`linear_map_problems` and `neuron_problems` check their tensors)."""
    d = _skip_plan_to_dict(plan, BUILTIN_DEFAULTS)
    if plan.tau is not None:
        d["tau"] = list(plan.tau)  # in memory every layer needs its own entry: no scalar shorthand
    if plan.linear is not None:
        del d["linear"]
    neurons_in_memory = plan.neurons is not None and not plan.neurons.file
    if neurons_in_memory:
        d["neurons"] = {k: v for k, v in d["neurons"].items() if k not in ("file", "sha256")}
    check = _Checker()
    _check_plan(check, label, d, num_layers, BUILTIN_DEFAULTS, hidden, maps_in_memory=plan.linear is not None,
                neurons_in_memory=neurons_in_memory)
    return check.problems
