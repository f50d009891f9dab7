"""KL-measured static skip sets: `refine_static` (greedy add + swap, SLEB-style) and `oracle_static` (exhaustive).

Cosine ranking is only a proxy for what skipping a layer costs. Both functions here measure the real cost: mean
per-token KL(dense || plan) on teacher-forced decode positions, with the plan applied by the runtime exactly as in
generation (see fidelity.measure_plan). The dense log-probs are computed once and reused for every candidate set, and
each candidate set is one batched forward over all calibration windows, so a search costs one forward per set.

A static set is a multiset of *slots* (layer, fraction): refinement moves a slot to another layer and keeps its
fraction, so the expected skip ratio (sum of fractions / L x eligible share) never changes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .fidelity import (DenseReference, FidelityError, dense_references, load_documents, make_batches, measure_plan,
                       pad_id_of, token_windows)
from .plan import SkipPlan

Slots = tuple[tuple[int, float], ...]


class RefineError(ValueError):
    """Refinement cannot run (not a static plan, no candidates, search too large)."""


@dataclass
class SetEvaluator:
    """Measured KL of static skip sets on fixed calibration references (memoised: a set is measured once)."""

    model: object
    references: Sequence[DenseReference]
    template: SkipPlan  # eligibility settings (apply_to, warm-up, dense-every, compensation) shared by every set
    cache: dict[Slots, float] = field(default_factory=dict)
    on_measure: Callable[[Slots, float], None] | None = None

    def __call__(self, slots: Slots) -> float:
        key = canonical(slots)
        if key not in self.cache:
            plan = replace(self.template, mode="static", skip_layers=dict(key), tau=None, max_skip=0,
                           fit=dict(self.template.fit))
            sums, _ = measure_plan(self.model, self.references, plan)
            kl = sums.total_kl_mean()
            if not math.isfinite(kl):
                raise FidelityError(f"non-finite KL for skip set {list(key)}")
            self.cache[key] = kl
            if self.on_measure:
                self.on_measure(key, kl)
        return self.cache[key]

    @property
    def evaluations(self) -> int:
        return len(self.cache)


def canonical(slots: Sequence[tuple[int, float]]) -> Slots:
    return tuple(sorted((int(layer), float(f)) for layer, f in slots))


def middle_layers(num_layers: int) -> list[int]:
    """Candidates for skipping: every layer but the first and the last (SLEB and LLM-Drop protect both)."""
    return list(range(1, num_layers - 1)) if num_layers > 2 else list(range(num_layers))


def swap_descent(evaluate: SetEvaluator, slots: Slots, candidates: Sequence[int], max_rounds: int) -> tuple[Slots, int]:
    """Best-improvement swaps (one slot -> one unused candidate) until no swap lowers the KL. Returns (set, rounds)."""
    current, best_kl, rounds = canonical(slots), evaluate(slots), 0
    while rounds < max_rounds:
        used = {layer for layer, _ in current}
        best_move = None
        for i, (_, fraction) in enumerate(current):
            for cand in candidates:
                if cand in used:
                    continue
                trial = canonical(current[:i] + ((cand, fraction),) + current[i + 1:])
                kl = evaluate(trial)
                if kl < best_kl * (1 - 1e-9):
                    best_kl, best_move = kl, trial
        if best_move is None:
            break
        current, rounds = best_move, rounds + 1
    return current, rounds


def greedy_add(evaluate: SetEvaluator, fractions: Sequence[float], candidates: Sequence[int]) -> Slots:
    """SLEB-style: add full slots first, each time the candidate whose addition costs the least measured KL."""
    chosen: Slots = ()
    for fraction in sorted(fractions, reverse=True):
        used = {layer for layer, _ in chosen}
        options = [canonical(chosen + ((c, fraction),)) for c in candidates if c not in used]
        if not options:
            raise RefineError("more skip slots than candidate layers")
        chosen = min(options, key=evaluate)
    return chosen


def refine_slots(evaluate: SetEvaluator, slots: Slots, candidates: Sequence[int], max_rounds: int = 20,
                 greedy_start: bool = True, extra_starts: dict[str, Slots] | None = None) -> tuple[Slots, dict]:
    """Swap descent from the given set, (optionally) from a greedy-add set and from each of `extra_starts` (named
    sets with the same slot fractions, e.g. the global plan's set when refining a class plan); keep the lowest KL."""
    if not slots:
        raise RefineError("the plan skips no layer: nothing to refine")
    candidates = sorted(set(candidates) | {layer for layer, _ in slots})
    if len(candidates) < len(slots):
        raise RefineError(f"{len(slots)} skip slots but only {len(candidates)} candidate layers")
    initial_kl = evaluate(slots)
    best, rounds = swap_descent(evaluate, slots, candidates, max_rounds)
    starts = {"plan": {"layers": [layer for layer, _ in canonical(slots)], "kl": _r(initial_kl),
                       "refined_kl": _r(evaluate(best)), "swaps": rounds}}
    if greedy_start:
        seed = greedy_add(evaluate, [f for _, f in slots], candidates)
        alt, alt_rounds = swap_descent(evaluate, seed, candidates, max_rounds)
        starts["greedy_add"] = {"layers": [layer for layer, _ in seed], "kl": _r(evaluate(seed)),
                                "refined_kl": _r(evaluate(alt)), "swaps": alt_rounds}
        if evaluate(alt) < evaluate(best):
            best = alt
    for name, start in (extra_starts or {}).items():
        start = canonical(start)
        if sorted(f for _, f in start) != sorted(f for _, f in canonical(slots)):
            continue  # a different slot shape would change the skip ratio
        candidates = sorted(set(candidates) | {layer for layer, _ in start})
        alt, alt_rounds = swap_descent(evaluate, start, candidates, max_rounds)
        starts[name] = {"layers": [layer for layer, _ in start], "kl": _r(evaluate(start)),
                        "refined_kl": _r(evaluate(alt)), "swaps": alt_rounds}
        if evaluate(alt) < evaluate(best):
            best = alt
    info = {"initial_kl": _r(initial_kl), "refined_kl": _r(evaluate(best)), "evaluations": evaluate.evaluations,
            "candidates": candidates, "starts": starts}
    return best, info


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def calibration_references(model, tokenizer, data_spec: str | None, *, split: str = "calibration",
                           prompt_len: int = 32, window: int = 128, docs_per_class: int | None = 8,
                           batch_size: int = 16) -> list[DenseReference]:
    """Dense references on a data spec (default: the bundled calibration split), batched per class."""
    docs = load_documents(data_spec, split=split)
    tokens, classes = token_windows(tokenizer, docs, window, docs_per_class, prompt_len + 2)
    pad = pad_id_of(tokenizer, model)
    batches = []
    for cls in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == cls]
        batches += make_batches([tokens[i] for i in idx], [cls] * len(idx), prompt_len, pad, batch_size)
    return dense_references(model, batches)


def refine_static(model, tokenizer, plan: SkipPlan, data_spec: str | None = None, *,
                  candidates: Sequence[int] | None = None,
                  prompt_len: int = 32, window: int = 128, docs_per_class: int | None = 8, max_rounds: int = 20,
                  greedy_start: bool = True, references: Sequence[DenseReference] | None = None,
                  extra_starts: dict[str, Slots] | None = None) -> SkipPlan:
    """Return `plan` with its static skip set refined by measured KL to the dense model on calibration tokens.

    The fractions (hence the expected skip ratio) are kept; `fit.refined_kl` records the measured mean KL of the
    returned set and `fit.refine` how it was found (start sets, their KL, swaps, number of sets measured, data).
    """
    if plan.mode != "static":
        raise RefineError(f"--refine works on static plans; this plan is {plan.mode!r}")
    from .registry import resolve

    num_layers = resolve(model).num_layers
    bad = [layer for layer in plan.skip_layers if not 0 <= layer < num_layers]
    if bad:
        raise RefineError(f"plan skips layers {bad} but the model has {num_layers} layers")
    if references is None:
        references = calibration_references(model, tokenizer, data_spec, prompt_len=prompt_len, window=window,
                                            docs_per_class=docs_per_class)
    evaluate = SetEvaluator(model, references, plan)
    cands = list(candidates) if candidates is not None else middle_layers(num_layers)
    best, info = refine_slots(evaluate, canonical(plan.skip_layers.items()), cands, max_rounds, greedy_start,
                              extra_starts)
    info["data"] = {"spec": data_spec or "bundled calibration split", "prompt_len": prompt_len, "window": window,
                    "docs_per_class": docs_per_class, "tokens": sum(int(r.mask.sum()) for r in references)}
    fit = dict(plan.fit)
    fit["refined_kl"] = info["refined_kl"]
    fit["refine"] = info
    return replace(plan, skip_layers=dict(best), fit=fit)



def references_of_class(references: Sequence[DenseReference], cls: str) -> list[DenseReference]:
    """The calibration batches whose measured positions all belong to `cls` (calibration batches are per class)."""
    return [r for r in references if r.row_class and set(r.row_class) == {cls}]


def refine_plan_file(model, tokenizer, plan_file, data_spec: str | None = None, *,
                     references: Sequence[DenseReference] | None = None, greedy_start: bool = True,
                     docs_per_class: int | None = 8, refine_global: bool = True,
                     min_class_gain: float = 0.02) -> list[str]:
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
                                              references=references, greedy_start=greedy_start)
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
                                extra_starts=global_start)
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
    from .registry import resolve

    cands = list(candidates) if candidates is not None else middle_layers(resolve(model).num_layers)
    fractions = sorted(fractions, reverse=True)
    k = len(fractions)
    if k == 0 or k > len(cands):
        raise RefineError(f"cannot choose {k} layers out of {len(cands)} candidates")
    partial = [f for f in fractions if f < 1.0]
    per_combo = math.perm(k, len(partial)) // math.factorial(len(partial)) if partial else 1
    total = math.comb(len(cands), k) * per_combo
    if total > max_sets:
        raise RefineError(f"exhaustive search needs {total} sets (> max_sets={max_sets}); lower the layer count")
    evaluate = evaluator or SetEvaluator(model, references, template)
    seen: set[Slots] = set()
    for combo in itertools.combinations(cands, k):
        for assignment in set(itertools.permutations(fractions)):
            slots = canonical(zip(combo, assignment))
            if slots not in seen:
                seen.add(slots)
                evaluate(slots)
    ranking = sorted(((s, evaluate.cache[s]) for s in seen), key=lambda sk: sk[1])
    return OracleResult(ranking[0][0], ranking[0][1], len(seen), ranking)
