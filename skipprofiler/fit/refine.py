"""Choosing plans by measured KL: `refine_static` (greedy add + swap, SLEB-style), `fit_budget_plan` (most skips
within a quality budget), `fit_adaptive_by_cost` (adaptive run lengths by measured cost) and `oracle_static`
(exhaustive), plus the linear substitutes a search needs.

Cosine ranking is only a proxy for what skipping a layer costs. These functions measure the real cost (measure.py:
mean per-token KL on calibration windows, `SetEvaluator`) and search over sets with it (search.py, torch-free);
this module sets both up on a model and records what was found in each plan's `fit`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Sequence

from .._jsonable import rounded
from ..evaluation.fidelity import DenseReference, measure_plan
from .measure import (SEARCH_DOCS_PER_CLASS, SEARCH_PROMPT_LEN, SEARCH_WINDOW, SetEvaluator, calibration_references,
                      ffn_output_means, references_of_class, with_mean_outputs)
from ..plan.model import SkipPlan
from .search import (DEFAULT_SHORTLIST, RefineError, Slots, canonical, closest_to_target, descend_from_starts,
                     exhaustive, grow_within_budget, middle_layers)

log = logging.getLogger("skipprofiler")


@dataclass
class Budget:
    """A quality budget on calibration windows: mean KL(dense || plan) and/or relative perplexity increase."""

    max_kl: float | None = None
    max_ppl_increase: float | None = None

    def allows(self, kl: float, ppl_ratio: float) -> bool:
        return ((self.max_kl is None or kl <= self.max_kl)
                and (self.max_ppl_increase is None or ppl_ratio - 1.0 <= self.max_ppl_increase))

    def describe(self) -> dict[str, float]:
        return {k: v for k, v in (("max_kl", self.max_kl), ("max_ppl_increase", self.max_ppl_increase))
                if v is not None}



def fit_to_budget(evaluate: SetEvaluator, candidates: Sequence[int], budget: Budget) -> tuple[Slots, dict]:
    """The largest static set the budget allows (search.grow_within_budget on measured KL and perplexity). Returns
    (set, record) with the greedy path (each prefix's measured KL and perplexity increase)."""

    def within(slots: Slots) -> bool:
        return budget.allows(evaluate(slots), evaluate.ppl_ratio[canonical(slots)])

    def step(slots: Slots) -> dict:
        layers = [l for l, _ in slots] if all(f == 1.0 for _, f in slots) else [[l, f] for l, f in slots]
        return {"layers": layers, "kl": rounded(evaluate(slots)),
                "ppl_increase": rounded(evaluate.ppl_ratio[slots] - 1.0)}

    chosen, tried = grow_within_budget(evaluate, candidates, within)
    path = [step(s) for s in tried]
    if not chosen:
        raise RefineError(f"no FFN can be skipped within the budget {budget.describe()}: skipping the cheapest layer "
                          f"alone measures KL {path[0]['kl']}, perplexity {path[0]['ppl_increase']:+.1%}")
    record = {"budget": budget.describe(), "kl": rounded(evaluate(chosen)),
              "ppl_increase": rounded(evaluate.ppl_ratio[canonical(chosen)] - 1.0), "path": path,
              "evaluations": evaluate.evaluations, "layer_forwards": evaluate.layers_run}
    return chosen, record


def refine_slots(evaluate: SetEvaluator, slots: Slots, candidates: Sequence[int], max_rounds: int = 20,
                 greedy_start: bool = True, extra_starts: dict[str, Slots] | None = None,
                 shortlist: int | None = DEFAULT_SHORTLIST) -> tuple[Slots, dict]:
    """search.descend_from_starts on measured KL; the record also counts the sets measured and the layer forwards
    run."""
    best, found = descend_from_starts(evaluate, slots, candidates, max_rounds, greedy_start, extra_starts, shortlist)
    info = {"initial_kl": found.pop("initial_kl"), "refined_kl": found.pop("refined_kl"),
            "evaluations": evaluate.evaluations, "layer_forwards": evaluate.layers_run, **found}
    return best, info


# decode positions (~12 k positions on the bundled split). A d x d map has d + 1 unknowns per output: it needs far
# more positions than a search measures sets on.
SUBSTITUTE_DOCS_PER_CLASS, SUBSTITUTE_GEN_LEN = 24, 128


def with_substitutes(model, tokenizer, plan: SkipPlan, data_spec: str | None, candidates: Sequence[int],
                     rank: int | None = None, *, text_column: str | None = None,
                     class_column: str | None = None) -> SkipPlan:
    """`plan` with a linear substitute for every candidate layer when it asks for compensation linear (a search may
    skip any of them), fitted on calibration windows the search does not measure on; `fit.substitutes` records how."""
    if plan.compensation != "linear" or plan.linear is not None:
        return plan
    from ..plan.model import LinearMaps
    from .substitute import calibration_batches, fit_substitutes

    started = time.perf_counter()
    batches = calibration_batches(model, tokenizer, data_spec, skip_docs_per_class=SEARCH_DOCS_PER_CLASS,
                                  docs_per_class=SUBSTITUTE_DOCS_PER_CLASS, prompt_len=SEARCH_PROMPT_LEN,
                                  gen_len=SUBSTITUTE_GEN_LEN, text_column=text_column, class_column=class_column)
    maps = fit_substitutes(model, batches, candidates, rank)
    tensors = {k: v for layer, m in maps.items() for k, v in m.tensors(str(layer)).items()}
    first = next(iter(maps.values())).record
    fit = dict(plan.fit)
    fit["substitutes"] = {
        "rank": rank, "tokens": first["tokens"], "heldout_tokens": first["heldout_tokens"],
        "data": {"spec": data_spec or "bundled calibration split", "prompt_len": SEARCH_PROMPT_LEN,
                 "gen_len": SUBSTITUTE_GEN_LEN, "docs_per_class": SUBSTITUTE_DOCS_PER_CLASS,
                 "after_search_docs": SEARCH_DOCS_PER_CLASS},
        "seconds": rounded(time.perf_counter() - started),
        "layers": {int(l): {k: m.record[k] for k in ("lambda", "heldout_error", "heldout_error_mean",
                                                      "sinks_left_out")} for l, m in maps.items()}}
    return replace(plan, linear=LinearMaps(rank, tensors), fit=fit)


ERROR_AWARE_MIN_GAIN = 0.01  # an error-aware refit is kept when it lowers the measured KL by at least 1 %


def error_aware_substitutes(model, tokenizer, plan: SkipPlan, references: Sequence[DenseReference],
                            data_spec: str | None = None, *, text_column: str | None = None,
                            class_column: str | None = None) -> SkipPlan:
    """Refit the maps of a static linear plan in layer order, each on the inputs the plan's earlier layers produce
    with their (refitted) substitutes in place, and keep the refit when it measures at least ERROR_AWARE_MIN_GAIN
    less KL on `references`. `fit.substitutes.error_aware` records both measurements and the choice."""
    if plan.compensation != "linear" or plan.linear is None or plan.mode != "static" or len(plan.skip_layers) < 2:
        return plan
    from ..plan.model import LinearMaps
    from .substitute import calibration_batches, fit_substitutes

    started = time.perf_counter()
    rank = plan.linear.rank
    batches = calibration_batches(model, tokenizer, data_spec, skip_docs_per_class=SEARCH_DOCS_PER_CLASS,
                                  docs_per_class=SUBSTITUTE_DOCS_PER_CLASS, prompt_len=SEARCH_PROMPT_LEN,
                                  gen_len=SUBSTITUTE_GEN_LEN, text_column=text_column, class_column=class_column)
    layers = sorted(plan.skip_layers)
    tensors = dict(plan.linear.tensors)
    for i, layer in enumerate(layers[1:], start=1):  # the first skipped layer's inputs are the dense model's
        earlier = replace(plan, skip_layers={l: plan.skip_layers[l] for l in layers[:i]},
                          linear=LinearMaps(rank, tensors))
        fitted = fit_substitutes(model, batches, [layer], rank, plan=earlier)[layer]
        tensors.update(fitted.tensors(str(layer)))
    refit = replace(plan, linear=LinearMaps(rank, tensors))
    before, _ = measure_plan(model, references, plan)
    after, _ = measure_plan(model, references, refit)
    kl_before, kl_after = before.total_kl_mean(), after.total_kl_mean()
    keep = kl_after < kl_before * (1 - ERROR_AWARE_MIN_GAIN)
    chosen = refit if keep else plan
    record = {"kl_independent": rounded(kl_before), "kl_error_aware": rounded(kl_after), "kept": bool(keep),
              "min_gain": ERROR_AWARE_MIN_GAIN, "seconds": rounded(time.perf_counter() - started)}
    fit = dict(chosen.fit)
    fit["substitutes"] = {**fit.get("substitutes", {}), "error_aware": record}
    if keep and "refined_kl" in fit:
        fit["refined_kl"] = rounded(kl_after)
    log.info("error-aware substitutes: KL %.4f -> %.4f (%s)", kl_before, kl_after, "kept" if keep else "not kept")
    return replace(chosen, fit=fit)


def class_substitutes(model, tokenizer, plan_file, data_spec: str | None = None, *, text_column: str | None = None,
                      class_column: str | None = None) -> None:
    """Per-class maps on the global layer set: each class plan becomes the global plan with maps fitted on that
    class's calibration windows only (as many positions per class as the global maps had in all), so a router can
    send a prompt to the maps of its kind of text. Class layer *sets* are not searched: with a few documents per
    class they overfit (docs/results.md)."""
    from ..plan.model import LinearMaps
    from .substitute import calibration_batches, fit_substitutes

    glob = plan_file.global_plan
    classes = sorted(plan_file.classes)
    for name in classes:
        started = time.perf_counter()
        batches = calibration_batches(model, tokenizer, data_spec, skip_docs_per_class=SEARCH_DOCS_PER_CLASS,
                                      docs_per_class=SUBSTITUTE_DOCS_PER_CLASS * len(classes),
                                      prompt_len=SEARCH_PROMPT_LEN, gen_len=SUBSTITUTE_GEN_LEN,
                                      text_column=text_column, class_column=class_column, only_class=name)
        maps = fit_substitutes(model, batches, sorted(glob.skip_layers), glob.linear.rank)
        tensors = {k: v for layer, m in maps.items() for k, v in m.tensors(str(layer)).items()}
        first = next(iter(maps.values())).record
        fit = {k: v for k, v in glob.fit.items() if k not in ("refine", "substitutes")}
        fit["substitutes"] = {"class": name, "rank": glob.linear.rank, "tokens": first["tokens"],
                              "seconds": rounded(time.perf_counter() - started),
                              "layers": {int(l): {k: m.record[k] for k in ("lambda", "heldout_error",
                                                                            "heldout_error_mean")}
                                         for l, m in maps.items()}}
        fit["class_maps_on_global_set"] = True
        plan_file.classes[name] = replace(glob, linear=LinearMaps(glob.linear.rank, tensors), fit=fit)


def substitute_cost_share(model, plan: SkipPlan) -> float:
    """A plan's substitute FLOPs per skipped call as a share of one FFN call's FLOPs (0 without linear maps)."""
    if plan.compensation != "linear" or plan.linear is None:
        return 0.0
    from ..arch.flops import token_flops

    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd")
    return plan.linear.flops_per_call(hidden) / token_flops(model)["ffn"]


def keep_skipped_means(plan: SkipPlan) -> SkipPlan:
    """Drop the mean outputs and linear maps of layers the plan never skips (they only make the files longer)."""
    if not plan.ffn_mean and plan.linear is None:
        return plan
    skippable = set(plan.skippable_layers())
    if plan.linear is not None:
        plan = replace(plan, linear=plan.linear.keep(skippable))
        if "substitutes" in plan.fit:
            record = dict(plan.fit["substitutes"])
            record["layers"] = {l: v for l, v in record["layers"].items() if l in skippable}
            plan.fit = {**plan.fit, "substitutes": record}
    if not plan.ffn_mean:
        return plan
    return replace(plan, ffn_mean={l: v for l, v in plan.ffn_mean.items() if l in skippable})


@dataclass
class SearchSetup:
    """What a search on a model starts from: the plan with the fillers any candidate set needs (mean outputs, linear
    substitutes), the calibration references, the candidate layers, the evaluator, and the `data` record."""

    plan: SkipPlan
    references: Sequence[DenseReference]
    candidates: list[int]
    evaluate: SetEvaluator
    num_layers: int
    data: dict


def search_setup(model, tokenizer, plan: SkipPlan, data_spec: str | None, *,
                 references: Sequence[DenseReference] | None, candidates: Sequence[int] | None, prompt_len: int,
                 window: int, docs_per_class: int | None, rank: int | None) -> SearchSetup:
    """Check `plan`'s layers against the model, measure the dense references unless given (default candidates: the
    middle layers), and give `plan` mean outputs / linear substitutes for every layer the search may skip."""
    from ..arch.registry import resolve

    num_layers = resolve(model).num_layers
    bad = [layer for layer in plan.skip_layers if not 0 <= layer < num_layers]
    if bad:
        raise RefineError(f"plan skips layers {bad} but the model has {num_layers} layers")
    if references is None:
        references = calibration_references(model, tokenizer, data_spec, prompt_len=prompt_len, window=window,
                                            docs_per_class=docs_per_class)
    plan = with_mean_outputs(model, plan, references)
    cands = list(candidates) if candidates is not None else middle_layers(num_layers)
    plan = with_substitutes(model, tokenizer, plan, data_spec, sorted(set(cands) | set(plan.skip_layers)), rank)
    data = {"spec": data_spec or "bundled calibration split", "prompt_len": prompt_len, "window": window,
            "docs_per_class": docs_per_class, "tokens": sum(int(r.mask.sum()) for r in references)}
    return SearchSetup(plan, references, cands, SetEvaluator(model, references, plan), num_layers, data)


def refine_static(model, tokenizer, plan: SkipPlan, data_spec: str | None = None, *,
                  candidates: Sequence[int] | None = None,
                  prompt_len: int = SEARCH_PROMPT_LEN, window: int = SEARCH_WINDOW,
                  docs_per_class: int | None = SEARCH_DOCS_PER_CLASS, max_rounds: int = 20,
                  greedy_start: bool = True, references: Sequence[DenseReference] | None = None,
                  extra_starts: dict[str, Slots] | None = None, rank: int | None = None,
                  error_aware: bool = False) -> SkipPlan:
    """Return `plan` with its static skip set refined by measured KL to the dense model on calibration tokens.

    The fractions (hence the expected skip ratio) are kept; `fit.refined_kl` records the measured mean KL of the
    returned set and `fit.refine` how it was found (start sets, their KL, swaps, number of sets measured, data).
    """
    if plan.mode != "static":
        raise RefineError(f"refinement works on static plans; this plan is {plan.mode!r}")
    setup = search_setup(model, tokenizer, plan, data_spec, references=references, candidates=candidates,
                         prompt_len=prompt_len, window=window, docs_per_class=docs_per_class, rank=rank)
    plan = setup.plan
    best, info = refine_slots(setup.evaluate, canonical(plan.skip_layers.items()), setup.candidates, max_rounds,
                              greedy_start, extra_starts)
    info["data"] = setup.data
    fit = dict(plan.fit)
    fit["refined_kl"] = info["refined_kl"]
    fit["refine"] = info
    plan = keep_skipped_means(replace(plan, skip_layers=dict(best), fit=fit))
    return error_aware_substitutes(model, tokenizer, plan, setup.references, data_spec) if error_aware else plan


def fit_budget_plan(model, tokenizer, template: SkipPlan, budget: Budget, data_spec: str | None = None, *,
                    references: Sequence[DenseReference] | None = None, candidates: Sequence[int] | None = None,
                    prompt_len: int = SEARCH_PROMPT_LEN, window: int = SEARCH_WINDOW,
                    docs_per_class: int | None = SEARCH_DOCS_PER_CLASS, gen_len: int | None = None,
                    rank: int | None = None) -> SkipPlan:
    """A static plan with the most FFN skips whose measured cost on calibration windows stays within `budget`
    (`fit_to_budget`); `template` gives the eligibility settings. The plan records the budget, the measured cost and
    the greedy path in `fit`, and its expected skip ratio."""
    from .from_profile import DEFAULT_HORIZON, static_skip_ratio

    setup = search_setup(model, tokenizer, template, data_spec, references=references, candidates=candidates,
                         prompt_len=prompt_len, window=window, docs_per_class=docs_per_class, rank=rank)
    template = setup.plan
    slots, record = fit_to_budget(setup.evaluate, setup.candidates, budget)
    horizon = max(1, (gen_len or DEFAULT_HORIZON) - template.warmup_tokens)
    plan = replace(template, mode="static", skip_layers=dict(slots), tau=None, max_skip=0)
    plan.expected_skip_ratio = rounded(static_skip_ratio(plan, setup.num_layers, horizon))
    record["data"] = setup.data
    plan.fit = {"method": "budget-greedy", **({"gen_len": gen_len} if gen_len else {}), "horizon": horizon,
                "refined_kl": record["kl"], "budget_fit": record,
                **({"substitutes": template.fit["substitutes"]} if "substitutes" in template.fit else {})}
    return keep_skipped_means(plan)  # not refitted error-aware: that could move the set across the budget


ADAPTIVE_RUN_LENGTHS = (1, 2, 3, 4, 6, 8)  # k values measured by fit_adaptive_by_cost
ADAPTIVE_DENSE_EVERY = (0, 6)  # never, and the paper's every 6th token
RATIO_SLACK = 0.025  # a candidate counts as "at the target" when its realized ratio is this close


def fit_adaptive_by_cost(model, profile, settings, references: Sequence[DenseReference], *,
                         run_lengths: Sequence[int] = ADAPTIVE_RUN_LENGTHS,
                         dense_every: Sequence[int] = ADAPTIVE_DENSE_EVERY, cls: str | None = None) -> SkipPlan:
    """An adaptive plan chosen by measured cost: for every run length k and dense-every in the grid, tau is fitted
    to the target on the profile (fit.fit_adaptive's simulation), then the plan is applied with the runtime on the
    calibration windows; among the candidates whose realized ratio there is within RATIO_SLACK of the target, the
    lowest mean KL wins (else the closest ratio; search.closest_to_target). `fit.measured` records every candidate's
    ratio and KL."""
    from .from_profile import FitError, fit_adaptive

    means = ffn_output_means(model, references) if settings.compensation == "mean_output" else None
    tried = []
    for every in dense_every:
        for k in run_lengths:
            try:
                plan = fit_adaptive(profile, replace(settings, max_skip=k, dense_every=every, horizon=None).resolve(),
                                    cls)
            except FitError:
                continue
            plan = keep_skipped_means(replace(plan, ffn_mean=means)) if means else plan
            sums, stats = measure_plan(model, references, plan)
            tried.append((plan, stats["decided_skip_ratio"], sums.total_kl_mean(), sums.summary(None)))
            log.info("adaptive k %d dense-every %d: realized %.3f KL %.4f", k, every, stats["decided_skip_ratio"],
                     tried[-1][2])
    if not tried:
        raise RefineError(f"no adaptive plan reaches {settings.target:g} for any run length in {list(run_lengths)}")
    index, at_target = closest_to_target([(t[1], t[2]) for t in tried], settings.target, RATIO_SLACK)
    plan, ratio, kl, summary = tried[index]
    plan.fit["measured"] = {
        "kl": rounded(kl), "ppl_increase": rounded(summary["ppl"] / summary["ppl_dense"] - 1.0),
        "calibration_skip_ratio": rounded(ratio), "chosen_from": "at target" if at_target else "closest ratio",
        # per candidate: k, dense-every, realized ratio, KL
        "candidates": [[t[0].max_skip, t[0].dense_every, rounded(t[1]), rounded(t[2])] for t in tried],
        "tokens": sum(int(r.mask.sum()) for r in references)}
    return plan


def compare_with_static(model, adaptive: SkipPlan, references: Sequence[DenseReference]) -> dict:
    """The refined static plan at the adaptive plan's realized calibration ratio, measured on the same windows:
    what an adaptive plan has to beat (FFN-SkipLLM's rule is only worth its per-token work when it wins)."""
    from ..arch.registry import resolve

    num_layers = resolve(model).num_layers
    ratio = adaptive.fit["measured"]["calibration_skip_ratio"]
    budget = ratio * num_layers
    full = int(math.floor(budget + 1e-9))
    fractions = [1.0] * full + ([rounded(budget - full, 3, decimals=True)] if budget - full >= 0.01 else [])
    template = with_mean_outputs(model, SkipPlan(mode="static", compensation=adaptive.compensation,
                                                 norm_gain=adaptive.norm_gain), references)
    evaluate = SetEvaluator(model, references, template)
    start = tuple((layer, f) for layer, f in zip(middle_layers(num_layers), fractions))  # any set of this shape
    best, info = refine_slots(evaluate, start, middle_layers(num_layers), greedy_start=True)  # as export-plan --refine
    return {"skip_ratio": rounded(sum(fractions) / num_layers), "layers": [[l, f] for l, f in best],
            "kl": rounded(evaluate(best)), "adaptive_kl": adaptive.fit["measured"]["kl"],
            "static_wins": bool(evaluate(best) < adaptive.fit["measured"]["kl"])}


def refine_plan_file(model, tokenizer, plan_file, data_spec: str | None = None, *,
                     references: Sequence[DenseReference] | None = None, greedy_start: bool = True,
                     docs_per_class: int | None = SEARCH_DOCS_PER_CLASS, refine_global: bool = True,
                     min_class_gain: float = 0.02, rank: int | None = None, error_aware: bool = False) -> list[str]:
    """Refine the global static plan on all calibration windows and each static class plan on its own class's
    windows only (a class plan should be best for its class, not for the mix). Each class search also starts from
    the global plan's set, and a class keeps a set of its own only when it measures at least `min_class_gain`
    (relative) less KL than the global set on that class's windows: a class has a quarter of the windows or less,
    so smaller gains are within what a different sample of the same class undoes (measured on the demo model).
    Returns warnings for class plans left as fitted because the calibration data has no windows of that class."""
    if references is None:
        references = calibration_references(model, tokenizer, data_spec, docs_per_class=docs_per_class)
    if refine_global:
        plan_file.global_plan = refine_static(model, tokenizer, plan_file.global_plan, data_spec,
                                              references=references, greedy_start=greedy_start, rank=rank,
                                              error_aware=error_aware)
    warnings = []
    global_plan = plan_file.global_plan
    global_start = ({"global_plan": canonical(global_plan.skip_layers.items())}
                    if global_plan.mode == "static" and global_plan.skip_layers else None)
    for name, plan in sorted(plan_file.classes.items()):
        if plan.mode != "static" or not plan.skip_layers:
            continue
        own = references_of_class(references, name)
        if not own:
            warnings.append(f"class {name!r}: no calibration windows of this class, its plan is not refined")
            continue
        refined = refine_static(model, tokenizer, plan, data_spec, references=own, greedy_start=greedy_start,
                                extra_starts=global_start, rank=rank)
        refined.fit["refine"]["data"]["class"] = name
        if global_start and "global_plan" in refined.fit["refine"]["starts"]:
            global_kl = refined.fit["refine"]["starts"]["global_plan"]["kl"]
            refined.fit["refine"]["global_plan_kl"] = global_kl
            if refined.fit["refined_kl"] > global_kl * (1 - min_class_gain):
                refined = replace(refined, skip_layers=dict(global_start["global_plan"]),
                                  fit={**refined.fit, "refined_kl": global_kl})
                refined.fit["refine"] = {**refined.fit["refine"], "kept_global_set": True,
                                         "min_class_gain": min_class_gain}
        plan_file.classes[name] = refined
    return warnings


@dataclass
class OracleResult:
    """The cheapest set of an exhaustive search, its KL, the number of sets measured and all of them ranked."""

    slots: Slots
    kl: float
    evaluations: int
    ranking: list[tuple[Slots, float]]  # every set measured, best first


def oracle_static(model, references: Sequence[DenseReference], template: SkipPlan, fractions: Sequence[float],
                  candidates: Sequence[int] | None = None, max_sets: int = 2000,
                  evaluator: SetEvaluator | None = None) -> OracleResult:
    """Exhaustive search: the static set with these slot fractions and the lowest measured KL.

    Every combination of candidate layers (default: the middle layers) is measured; with a fractional slot every
    choice of which chosen layer carries it is measured too. Refuses searches larger than `max_sets`.
    """
    from ..arch.registry import resolve

    cands = list(candidates) if candidates is not None else middle_layers(resolve(model).num_layers)
    ranking = exhaustive(evaluator or SetEvaluator(model, references, template), fractions, cands, max_sets)
    return OracleResult(ranking[0][0], ranking[0][1], len(ranking), ranking)
