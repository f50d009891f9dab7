"""Rows: one measured line of the eval result per plan (and route) or hooked baseline, on the shared held-out data.

A plan row is measured through the runtime (`apply_plan` + `handle.decode_from` for teacher forcing, prompt/decode
detection for greedy generation and the speed benchmark), so its numbers describe what deployment runs. `plan_rows`
gives every row one plan has (global, class plans routed by label, routed by the plan's router); `hooked_row`
measures a baseline that changes the model with hooks instead of a plan. Key order and meaning: docs/eval-schema.md.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .._jsonable import rounded
from ..arch.flops import FlopModel
from .fidelity import (
    FidelityError,
    FidelitySums,
    compare,
    compare_greedy,
    greedy_tokens,
    measure_plan,
)
from ..plan.model import PlanFile, SkipPlan, generation_warnings
from .config import EvalConfig, EvalError
from .data import EvalData

ROUTES = (None, "label", "router")  # the global plan; each class's plan on its class; the plan's router picks


def rounded_all(d: dict) -> dict:
    return {k: rounded(v) for k, v in d.items()}


def model_num_layers(model) -> int:
    from ..arch.registry import resolve

    return resolve(model).num_layers


def summarize(sums: FidelitySums, classes: Sequence[str], name: str) -> dict[str, Any]:
    """Teacher-forced fidelity overall and per class (`kl_mean`, `ppl`, `ppl_dense`, `ppl_increase`, ...)."""
    try:
        overall = sums.summary(None)
        per_class = {c: rounded_all(sums.summary(c)) for c in classes if c in sums.count}
    except FidelityError as e:
        raise EvalError(f"{name}: {e}") from None
    row = rounded_all(overall)
    row["ppl_increase"] = rounded(overall["ppl"] / overall["ppl_dense"] - 1.0)
    row["per_class"] = per_class
    return row


def plan_layers(plan: SkipPlan) -> Any:
    """A row's `layers`: static [[layer, fraction], ...]; adaptive its thresholds and window."""
    if plan.mode == "static":
        return [[layer, rounded(f)] for layer, f in sorted(plan.skip_layers.items())]
    return {"tau": sorted(set(rounded(t) for t in (plan.tau or []))), "cold_start": plan.cold_start,
            "cold_end": plan.cold_end, "max_skip": plan.max_skip}


def prompt_class_of(route: str | None, cls: str | None) -> str | None:
    """The runtime's prompt_class for a row: the global plan, the true label's class plan, or the plan's router."""
    return {None: None, "label": cls, "router": "auto"}[route]


def routable(plan: PlanFile | SkipPlan, data: EvalData, route: str | None) -> bool:
    """Whether `plan` can run on `route`: routed by label needs a class plan for every held-out class, routed by
    router needs those and the plan's router."""
    if route is None:
        return True
    covered = isinstance(plan, PlanFile) and bool(plan.classes) and set(data.classes) <= set(plan.classes)
    return covered and (route == "label" or plan.router is not None)


def plan_rows(model, data: EvalData, plan: PlanFile | SkipPlan, config: EvalConfig,
              families: Mapping[str | None, str], tag: str = "") -> list[dict[str, Any]]:
    """The rows of one plan: one per route in `families` (route -> family) that the plan can run, named by the
    family and `tag`, in the order given."""
    rows = []
    for route, family in families.items():
        if routable(plan, data, route):
            name = f"{family} {tag}" if tag else family
            rows.append(plan_row(model, data, plan, name, "plan", config, route=route, family=family))
    return rows


def plan_row(model, data: EvalData, plan: PlanFile | SkipPlan, name: str, kind: str, config: EvalConfig,
             route: str | None = None, strict: bool = True, family: str | None = None) -> dict[str, Any]:
    """One row: teacher-forced fidelity per class, realized skip ratio, greedy agreement, QA, FLOPs, speed.

    `route`: None runs the global plan; "label" runs each class's plan on that class's documents; "router" lets the
    plan's router pick a class plan per prompt, as `prompt_class="auto"` does in deployment, and reports how often it
    picked the true class."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
    if route is None:
        data.row_plans[name] = plan  # for harness runs of this row (--lm-eval)
    speed = config.speed and bool(data.prompts)
    steps = len(data.classes) + len(data.prompts) + (data.qa is not None) + speed
    with data.progress.stage(name, steps) as tick:
        sums, decode_positions, skipped, not_computed, narrowed = FidelitySums(), 0, 0, 0, 0
        flops = FlopModel.of(model)
        narrowed_saved = 0.0  # FLOPs the narrowed rows did not compute, less the mean biases (the runtime's count)
        generated = sum(int((ref.batch.lengths - ref.batch.prompt_len).clamp(min=0).sum()) for ref in data.references)
        num_layers = model_num_layers(model)
        class_skip: dict[str, float] = {}
        memory = (0, 0)  # (plan_bytes, model_bytes) of the applied plan (SkipHandle.stats)
        routed: dict[str, tuple[int, int]] = {}  # class -> (prompts routed to it, prompts)
        # Measured one class at a time (batches are per class) so each class's realized skip ratio is known: per-class
        # and global plans can only be compared fairly on a class at the skip ratio each realizes there.
        for cls in data.classes:
            try:
                part, stats = measure_plan(model, data.of_class(cls), plan,
                                           prompt_class=prompt_class_of(route, cls), strict=strict,
                                           batch_decision=config.batch_decision)
            except FidelityError as e:
                raise EvalError(f"{name}: {e}") from None
            sums.merge(part)
            memory = (stats.get("plan_bytes", 0), stats.get("model_bytes", 0))
            decode_positions += int(stats["decode_positions"])
            skipped += int(stats["decided_skips"])
            not_computed += int(stats["rows_not_computed"])
            narrowed += int(stats.get("narrowed_rows", 0))
            narrowed_saved += narrowed_flops_saved(flops, stats)
            if stats["decode_positions"]:
                class_skip[cls] = rounded(stats["decided_skip_ratio"])
            if route == "router":
                chosen = stats["routed_classes"]
                routed[cls] = (sum(c == cls for c in chosen), len(chosen))
            tick()
        row = {"name": name, "kind": kind, "family": family or name}
        row.update(summarize(sums, data.classes, name))
        if routed:
            prompts = sum(n for _, n in routed.values())
            row["router_accuracy"] = rounded(sum(h for h, _ in routed.values()) / max(prompts, 1))
            row["router_accuracy_per_class"] = {c: rounded(h / n) if n else None for c, (h, n) in routed.items()}
        for cls, ratio in class_skip.items():
            row["per_class"][cls]["skip_ratio"] = ratio
        row["skip_ratio"] = rounded(skipped / (decode_positions * num_layers)) if decode_positions else 0.0
        # What a generation skips: the rule's skips over every generated position, warm-up included. Not the rows
        # this teacher-forced pass left out: one forward over whole windows may mask rows that one-token decode steps
        # skip. The speed run reports the rows a real generation did not compute (speed_run_saved_ratio).
        row["saved_share"] = rounded(skipped / (generated * num_layers)) if generated else 0.0
        row["rows_not_computed_share"] = rounded(not_computed / (generated * num_layers)) if generated else 0.0
        active = plan.global_plan if isinstance(plan, PlanFile) else plan
        row["narrowed_share"] = rounded(narrowed / (generated * num_layers)) if generated else 0.0
        # FFN FLOPs saved net of substitutes over every generated position, as a generation saves them: the rule's
        # whole-FFN skips less their maps (a teacher-forced forward runs a skipped call's map on every position of
        # the window and may mask rows a decode step skips) plus what narrowed rows saved, as the runtime counts it.
        from ..fit.refine import substitute_cost_share

        skipped_net = skipped * (1.0 - substitute_cost_share(model, active)) * flops.flops["ffn"]
        dense_ffn = generated * num_layers * flops.flops["ffn"]
        ffn_saved = (skipped_net + narrowed_saved) / dense_ffn if generated else 0.0
        row["gen_len"] = config.gen_len
        row["warmup_tokens"] = active.warmup_tokens
        row["fitted_gen_len"] = active.fit.get("gen_len") if active.fit else None
        row["warnings"] = generation_warnings(active, config.gen_len, row["saved_share"] + row["narrowed_share"])
        row["mode"] = active.mode
        row["layers"] = plan_layers(active)
        if active.neurons is not None:
            row["neurons"] = plan_neurons(model, active)
        # what the applied plan holds beside the model's weights (maps, biases, refitted columns), as a share of them
        row["plan_memory_share"] = rounded(memory[0] / memory[1]) if memory[1] else 0.0
        row["expected_skip_ratio"] = active.expected_skip_ratio
        if active.fit.get("refined_kl") is not None:
            row["calibration_refined_kl"] = active.fit["refined_kl"]
        if data.prompts:
            row.update(_plan_greedy(model, data, plan, route, strict, tick))
        if data.qa is not None:
            if route == "label":  # QA questions carry no class of the held-out data: only a router can pick a plan
                row["qa_note"] = "QA questions have no data-class label; the router row measures routed QA"
            else:
                row.update(qa_fields(model, data, config, plan, by_router=route == "router", strict=strict))
            tick()
        row.update(plan_flops(model, active, ffn_saved, config))
        if speed:
            row.update(_speed(model, data, plan, config, route))
            tick()
        else:
            row["speedup"] = None
        return row


def narrowed_flops_saved(flops: FlopModel, stats: Mapping[str, Any]) -> float:
    """The FLOPs the narrowed rows of a measured run did not compute, less the mean biases' adds: the runtime's net
    FFN FLOPs saved (`ffn_flops_saved_share`) less its whole-FFN part (rows not computed, less substitutes)."""
    whole = int(stats["rows_not_computed"]) * flops.flops["ffn"] - float(stats.get("substitute_flops", 0.0))
    return flops.ffn_flops_saved(stats) - whole if stats.get("narrowed_rows") else 0.0


def plan_neurons(model, plan: SkipPlan) -> dict[str, Any]:
    """A neuron plan's `neurons` entry: fill, the FFN width and the kept width per narrowed layer."""
    size = plan.neurons.intermediate_size
    if size is None:
        size = getattr(model.config, "intermediate_size", None) or getattr(model.config, "ffn_dim", None)
    return {"fill": plan.neurons.fill, **({"rank": plan.neurons.rank} if plan.neurons.rank else {}),
            "intermediate_size": size,
            "widths": [[layer, int(k)] for layer, k in sorted(plan.neurons.widths.items())]}


def baseline_ratio(row: Mapping[str, Any], plan: SkipPlan) -> float:
    """The skip ratio the baselines (whole-FFN skips, dropped or replaced blocks) and the oracle are taken at for
    `row` of `plan`: its realized skip ratio; for a plan with neuron subsets its `ffn_flops_saved_share` (whole FFNs
    saving the FFN FLOPs the plan saves, net)."""
    return row["ffn_flops_saved_share"] if plan.neurons is not None else row["skip_ratio"]


def plan_flops(model, plan: SkipPlan, ffn_saved_share: float, config: EvalConfig) -> dict[str, Any]:
    """The FLOP accounting of a row from the FFN FLOPs it saved net of substitutes (`ffn_saved_share`, whole-FFN
    skips, narrowed rows and linear maps alike): the share of every decode-token FLOP saved (attention, its cache,
    FFNs, LM head) and the FLOP-ideal speedup, both from `arch.flops.FlopModel` at `config.flop_context`.
    `substitute_cost_share`: a linear map's FLOPs per skipped call over one FFN call's (0 without maps)."""
    from ..fit.refine import substitute_cost_share

    saved = FlopModel.of(model).decode_saved_share(ffn_saved_share, context=config.flop_context)
    return {"substitute_cost_share": rounded(substitute_cost_share(model, plan)),
            "ffn_flops_saved_share": rounded(ffn_saved_share),
            "ideal_speedup": rounded(1.0 / (1.0 - saved)), "decode_flops_saved_share": rounded(saved)}


def _greedy_agreement(data: EvalData, produced: list[list[int]]) -> dict[str, Any]:
    cmp = compare_greedy(data.dense_greedy, produced)
    return {"greedy_agreement": rounded(cmp.agreement), "first_divergence_mean": rounded(cmp.first_divergence_mean),
            "greedy_identical": rounded(cmp.identical)}


def _plan_greedy(model, data: EvalData, plan, route: str | None, strict: bool, tick) -> dict[str, Any]:
    from ..runtime import apply_plan

    produced: list[list[int]] = []
    n_new = len(data.dense_greedy[0]) if data.dense_greedy else 0
    for prompt, cls in zip(data.prompts, data.prompt_classes):
        with apply_plan(model, plan, prompt_class=prompt_class_of(route, cls), strict=strict):
            produced += greedy_tokens(model, [prompt], n_new)
        tick()
    return _greedy_agreement(data, produced) | {"greedy_new_tokens": n_new, "greedy_prompts": len(produced)}


def _speed(model, data: EvalData, plan, config: EvalConfig, route: str | None) -> dict[str, Any]:
    """Decode tokens/s dense vs plan with the runtime's benchmark (interleaved, warm-up round dropped, median)."""
    from .bench import Arm, benchmark_decode

    cls = prompt_class_of(route, data.prompt_classes[0])
    bench = benchmark_decode(model, [Arm("dense", None), Arm("plan", plan, prompt_class=cls)], batch=1,
                             prompt_tokens=config.prompt_len, new_tokens=config.speed_new_tokens,
                             repeats=config.speed_repeats, seed=config.seed)
    dense_arm, plan_arm = bench.rows()
    return {"tokens_per_s": rounded(plan_arm["tok_per_s"]), "tokens_per_s_dense": rounded(dense_arm["tok_per_s"]),
            "speedup": rounded(plan_arm["speedup"]), "speedup_min": rounded(plan_arm["speedup_min"]),
            "speedup_max": rounded(plan_arm["speedup_max"]),
            "speed_run_saved_ratio": rounded(plan_arm["saved_ratio"]),
            "speed_run_ffn_flops_saved_share": rounded(plan_arm["ffn_flops_saved_share"]),
            "speed_run_ideal_speedup": rounded(plan_arm["ideal_speedup"]),
            "speed_over_ideal": rounded(plan_arm["measured_over_ideal"]),
            "speed_repeats": config.speed_repeats, "speed_new_tokens": config.speed_new_tokens}


def qa_fields(model, data: EvalData, config: EvalConfig, plan=None, by_router: bool = False,
              strict: bool = True, dropped_layers: Sequence[int] | None = None, decode_hooks=None) -> dict[str, Any]:
    """QA accuracy and retention of one row. A plan continues from the shared dense prompt passes (it skips
    generated tokens only), as do `decode_hooks` (a context manager changing decode forwards only); routed class
    plans and dropped layers change the prompt pass, so they run it again."""
    from .blocks import DroppedLayers
    from .qa import decode_prefilled, generate_answers, retention, score
    from ..runtime import apply_plan

    qa = data.qa
    if decode_hooks is not None:
        with decode_hooks:
            answers = decode_prefilled(model, qa.tokenizer, qa.prefills, len(qa.prompts), qa.new_tokens)
    elif dropped_layers is not None:
        with DroppedLayers(model, dropped_layers):
            answers = generate_answers(model, qa.tokenizer, qa.prompts, qa.new_tokens, config.batch_size)
    elif by_router:
        with apply_plan(model, plan, prompt_class="auto", strict=strict):
            answers = generate_answers(model, qa.tokenizer, qa.prompts, qa.new_tokens, config.batch_size)
    else:
        with apply_plan(model, plan, strict=strict) as handle:
            answers = decode_prefilled(model, qa.tokenizer, qa.prefills, len(qa.prompts), qa.new_tokens, handle)
    result = score(qa.questions, answers)
    kept = retention(result, qa.dense)
    return {"qa_accuracy": rounded(kept["accuracy"]), "qa_retention": rounded(kept["retention"]),
            "qa_retention_on_dense_correct": rounded(kept["retention_on_dense_correct"]),
            "qa_per_class": {c: rounded(a) for c, a in result.per_class.items()}}


def hooked_row(model, data: EvalData, name: str, config: EvalConfig, hooks, teacher_forced, *, family: str,
               mode: str, layers: list[int], qa_dropped_layers: Sequence[int] | None = None,
               qa_prefilled: bool = False) -> dict[str, Any]:
    """A baseline that changes the model with hooks (not a skip plan): teacher-forced fidelity with
    `teacher_forced(reference) -> logits`, greedy agreement and QA with `hooks` (a context manager) in place. QA:
    `qa_dropped_layers` reruns the prompts with those layers dropped; `qa_prefilled` continues the shared dense
    prompt passes (hooks that act on decode positions only). The caller adds the skip ratio and the FLOP ideal."""
    sums = FidelitySums()
    produced: list[list[int]] = []
    steps = len(data.references) + len(data.prompts) + (data.qa is not None)
    with data.progress.stage(name, steps) as tick, hooks, torch.inference_mode():
        for ref in data.references:
            try:
                compare(ref, teacher_forced(ref), sums)
            except FidelityError as e:
                raise EvalError(f"{name}: {e}") from None
            tick()
        for prompt in data.prompts:
            produced += greedy_tokens(model, [prompt], len(data.dense_greedy[0]))
            tick()
    row = {"name": name, "kind": "baseline", "family": family, "mode": mode, "layers": layers}
    row.update(summarize(sums, data.classes, name))
    row["gen_len"] = config.gen_len
    row["warnings"] = []
    row["expected_skip_ratio"] = None
    if produced:
        row.update(_greedy_agreement(data, produced))
    row["speedup"] = None
    if data.qa is not None:
        with data.progress.stage(f"{name}: QA", 1):
            if qa_prefilled:
                row.update(qa_fields(model, data, config, decode_hooks=hooks))
            else:
                row.update(qa_fields(model, data, config, dropped_layers=qa_dropped_layers))
    return row
