"""References, not deployable: the best static sets found on the held-out windows themselves. The oracle measures
every set of the reference plan's slot fractions over the middle layers; where that is too many sets, the search
reference runs greedy add + swap descent by measured KL instead. Each set found is measured like any plan row."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Sequence

from .fidelity import dense_references, make_batches
from ..plan.model import SkipPlan
from ..fit.refine import SetEvaluator, canonical, middle_layers, oracle_static
from . import families
from .baselines import budget_slots, static_template
from .config import EvalConfig
from .data import EvalData, search_windows
from .._jsonable import rounded
from .rows import model_num_layers, plan_row


def want_oracle(model, config: EvalConfig) -> bool:
    """`config.oracle` when set; by default on models with at most `oracle_max_layers` layers."""
    if config.oracle is not None:
        return config.oracle
    return model_num_layers(model) <= config.oracle_max_layers


def want_search_reference(model, config: EvalConfig) -> bool:
    """`config.search_reference` when set; by default with baselines where the oracle does not run."""
    if config.search_reference is not None:
        return config.search_reference
    return config.baselines and not want_oracle(model, config)


def oracle_set_count(model, reference: SkipPlan, realized: float) -> int:
    """Sets the oracle measures for `reference` at `realized`."""
    return _set_count(len(middle_layers(model_num_layers(model))), _search_start(model, reference, realized)[1])


def _set_count(candidates: int, fractions: Sequence[float]) -> int:
    k = len(fractions)
    partial = sum(1 for f in fractions if f < 1.0)
    per_combo = math.perm(k, partial) // math.factorial(partial) if partial else 1
    return math.comb(candidates, k) * per_combo if k <= candidates else 0


def _search_start(model, reference: SkipPlan, realized: float) -> tuple[SkipPlan, list[float], tuple]:
    """(template, slot fractions, start slots): a static reference's own set and settings; otherwise (adaptive, or
    with neuron subsets) the budget `realized` x layers over the middle layers, with the baselines' eligibility."""
    num_layers = model_num_layers(model)
    if reference.mode == "static" and reference.neurons is None:
        slots = canonical(reference.skip_layers.items())
        return replace(reference, fit={}), [f for _, f in sorted(reference.skip_layers.items())], slots
    slots = budget_slots(realized * num_layers, middle_layers(num_layers))
    return static_template(reference), [f for _, f in slots], slots


def oracle_row(model, data: EvalData, reference: SkipPlan, realized: float, config: EvalConfig,
               suffix: str = "") -> dict[str, Any]:
    """Exhaustive static reference on the held-out windows: the set of the same size with the lowest KL."""
    template, fractions, _ = _search_start(model, reference, realized)
    sets = _set_count(len(middle_layers(model_num_layers(model))), fractions)
    with data.progress.stage(f"oracle search{suffix}", sets) as tick:
        evaluator = SetEvaluator(model, data.references, template, on_measure=lambda slots, kl: tick())
        result = oracle_static(model, data.references, template, fractions, evaluator=evaluator)
    plan = replace(template, mode="static", skip_layers=dict(result.slots))
    row = plan_row(model, data, plan, f"oracle static (exhaustive, {result.evaluations} sets){suffix}",
                   "oracle", config, family=families.ORACLE)
    row["note"] = ("reference, not deployable: searched on the held-out windows themselves over the middle layers")
    row["oracle_sets"] = result.evaluations
    row["oracle_top5"] = [{"layers": [l for l, _ in s], "kl_mean": rounded(kl)} for s, kl in result.ranking[:5]]
    return row


def search_reference_row(model, data: EvalData, reference: SkipPlan, realized: float, config: EvalConfig,
                         suffix: str = "", log=None) -> dict[str, Any]:
    """Where exhaustive search does not fit: greedy add + swap descent by measured KL on held-out windows (the first
    `search_docs_per_class` documents of each class, cut to `search_gen_len` decode positions), each slot tried
    against the `search_shortlist` layers the greedy pass measured cheapest (export-plan uses 4). The set
    found is then measured like every other row, on all held-out windows."""
    from ..fit.refine import refine_slots

    template, _, slots = _search_start(model, reference, realized)
    windows, classes = search_windows(data, config)
    batches = make_batches(windows, classes, config.prompt_len, data.pad_id, config.batch_size)
    started = time.perf_counter()
    with data.progress.stage(f"search reference: sets measured{suffix}", None) as tick:
        evaluator = SetEvaluator(model, dense_references(model, batches), template, on_measure=lambda s, kl: tick())
        best, info = refine_slots(evaluator, slots, middle_layers(model_num_layers(model)), greedy_start=True,
                                  shortlist=config.search_shortlist)
    plan = replace(template, mode="static", skip_layers=dict(best))
    row = plan_row(model, data, plan, f"search reference (greedy + swap on held-out){suffix}", "reference",
                   config, family=families.SEARCH_REFERENCE)
    row["note"] = ("reference, not deployable: lazy greedy add + swap descent (shortlist "
                   f"{config.search_shortlist}) by measured KL on {len(windows)} held-out windows of "
                   f"{config.prompt_len}+{config.search_gen_len} tokens")
    row["search"] = {"evaluations": info["evaluations"], "layer_forwards": info["layer_forwards"],
                     "seconds": rounded(time.perf_counter() - started), "search_kl": info["refined_kl"],
                     "starts": info["starts"]}
    if log:
        log(f"search reference: {info['evaluations']} sets in {row['search']['seconds']:.0f} s")
    return row
