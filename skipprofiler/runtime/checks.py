"""Does a plan fit a model? Every check runs before any module is touched; all problems are reported at once."""

from __future__ import annotations

import warnings

from torch import nn

from ..plan.model import (ALL_POSITIONS, LINEAR, MEAN_OUTPUT, NO_COMPENSATION, NORM_RATIO, SHARED, STATIC, PlanError,
                    PlanFile, SkipPlan)
from ..arch.registry import ResolvedArch, model_fingerprint, resolve


def fingerprint_mismatch(plan_file: PlanFile, model: nn.Module) -> str | None:
    """One line naming every fingerprint key where the plan and the model differ; None when they agree."""
    from ..plan import fingerprint_problems  # yaml and the standard library only

    problems = fingerprint_problems((plan_file.model or {}).get("fingerprint"), model_fingerprint(model))
    if not problems:
        return None
    return f"plan was fitted for another model ({(plan_file.model or {}).get('name', '?')}): {'; '.join(problems)}"


def check_fingerprint(plan_file: PlanFile, model: nn.Module, strict: bool) -> None:
    message = fingerprint_mismatch(plan_file, model)
    if message is None:
        return
    if strict:
        raise PlanError(message + " (pass strict=False to apply it anyway)")
    warnings.warn(message + " -- applying anyway because strict=False", stacklevel=4)


def plan_problems(plan: SkipPlan, label: str, arch: ResolvedArch) -> list[str]:
    """Everything that keeps `plan` from running on the model `arch` describes: the plan rules (plan validation's, the same
    for files and for plans built in code), then what this architecture supports."""
    from ..plan import skip_plan_problems

    problems = skip_plan_problems(plan, label, arch.num_layers, _hidden_size(arch._config))
    if plan.compensation != NO_COMPENSATION and not plan.is_empty():
        from .compensation import compensation_problems

        problems += compensation_problems(plan, label, arch)
    if plan.neurons is not None:
        from .neurons import neuron_problems

        problems += neuron_problems(plan, label, arch)
    return problems


def _hidden_size(config) -> int | None:
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)


def plans_for(arch: ResolvedArch, plan: PlanFile | SkipPlan,
              prompt_class: str | None) -> tuple[dict[str | None, SkipPlan], list[str]]:
    """The plans an application uses, keyed by class (None = global), and every problem except the fingerprint."""
    if isinstance(plan, SkipPlan):
        if prompt_class is not None:
            raise PlanError(f"prompt_class={prompt_class!r} needs a PlanFile with class plans; a bare SkipPlan "
                            "has none (pass prompt_class=None)")
        return {None: plan}, plan_problems(plan, "plan", arch)
    if not isinstance(plan, PlanFile):
        raise TypeError(f"apply_plan expects a PlanFile, SkipPlan, or a YAML path; got {type(plan).__name__}")
    problems: list[str] = []
    if prompt_class == "auto":
        from .routing import router_problems

        plans, problems = router_problems(plan, arch, _hidden_size(arch._config))
    else:
        plans = {prompt_class: plan.select(prompt_class)}  # raises PlanError listing the plan's classes
    for name, selected in plans.items():
        problems += plan_problems(selected, "global plan" if name is None else f"class {name!r}", arch)
    return plans, problems


def fit_problems(model: nn.Module, plan: PlanFile | SkipPlan) -> list[str]:
    """Everything that keeps `plan` (its global and every class plan) from running on `model`, fingerprint included:
    the one plan-vs-model check, shared by apply_plan and eval."""
    arch = resolve(model)
    problems = []
    if isinstance(plan, PlanFile):
        mismatch = fingerprint_mismatch(plan, model)
        problems += [mismatch] if mismatch else []
    for prompt_class in [None, *(plan.classes if isinstance(plan, PlanFile) else ())]:
        problems += [p for p in plans_for(arch, plan, prompt_class)[1] if p not in problems]
    return problems


def describe_layer(layer: int, plans: dict[str | None, SkipPlan], num_layers: int, batch_decision: str,
                   neurons: int | None = None) -> str:
    """What ``print(model)`` shows on a patched FFN: what each plan does there (`neurons`: the FFN's width, when a
    plan narrows it)."""
    parts = []
    for name, plan in plans.items():
        if plan.is_empty():
            continue
        where = "on decode" if plan.apply_to != ALL_POSITIONS else "on all positions"
        subsets = plan.neurons
        if plan.mode == STATIC and subsets is not None and layer in subsets.layers:
            fill = {"mean": ", mean bias for the rest",
                    "map": f", rank-{subsets.rank} map and mean bias for the rest"}.get(subsets.fill, "")
            of = f" of {neurons}" if neurons else ""
            parts.append(f"keeps {subsets.widths[layer]}{of} neurons {where}{fill}"
                         + ("" if name is None else f" [{name}]"))
        if plan.mode == STATIC:
            if layer not in plan.skip_layers:
                continue
            f = plan.skip_layers[layer]
            what = "static skip" + ("" if f >= 1.0 else f" {f:g} of positions")
        else:
            if layer not in plan.skippable_layers(num_layers):
                continue
            shared = ", decided per batch" if batch_decision == SHARED else ""
            what = f"adaptive skip (tau, runs of {plan.max_skip}{shared})"
        rank = f" (rank {plan.linear.rank})" if plan.linear is not None and plan.linear.rank else ""
        comp = {NORM_RATIO: ", norm_ratio compensation", MEAN_OUTPUT: ", mean output in its place",
                LINEAR: ", linear substitute" + rank}.get(plan.compensation, "")
        parts.append(f"{what} {where}{comp}" + ("" if name is None else f" [{name}]"))
    return f"skipprof: layer {layer}: " + "; ".join(parts)
