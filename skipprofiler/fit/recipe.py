"""The fit stage as one library call: `fit_plan(profile, FitSettings)` fits a plan file from the profile's statistics
(`from_profile`), refines it by measured KL on calibration windows (`refine`) or fits it to a quality budget on the
model when the settings ask, and notes linear substitutes' cost. `skipprof export-plan` parses its options into
`FitSettings` and calls it; exported as `skipprofiler.fit_plan`."""

from __future__ import annotations

from typing import Any

from .._jsonable import rounded


def fit_plan(profile, settings, *, model=None, tokenizer=None, profile_ref: dict[str, Any] | None = None):
    """Fit a plan file from `profile` as `settings` (skipprofiler.fit.FitSettings) ask and return a `FitResult`
    (plan_file, warnings, notes).

    At a target ratio the fit needs the profile only. `settings.refine` (choose by measured KL on calibration
    windows), a quality budget (`max_ppl_increase` / `max_kl`) and `compensation="mean_output"` measure plans on the
    model: pass the profiled `model` and its `tokenizer`. `profile_ref` ({path, sha256}) goes into provenance.
    """
    from .from_profile import FitError, fit_plan_file

    problems = settings.problems()
    if problems:
        raise FitError("; ".join(problems))
    settings = settings.resolve()
    if settings.needs_model:
        if model is None or tokenizer is None:
            raise FitError("FitSettings.refine, quality budgets and mean-output compensation measure plans on the "
                           "model: pass model= and tokenizer=")
        _check_same_model(profile, model)
    if settings.granularity == "neurons":
        return _fit_neurons(profile, settings, model, tokenizer, profile_ref)
    if settings.budget_fit:
        result = _fit_to_budget(profile, settings, model, tokenizer, profile_ref)
    else:
        result = fit_plan_file(profile, settings, per_class=settings.per_class, classes=settings.classes,
                               profile_ref=profile_ref)
        if settings.refine:
            result.warnings += _refine(result.plan_file, profile, settings, model, tokenizer)
    if settings.compensation == "linear":
        _note_substitute_cost(result.plan_file, model)
    return result


def _note_substitute_cost(plan_file, model) -> None:
    """Each linear plan's substitute FLOPs per skipped call (share of one FFN call) and the expected share of FFN
    FLOPs it saves net of them, in `fit`."""
    from .refine import substitute_cost_share

    for plan in [plan_file.global_plan, *plan_file.classes.values()]:
        share = substitute_cost_share(model, plan)
        plan.fit["substitute_cost_share"] = rounded(share)
        if plan.expected_skip_ratio is not None:
            plan.fit["expected_ffn_flops_saved"] = rounded(plan.expected_skip_ratio * (1 - share))


def _check_same_model(profile, model) -> None:
    from .from_profile import FitError
    from ..plan import fingerprint_problems
    from ..arch.registry import model_fingerprint

    mismatch = fingerprint_problems((profile.header.get("model") or {}).get("fingerprint"), model_fingerprint(model))
    if mismatch:
        raise FitError(f"the model is not the profile's model: {mismatch[0]}")


def _refine(plan_file, profile, settings, model, tokenizer) -> list[str]:
    """Choose by measured KL on calibration windows (skipprofiler.fit.refine), recorded in each plan's `fit`.

    static: refine the layer sets, the global plan on all windows and each class plan on its own class's windows;
    with compensation linear, class plans keep the global set and get maps fitted on their class's windows.
    adaptive (global plan): measure a grid of run lengths and dense-every, keep the cheapest at the target, and
    compare it with the refined static plan at the same ratio; a warning says so when static measures less KL."""
    from .from_profile import FitError
    from .refine import (RefineError, calibration_references, class_substitutes, compare_with_static,
                         fit_adaptive_by_cost, refine_plan_file)

    try:
        references = calibration_references(model, tokenizer, settings.data, text_column=settings.text_column,
                                            class_column=settings.class_column)
        if plan_file.global_plan.mode == "static" and settings.compensation == "linear" and plan_file.classes:
            classes, plan_file.classes = plan_file.classes, {}  # the global set first, then class maps on it
            refine_plan_file(model, tokenizer, plan_file, settings.data, references=references, rank=settings.rank,
                             error_aware=settings.error_aware)
            plan_file.classes = classes
            class_substitutes(model, tokenizer, plan_file, settings.data, text_column=settings.text_column,
                              class_column=settings.class_column)
            return []
        if plan_file.global_plan.mode == "static":
            return list(refine_plan_file(model, tokenizer, plan_file, settings.data, references=references,
                                         rank=settings.rank, error_aware=settings.error_aware))
        plan = fit_adaptive_by_cost(model, profile, settings, references)
        plan.fit["static_alternative"] = alt = compare_with_static(model, plan, references)
    except (RefineError, ValueError) as e:
        raise FitError(f"FitSettings.refine failed: {e}") from None
    plan_file.global_plan = plan
    if not alt["static_wins"]:
        return []
    return [f"on this model a static plan is better: at skip ratio {alt['skip_ratio']:.3f} the refined static set "
            f"{[l for l, _ in alt['layers']]} measures KL {alt['kl']:.4f} against the adaptive plan's "
            f"{alt['adaptive_kl']:.4f} on the same calibration windows; use FitSettings.mode=\"static\" with "
            "FitSettings.refine"]


def _fit_to_budget(profile, settings, model, tokenizer, profile_ref):
    from .from_profile import FitError, FitResult, assemble_plan_file
    from ..plan.model import SkipPlan
    from ..evaluation.fidelity import FidelityError
    from .refine import Budget, RefineError, calibration_references, fit_budget_plan
    from .substitute import SubstituteError

    template = SkipPlan(mode="static", apply_to=settings.apply_to, warmup_tokens=settings.warmup_tokens,
                        dense_every=settings.dense_every, compensation=settings.compensation)
    budget = Budget(max_kl=settings.max_kl, max_ppl_increase=settings.max_ppl_increase)
    try:
        references = calibration_references(model, tokenizer, settings.data, text_column=settings.text_column,
                                            class_column=settings.class_column)
        plan = fit_budget_plan(model, tokenizer, template, budget, settings.data, references=references,
                               gen_len=settings.gen_len, rank=settings.rank)
    except (RefineError, FidelityError, SubstituteError) as e:
        raise FitError(str(e)) from None
    record = plan.fit["budget_fit"]
    note = (f"budget {record['budget']}: {len(plan.skip_layers)} layers, expected skip {plan.expected_skip_ratio:.3f}; "
            f"measured on calibration windows: KL {record['kl']:.4f}, perplexity {record['ppl_increase']:+.1%}")
    return FitResult(assemble_plan_file(profile, settings, plan, profile_ref=profile_ref), notes=[note])


def _fit_neurons(profile, settings, model, tokenizer, profile_ref):
    """A neuron plan (fit/neurons.py) at the target FFN FLOPs share or within the quality budget."""
    from .from_profile import FitError, FitResult, assemble_plan_file
    from ..evaluation.fidelity import FidelityError
    from .neurons import NeuronFitError, fit_neuron_plan
    from .refine import Budget, RefineError

    budget = Budget(max_kl=settings.max_kl, max_ppl_increase=settings.max_ppl_increase) if settings.budget_fit else None
    try:
        plan = fit_neuron_plan(model, tokenizer, profile, settings, budget=budget)
    except (NeuronFitError, RefineError, FidelityError) as e:
        raise FitError(str(e)) from None
    r = plan.fit
    note = (f"neurons ({r['neuron_importance']}, fill {r['neuron_fill']}): FFN FLOPs saved {r['expected_ffn_flops_saved']:.3f}, "
            f"widths {min(plan.neurons.widths.values()) if plan.neurons else '-'}..{max(plan.neurons.widths.values()) if plan.neurons else '-'}; "
            f"calibration KL {r['kl']:.4f} (perplexity {r['ppl_increase']:+.1%}), confirmed on {r['confirm']['windows']} windows: "
            f"KL {r['confirm']['kl']:.4f} (perplexity {r['confirm']['ppl_increase']:+.1%}); "
            f"{r['measurements']} measurements, {r['seconds']:.0f} s")
    return FitResult(assemble_plan_file(profile, settings, plan, profile_ref=profile_ref), notes=[note])
