"""The two evaluation runs. `run_eval` measures named plans, then baselines and references at the first plan's
realized skip ratio (and lm-evaluation-harness tasks). `run_sweep` measures the plans fitted at each sweep target
(`SweepTarget`, fitted by `skipprofiler.fit_plan`), refines the static sets by measured KL when asked, and adds
baselines and the oracle per target. Both prepare the held-out data once and build every plan's rows with
`plan_rows`."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

from ..plan.model import PlanFile, SkipPlan
from ..progress import Progress
from . import families
from .baselines import baseline_rows
from .config import EvalConfig, EvalError
from .data import EvalData, prepare_data, prepare_qa
from .oracle import oracle_row, oracle_set_count, search_reference_row, want_oracle, want_search_reference
from .result import build_result
from .rows import baseline_ratio, plan_rows, routable


def _quiet(message: str) -> None:
    pass


def check_plan_fits(model, plan: PlanFile | SkipPlan, name: str) -> None:
    """Plan/model mismatch as a one-line error (the runtime's check: fingerprint, layers, compensation, router)."""
    from ..runtime.checks import fit_problems

    problems = fit_problems(model, plan)
    if problems:
        raise EvalError(f"{name}: {'; '.join(problems)}")


def _prepare(model, tokenizer, plans: Sequence[tuple[str, PlanFile | SkipPlan]], data_spec: str | None,
             config: EvalConfig, progress: Progress | None, log) -> EvalData:
    """Check that every plan fits the model, then prepare the held-out data (and the dense QA passes)."""
    for name, plan in plans:
        check_plan_fits(model, plan, name)
    model.eval()
    data = prepare_data(model, tokenizer, data_spec, config, progress)
    log(f"held-out: {sum(data.tokens().values())} measured decode positions over {len(data.classes)} classes")
    if config.qa:
        data.qa = prepare_qa(model, tokenizer, config, log, data.progress)
    return data


def run_eval(model, tokenizer, plans: Sequence[tuple[str, PlanFile | SkipPlan]], data_spec: str | None = None,
             config: EvalConfig | None = None, profile=None, model_name: str = "", data_name: str = "",
             log=None, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate named plans (plus baselines / oracle at the first plan's realized ratio) and return the JSON dict."""
    config = config or EvalConfig()
    log = log or _quiet
    if not plans:
        raise EvalError("no plan to evaluate")
    data_spec = data_spec if data_spec is not None else config.data
    data = _prepare(model, tokenizer, plans, data_spec, config, progress, log)
    rows = []
    for name, plan in plans:
        rows += plan_rows(model, data, plan, config, {None: name, "label": f"{name} [class plans, routed by label]",
                                                      "router": f"{name} [class plans, routed by router]"})
    if config.baselines or config.oracle or config.search_reference:
        first = plans[0][1]
        reference = first.global_plan if isinstance(first, PlanFile) else first
        realized = baseline_ratio(rows[0], reference)
        if realized <= 0:
            raise EvalError(f"{plans[0][0]} skipped nothing on the held-out data; baselines need a ratio > 0")
        if config.baselines:
            log(f"baselines at realized skip ratio {realized:.3f}")
            rows += baseline_rows(model, data, reference, realized, config, profile, tokenizer=tokenizer,
                                  reference_row=rows[0])
        if want_oracle(model, config):
            rows.append(oracle_row(model, data, reference, realized, config))
        if want_search_reference(model, config):
            rows.append(search_reference_row(model, data, reference, realized, config, log=log))
    result = build_result(model, data, rows, config, data_spec, model_name, data_name)
    if config.lm_eval:
        add_lm_eval(model, tokenizer, plans, result, config, data, log)
    return result


def add_lm_eval(model, tokenizer, plans, result: dict, config: EvalConfig, data: EvalData, log=None) -> None:
    """The harness's numbers (`lm_eval` sections, docs/eval-schema.md) on the dense row, each named plan's row and,
    with baselines, every baseline / reference row (the random row: the mean over its seeds)."""
    try:
        from ..integrations.lm_eval import HarnessError, average_sections, eval_sections
    except ImportError as e:
        raise EvalError(str(e)) from None
    runs = list(plans)
    if config.baselines:
        for row in result["plans"]:
            if row["kind"] != "plan":
                names = [seed["name"] for seed in row.get("seeds", [])] or [row["name"]]
                runs += [(n, data.row_plans[n]) for n in names if n in data.row_plans]
    try:
        dense, by_name = eval_sections(model, tokenizer, runs, config, data.progress, log)
    except HarnessError as e:
        raise EvalError(f"lm-eval: {e}") from None
    result["dense"]["lm_eval"] = dense
    for row in result["plans"]:
        if row["name"] in by_name:
            row["lm_eval"] = by_name[row["name"]]
        elif row.get("seeds") and all(seed["name"] in by_name for seed in row["seeds"]):
            row["lm_eval"] = average_sections([by_name[seed["name"]] for seed in row["seeds"]])


@dataclass
class SweepTarget:
    """The plan files a sweep measures at one target ratio: a static and an adaptive fit (with class plans when the
    sweep asks for them)."""

    target: float
    static: PlanFile
    adaptive: PlanFile


def run_sweep(model, tokenizer, profile, config: EvalConfig, fitted: Sequence[SweepTarget],
              extra_plans: Sequence[tuple[str, PlanFile | SkipPlan]] = (), calibration_spec: str | None = None,
              oracle_max_sets: int = 150, model_name: str = "", log=None,
              progress: Progress | None = None) -> dict[str, Any]:
    """For each fitted target: the static plan (+ KL-refined with `config.sweep_refine`) and the adaptive plan (+
    their class plans routed by label with `config.sweep_per_class`), baselines at the reference static plan's
    realized ratio, and the exhaustive oracle where it is affordable (at `config.oracle_targets` only, when given);
    rows carry `target`. `extra_plans` are measured once, before the targets."""
    from ..fit.refine import calibration_references

    log = log or _quiet
    data = _prepare(model, tokenizer, extra_plans, config.data, config, progress, log)
    calibration = None
    if config.sweep_refine:
        with data.progress.stage("calibration references (for refining)", 1):
            calibration = calibration_references(model, tokenizer, calibration_spec, prompt_len=config.prompt_len,
                                                 window=config.window)
    rows = []
    for name, plan in extra_plans:
        rows += plan_rows(model, data, plan, config, {None: name})
    for fit in fitted:
        target_rows = _target_rows(model, tokenizer, data, fit, config, profile, calibration, calibration_spec,
                                   oracle_max_sets, log)
        for row in target_rows:
            row["target"] = fit.target
        rows += target_rows
    result = build_result(model, data, rows, config, config.data, model_name, "")
    result["sweep"] = {"targets": [fit.target for fit in fitted], "refine": config.sweep_refine,
                       "per_class": config.sweep_per_class, "profile": (profile.header or {}).get("corpus")}
    return result


def _target_rows(model, tokenizer, data: EvalData, fit: SweepTarget, config: EvalConfig, profile, calibration,
                 calibration_spec: str | None, oracle_max_sets: int, log) -> list[dict[str, Any]]:
    """One sweep target's rows (see `run_sweep`)."""
    from ..fit.refine import RefineError, refine_plan_file, refine_static

    target, refine = fit.target, config.sweep_refine
    tag = f"@{target:.2f}"
    static_family = families.FITTED_STATIC_UNREFINED if refine else families.FITTED_STATIC
    rows = plan_rows(model, data, fit.static, config, {None: static_family}, tag)
    reference_plan, reference_row = fit.static.global_plan, rows[0]
    if refine:
        try:
            # swap descent from the fitted set only (no greedy-add restart): half the cost per target
            with data.progress.stage(f"target {target:.2f}: refining the static set by measured KL", 1):
                refined = refine_static(model, tokenizer, fit.static.global_plan, calibration_spec,
                                        references=calibration, greedy_start=False)
        except RefineError as e:
            raise EvalError(f"refining at {target}: {e}") from None
        rows += plan_rows(model, data, refined, config, {None: families.FITTED_STATIC_REFINED}, tag)
        reference_plan, reference_row = refined, rows[-1]
    rows += plan_rows(model, data, fit.adaptive, config, {None: families.FITTED_ADAPTIVE}, tag)
    if config.sweep_per_class:
        rows += plan_rows(model, data, fit.static, config, {"label": families.FITTED_STATIC_PER_CLASS}, tag)
        rows += plan_rows(model, data, fit.adaptive, config, {"label": families.FITTED_ADAPTIVE_PER_CLASS}, tag)
        if refine and routable(fit.static, data, "label"):
            refined_classes = copy.deepcopy(fit.static)
            refined_classes.global_plan = refined
            try:
                with data.progress.stage(f"target {target:.2f}: refining each class's static set", 1):
                    warnings = refine_plan_file(model, tokenizer, refined_classes, calibration_spec,
                                                references=calibration, greedy_start=False, refine_global=False)
                for warning in warnings:
                    log(f"warning: {warning}")
            except RefineError as e:
                raise EvalError(f"refining class plans at {target}: {e}") from None
            rows += plan_rows(model, data, refined_classes, config,
                              {"label": families.FITTED_STATIC_PER_CLASS_REFINED}, tag)
    realized = baseline_ratio(reference_row, reference_plan)
    if realized <= 0:
        return rows
    if config.baselines:
        log(f"target {target:.2f}: baselines at realized ratio {realized:.3f}")
        rows += baseline_rows(model, data, reference_plan, realized, config, profile, suffix=f" @{realized:.3f}")
    oracle_here = config.oracle_targets is None or any(abs(target - t) < 1e-9 for t in config.oracle_targets)
    if want_oracle(model, config) and oracle_here:
        sets = oracle_set_count(model, reference_plan, realized)
        if sets <= oracle_max_sets:
            log(f"target {target:.2f}: oracle over {sets} sets")
            rows.append(oracle_row(model, data, reference_plan, realized, config, suffix=f" {tag}"))
        else:
            log(f"target {target:.2f}: oracle skipped ({sets} sets > {oracle_max_sets})")
    return rows
