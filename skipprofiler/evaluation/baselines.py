"""Baselines at the reference plan's realized skip ratio (definitions: docs/eval-schema.md): random static FFN sets,
the paper's contiguous window, the paper's adaptive rule at its defaults, LLM-Drop's top-by-cosine, ShortGPT's layer
drop and ReplaceMe-style linear blocks."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any, Sequence

import torch

from ..arch.flops import FlopModel
from .fidelity import DenseReference, measure_plan, model_forward
from ..plan.model import SkipPlan
from ..fit.refine import canonical, middle_layers
from . import families
from .config import EvalConfig, EvalError
from .data import EvalData
from .._jsonable import rounded
from .rows import hooked_row, model_num_layers, plan_row


def budget_slots(budget: float, order: Sequence[int]) -> tuple[tuple[int, float], ...]:
    """Take layers in `order`: full layers while the budget lasts, then one fractional layer for the remainder."""
    full = int(math.floor(budget + 1e-9))
    rest = rounded(budget - full, 3, decimals=True)
    slots = [(layer, 1.0) for layer in order[:full]]
    if rest >= 0.01 and full < len(order):
        slots.append((order[full], rest))
    return canonical(slots)


def static_template(reference: SkipPlan) -> SkipPlan:
    """Eligibility of the baselines: the reference's warm-up and apply_to, every eligible position skipped."""
    return SkipPlan(mode="static", apply_to=reference.apply_to, warmup_tokens=reference.warmup_tokens,
                    dense_every=0, compensation="none")


def paper_adaptive(num_layers: int, max_skip: int, max_seq_len: int) -> SkipPlan:
    """FFN-SkipLLM with the paper's defaults: tau 0.95, 5-of-32 cold layers at each end (scaled to depth, >= 1),
    every 6th token dense, warm-up max_seq_len // 64 (max_seq_len: the length being generated, prompt included)."""
    cold = max(1, round(5 * num_layers / 32))
    return SkipPlan(mode="adaptive", tau=[0.95] * num_layers, cold_start=cold, cold_end=cold, max_skip=max_skip,
                    warmup_tokens=max_seq_len // 64, dense_every=6,
                    fit={"baseline": families.PAPER_DEFAULTS})


def contiguous_window(num_layers: int, budget: float) -> list[int]:
    """The input-agnostic window: consecutive middle layers, centred between the first and last layer."""
    middle = middle_layers(num_layers)
    width = min(len(middle), int(math.ceil(budget - 1e-9)))
    start = middle[0] + (len(middle) - width) // 2
    window = list(range(start, start + width))
    return window + [l for l in middle if l not in window]


def block_influence(model, references: Sequence[DenseReference]) -> list[float]:
    """ShortGPT's Block Influence per decoder layer: mean 1 - cos(layer input, layer output) over prompt tokens."""
    from ..arch.registry import first_tensor, resolve

    layers = resolve(model).layers
    totals, counts = [0.0] * len(layers), [0] * len(layers)
    handles = []
    state: dict[str, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            out = first_tensor(output)
            mask = state["mask"]
            cos = torch.nn.functional.cosine_similarity(inp.float(), out.float(), dim=-1)[mask]
            totals[index] += float((1 - cos).double().sum())
            counts[index] += int(mask.sum())
        return fn

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        forward = model_forward(model)
        with torch.inference_mode():
            for ref in references:
                batch = ref.batch
                pos = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
                state["mask"] = (batch.attention_mask.bool() & (pos < batch.prompt_len)).to(
                    next(model.parameters()).device)
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    return [t / max(c, 1) for t, c in zip(totals, counts)]


def layer_ranking_from_profile(profile, num_layers: int) -> list[int]:
    """LLM-Drop ranking: layers by mean `residual` cosine, most redundant first (decode regime when profiled)."""
    regime = "decode" if profile.tokens("decode") > 0 else "prompt"
    means = profile.layer_stats("residual", regime)["mean"]
    if len(means) != num_layers:
        raise EvalError(f"the profile has {len(means)} layers but the model has {num_layers}")
    return sorted(range(num_layers), key=lambda l: -float(means[l]))


def baseline_rows(model, data: EvalData, reference: SkipPlan, realized: float, config: EvalConfig,
                  profile=None, suffix: str = "", *, tokenizer=None,
                  reference_row: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every baseline at the reference plan's realized skip ratio, names ending in `suffix`: LLM-Drop with the
    `profile`, ReplaceMe-style with the `tokenizer` (it fits on calibration windows) and the `reference_row`."""
    num_layers = model_num_layers(model)
    budget = realized * num_layers
    template = static_template(reference)
    rows = []

    def static_row(name: str, order: Sequence[int], note: str, family: str) -> dict[str, Any]:
        plan = replace(template, skip_layers=dict(budget_slots(budget, order)))
        row = plan_row(model, data, plan, name + suffix, "baseline", config, family=family)
        row["note"] = note
        return row

    middle = middle_layers(num_layers)
    seeds = []
    for seed in range(config.random_seeds):
        order = list(middle)
        random.Random(config.seed + seed).shuffle(order)
        seeds.append(static_row(f"random seed {config.seed + seed}", order, "random static FFN set",
                                families.RANDOM_FFN))
    rows.append(_average_rows(seeds, f"random FFN (mean of {len(seeds)} seeds){suffix}"))
    rows.append(static_row("contiguous window", contiguous_window(num_layers, budget),
                           "input-agnostic contiguous window of middle FFNs (paper's baseline)",
                           families.CONTIGUOUS_WINDOW))
    if profile is not None:
        rows.append(static_row("LLM-Drop top-by-cosine", layer_ranking_from_profile(profile, num_layers),
                               "LLM-Drop-style static MLP drop: top-N layers by mean residual cosine",
                               families.LLM_DROP))
    rows.append(_paper_adaptive_row(model, data, realized, config, suffix))
    drop_count = max(1, round(budget))
    with data.progress.stage(f"ShortGPT block influence{suffix}", 1):
        influence = block_influence(model, data.references)
    order = sorted(range(num_layers), key=lambda l: influence[l])[:drop_count]
    row = layer_drop_row(model, data, order, f"ShortGPT layer drop ({drop_count} layers){suffix}", config)
    row["block_influence"] = [rounded(x) for x in influence]
    rows.append(row)
    if tokenizer is not None and reference_row is not None:
        rows.append(replaceme_row(model, tokenizer, data, reference_row, config, suffix))
    return rows


def _average_rows(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The random baseline: every number the mean over its seeds' rows, `seeds` listing each."""
    out = dict(rows[0])
    out["name"] = name
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("greedy_new_tokens",
                                                                                         "greedy_prompts"):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            out[key] = rounded(sum(vals) / len(vals))
    out["per_class"] = {c: {k: rounded(sum(r["per_class"][c][k] for r in rows) / len(rows)) for k in v}
                        for c, v in rows[0]["per_class"].items()}
    if "qa_per_class" in rows[0]:
        out["qa_per_class"] = {c: rounded(sum(r["qa_per_class"][c] for r in rows) / len(rows))
                               for c in rows[0]["qa_per_class"]}
    out["layers"] = [r["layers"] for r in rows]
    out["seeds"] = [{"name": r["name"], "kl_mean": r["kl_mean"], "layers": r["layers"]} for r in rows]
    out["note"] = "random static FFN sets among the middle layers, metrics averaged over seeds"
    return out


def _paper_adaptive_row(model, data: EvalData, realized: float, config: EvalConfig, suffix: str) -> dict[str, Any]:
    """The paper's rule has no ratio knob but the window k: pick the k whose realized ratio is closest."""
    num_layers = model_num_layers(model)
    max_pos = config.window
    probe = [data.of_class(c)[0] for c in data.classes]
    cold = max(1, round(5 * num_layers / 32))
    best_k, best_gap = 1, math.inf
    window_sizes = range(1, max(1, num_layers - 2 * cold) + 1)
    with data.progress.stage(f"paper defaults: choosing k{suffix}", len(window_sizes)) as tick:
        for k in window_sizes:
            _, stats = measure_plan(model, probe, paper_adaptive(num_layers, k, max_pos))
            gap = abs(stats["decided_skip_ratio"] - realized)
            if gap < best_gap:
                best_k, best_gap = k, gap
            tick()
    plan = paper_adaptive(num_layers, best_k, max_pos)
    row = plan_row(model, data, plan, f"FFN-SkipLLM paper defaults (k={best_k}){suffix}", "baseline", config,
                   family=families.PAPER_DEFAULTS)
    row["note"] = (f"tau 0.95, cold {plan.cold_start}+{plan.cold_end} layers, dense every 6th token, warm-up "
                   f"{plan.warmup_tokens}; k chosen for the closest realized ratio")
    return row


def layer_drop_row(model, data: EvalData, layers: Sequence[int], name: str, config: EvalConfig) -> dict[str, Any]:
    """ShortGPT-style: the whole decoder `layers` return their input (attention dropped too)."""
    from .blocks import DroppedLayers

    num_layers = model_num_layers(model)
    forward = model_forward(model)
    data.row_plans[name] = ("drop_layers", list(layers))  # harness runs (--lm-eval) drop the same layers
    row = hooked_row(model, data, name, config, DroppedLayers(model, layers), lambda ref: forward(ref.batch),
                     family=families.SHORTGPT, mode="layer_drop", layers=sorted(layers), qa_dropped_layers=layers)
    row["skip_ratio"] = rounded(len(layers) / num_layers)
    row["saved_share"] = row["ffn_flops_saved_share"] = row["skip_ratio"]
    flops = FlopModel.of(model)
    dense = flops.per_token(num_layers, config.flop_context)
    kept = num_layers - len(layers)
    remaining = flops.lm_head + kept / num_layers * (dense - flops.lm_head)  # attention and FFN both dropped
    row["ideal_speedup"] = rounded(dense / remaining)
    row["decode_flops_saved_share"] = rounded(1 - remaining / dense)
    row["note"] = "ShortGPT-style: whole decoder layers dropped (attention too, on prompt and decode positions)"
    return row


def replaceme_row(model, tokenizer, data: EvalData, reference_row: dict[str, Any], config: EvalConfig,
                  suffix: str = "") -> dict[str, Any]:
    """ReplaceMe-style baseline (skipprofiler.evaluation.blocks) with as many whole blocks replaced as save about the FLOPs
    per decode token that `reference_row` saves (net of its substitutes), fitted on calibration windows."""
    from .blocks import ReplacedBlocks, fit_block_replacement
    from ..fit.refine import SEARCH_DOCS_PER_CLASS, SEARCH_PROMPT_LEN, SUBSTITUTE_DOCS_PER_CLASS, SUBSTITUTE_GEN_LEN
    from ..fit.substitute import calibration_batches

    flops = FlopModel.of(model)
    num_layers = model_num_layers(model)
    dense = flops.per_token(num_layers, config.flop_context)
    saved = dense * reference_row["decode_flops_saved_share"]
    block = flops.block(config.flop_context)
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    map_flops = 2 * hidden * hidden + hidden
    count = max(1, min(num_layers - 2, round((saved + map_flops) / block)))
    with data.progress.stage(f"ReplaceMe-style: fitting {count} blocks{suffix}", 1):
        batches = calibration_batches(model, tokenizer, config.calibration_data,
                                      skip_docs_per_class=SEARCH_DOCS_PER_CLASS,
                                      docs_per_class=SUBSTITUTE_DOCS_PER_CLASS, prompt_len=SEARCH_PROMPT_LEN,
                                      gen_len=SUBSTITUTE_GEN_LEN)
        replacement = fit_block_replacement(model, batches, count)
    replaced = ReplacedBlocks(model, replacement)
    name = f"ReplaceMe-style: blocks {replacement.start}-{replacement.start + count - 1} -> linear map{suffix}"

    def teacher_forced(ref):
        with replaced.decode_from(ref.batch.prompt_len):
            return model_forward(model)(ref.batch)

    row = hooked_row(model, data, name, config, replaced, teacher_forced, family=families.REPLACEME,
                     mode="block_replacement", layers=replacement.layers, qa_prefilled=True)
    remaining = dense - count * block + map_flops
    row["ideal_speedup"] = rounded(dense / remaining)
    row["decode_flops_saved_share"] = rounded(1 - remaining / dense)
    # the replaced blocks' FFNs are not computed (the map's FLOPs count against the whole blocks above)
    row["skip_ratio"] = row["saved_share"] = row["ffn_flops_saved_share"] = rounded(count / num_layers)
    row["fit"] = {"start": replacement.start, "count": count, **replacement.map.record,
                  "cosine_distance": {str(k): rounded(v) for k, v in replacement.cosine_distance.items()}}
    row["note"] = ("ReplaceMe-style (training-free): a contiguous run of whole decoder blocks (attention and FFN) "
                   "replaced by one ridge least-squares linear map at decode positions, the run chosen by input/output "
                   "cosine distance; as many blocks as save the reference plan's decode FLOPs")
    return row
