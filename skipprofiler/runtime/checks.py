"""Does a plan fit a model? Every check runs before any module is touched; all problems are reported at once."""

from __future__ import annotations

import warnings

from torch import nn

from ..plan import ADAPTIVE, APPLY_TO, COMPENSATIONS, MODES, NO_COMPENSATION, STATIC, PlanError, PlanFile, SkipPlan
from ..registry import ResolvedArch, model_fingerprint, resolve


def fingerprint_mismatch(plan_file: PlanFile, model: nn.Module) -> str | None:
    """One line naming every fingerprint key where the plan and the model differ; None when they agree."""
    from ..planio import fingerprint_problems  # yaml and the standard library only

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
    """Everything that keeps `plan` from running on the model `arch` describes."""
    L = arch.num_layers
    problems = []
    if plan.mode not in MODES:
        problems.append(f"{label}: unknown mode {plan.mode!r} (expected {' or '.join(MODES)})")
    if plan.apply_to not in APPLY_TO:
        problems.append(f"{label}: unknown apply_to {plan.apply_to!r} (expected {' or '.join(APPLY_TO)})")
    if plan.warmup_tokens < 0 or plan.dense_every < 0:
        problems.append(f"{label}: warmup_tokens and dense_every must be >= 0")
    if plan.mode == STATIC:
        bad = sorted(l for l in plan.skip_layers if not 0 <= int(l) < L)
        if bad:
            problems.append(f"{label}: skip_layers names layers {bad} but the model has {L} layers (0..{L - 1})")
        bad_f = sorted(l for l, f in plan.skip_layers.items() if not 0.0 < f <= 1.0)
        if bad_f:
            problems.append(f"{label}: skip fractions must be in (0, 1] (layers {bad_f})")
    if plan.mode == ADAPTIVE and not plan.is_empty():
        from .adaptive import adaptive_problems

        problems += adaptive_problems(plan, label, L)
    if plan.compensation not in COMPENSATIONS:
        problems.append(f"{label}: unknown compensation {plan.compensation!r} (expected {', '.join(COMPENSATIONS)})")
    elif plan.compensation != NO_COMPENSATION and not plan.is_empty():
        from .compensation import compensation_problems

        problems += compensation_problems(plan, label, arch)
    return problems


def plans_for(model: nn.Module, arch: ResolvedArch, plan: PlanFile | SkipPlan,
              prompt_class: str | None) -> tuple[dict[str | None, SkipPlan], list[str]]:
    """The plans an application uses, keyed by class (None = global), and every problem except the fingerprint."""
    if isinstance(plan, SkipPlan):
        if prompt_class is not None:
            raise PlanError(f"prompt_class={prompt_class!r} needs a PlanFile with class plans; a bare SkipPlan "
                            "has none (pass prompt_class=None)")
        return {None: plan}, plan_problems(plan, "plan", arch)
    if not isinstance(plan, PlanFile):
        raise TypeError(f"apply_plan expects a PlanFile, SkipPlan, or a YAML path; got {type(plan).__name__}")
    config = getattr(model, "config", None)
    return select_plans(plan, prompt_class, arch, getattr(config, "hidden_size", None) or getattr(config, "n_embd", None))


def fit_problems(model: nn.Module, plan: PlanFile | SkipPlan) -> list[str]:
    """Everything that keeps `plan` (its global and every class plan) from running on `model`, fingerprint included:
    the one plan-vs-model check, shared by apply_plan and eval."""
    arch = resolve(model)
    problems = []
    if isinstance(plan, PlanFile):
        mismatch = fingerprint_mismatch(plan, model)
        problems += [mismatch] if mismatch else []
    for prompt_class in [None, *(plan.classes if isinstance(plan, PlanFile) else ())]:
        problems += [p for p in plans_for(model, arch, plan, prompt_class)[1] if p not in problems]
    return problems


def select_plans(plan_file: PlanFile, prompt_class: str | None, arch: ResolvedArch,
                 hidden_size: int | None) -> tuple[dict[str | None, SkipPlan], list[str]]:
    """The plans this application may use, keyed by class (None = global), and every problem found."""
    problems: list[str] = []
    if prompt_class == "auto":
        from .routing import router_problems

        plans, problems = router_problems(plan_file, arch, hidden_size)
    else:
        plans = {prompt_class: plan_file.select(prompt_class)}  # raises PlanError listing the plan's classes
    for name, plan in plans.items():
        problems += plan_problems(plan, "global plan" if name is None else f"class {name!r}", arch)
    return plans, problems
