"""`skipprof eval`: fidelity and speed of skip plans on held-out data, with baselines, an oracle and sweeps.

Every plan is applied with the runtime (`apply_plan` + `handle.decode_from` for teacher forcing, automatic prompt /
decode detection for greedy generation and the speed benchmark), so the numbers describe what deployment runs. The
dense log-probs are computed once and shared by all rows. The JSON layout is documented in docs/eval-schema.md.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .fidelity import (DenseReference, FidelityError, FidelitySums, compare, compare_greedy, dense_reference,
                       dense_references, greedy_tokens, load_documents, make_batches, measure_plan, model_forward,
                       pad_id_of, token_windows)
from .plan import PlanFile, SkipPlan, generation_warnings
from .progress import Progress
from .blocks import DroppedLayers
from .refine import SetEvaluator, canonical, middle_layers, oracle_static, substitute_cost_share

EVAL_FORMAT = "skipprof-eval"
EVAL_FORMAT_VERSION = 1


class EvalError(ValueError):
    """Evaluation cannot produce meaningful numbers (bad input, mismatch, empty data, NaN)."""


@dataclass
class EvalConfig:
    """Everything that shapes an evaluation besides the model and the plans (defaults: `skipprof eval`'s)."""

    data: str | None = None  # held-out --data spec (file, folder, glob, hub name; CLASS= prefix); None: bundled
    text_column: str | None = None  # default `text`, else chat `messages` rendered with the chat template
    class_column: str | None = None  # default `class` when present, else one class `default`
    prompt_len: int = 64  # dense prompt prefix of each held-out window
    gen_len: int = 256  # decode positions per window after the prompt: the generation length plans are judged at
    docs_per_class: int | None = 16
    batch_size: int = 16
    batch_decision: str | None = None  # adaptive plans: rows of a batch decide alone or together (None: the plan's)
    greedy_prompts: int = 8  # spread over the classes
    greedy_new_tokens: int = 32
    speed: bool = True
    speed_new_tokens: int = 64
    speed_repeats: int = 5
    baselines: bool = False
    random_seeds: int = 3
    oracle: bool | None = None  # None: with baselines, when the model has <= oracle_max_layers layers
    oracle_max_layers: int = 16
    search_reference: bool | None = None  # None: with baselines, when the oracle is too large (> oracle_max_layers)
    search_docs_per_class: int = 4  # held-out documents per class the search reference is searched on
    search_gen_len: int = 96  # decode positions of those documents during the search (all of them are measured)
    search_shortlist: int = 6  # swap candidates per slot in the search reference (export-plan --refine uses 4)
    seed: int = 0
    calibration_data: str | None = None  # where baselines that fit something (ReplaceMe) fit it; None: bundled split
    qa: bool = False  # knowledge retention: short factual answers, plan vs dense (skipprofiler.qa)
    qa_file: str | None = None  # None: the bundled question set
    qa_new_tokens: int = 16
    sweep: list[float] | None = None  # fit static + adaptive plans at these targets from the profile, evaluate each
    sweep_refine: bool = True  # with sweep: refine the static sets by measured KL on the calibration split
    sweep_per_class: bool = False  # with sweep: also fit class plans, evaluated routed by each document's label
    oracle_targets: list[float] | None = None  # with sweep: the targets the oracle runs at (None: where affordable)
    lm_eval: list[str] | None = None  # lm-evaluation-harness tasks run for dense and each named plan (skipprofiler.harness)
    lm_eval_include: list[str] | None = None  # extra harness task folders (the bundled tasks are always there)
    lm_eval_limit: int | None = None  # documents per harness task (None: all)
    lm_eval_chat: bool = False  # apply the chat template, few-shot examples as turns (the skipprof_qa_chat task)

    @property
    def window(self) -> int:
        """Tokens per held-out document: the prompt plus the generation."""
        return self.prompt_len + self.gen_len


@dataclass
class EvalData:
    """Held-out windows prepared once: dense references per class and greedy prompts."""

    references: list[DenseReference]
    classes: list[str]
    prompts: list[list[int]]
    prompt_classes: list[str]
    dense_greedy: list[list[int]] = field(default_factory=list)
    qa: "QAData | None" = None
    windows: list[tuple[list[int], str]] = field(default_factory=list)  # (tokens, class) of every held-out document
    pad_id: int = 0
    progress: Progress = field(default_factory=Progress)  # every row reports its steps here
    row_plans: dict[str, Any] = field(default_factory=dict)  # row name -> its plan, or ("drop_layers", layers)

    def of_class(self, cls: str) -> list[DenseReference]:
        return [r for r in self.references if r.batch.classes[0] == cls]

    def tokens(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ref in self.references:
            out[ref.batch.classes[0]] = out.get(ref.batch.classes[0], 0) + int(ref.mask.sum())
        return out


def prepare_data(model, tokenizer, data_spec: str | None, config: EvalConfig,
                 progress: Progress | None = None) -> EvalData:
    """Tokenize, cut and batch the held-out documents per class; compute the dense references and greedy runs."""
    progress = progress or Progress()
    try:
        docs = load_documents(data_spec, split="heldout", text_column=config.text_column,
                              class_column=config.class_column)
        # Whole windows only: every row is measured at the stated generation length, none at a shorter one.
        tokens, classes = token_windows(tokenizer, docs, config.window, config.docs_per_class, config.window)
    except FidelityError as e:
        raise EvalError(f"held-out data: {e} (--prompt-len {config.prompt_len} + --gen-len {config.gen_len}; "
                        "lower --gen-len for shorter documents)") from None
    pad = pad_id_of(tokenizer, model)
    batches, class_names = [], list(dict.fromkeys(classes))
    for cls in class_names:
        idx = [i for i, c in enumerate(classes) if c == cls]
        batches += make_batches([tokens[i] for i in idx], [cls] * len(idx), config.prompt_len, pad, config.batch_size)
    forward, references = model_forward(model), []
    with progress.stage("dense pass", len(batches)) as tick:
        for batch in batches:
            try:
                references.append(dense_reference(forward, batch))
            except FidelityError as e:
                raise EvalError(f"held-out data: {e}") from None
            tick()
    prompts, prompt_classes = [], []
    by_class = {c: [t for t, k in zip(tokens, classes) if k == c] for c in class_names}
    for i in range(config.greedy_prompts):
        cls = class_names[i % len(class_names)]
        pool = by_class[cls]
        if i // len(class_names) < len(pool):
            prompts.append(pool[i // len(class_names)][:config.prompt_len])
            prompt_classes.append(cls)
    data = EvalData(references, class_names, prompts, prompt_classes, windows=list(zip(tokens, classes)), pad_id=pad,
                    progress=progress)
    with progress.stage("dense greedy", len(prompts)) as tick:
        for prompt in prompts:
            data.dense_greedy += greedy_tokens(model, [prompt], config.greedy_new_tokens)
            tick()
    return data


@dataclass
class QAData:
    """The QA questions, their prompts, the dense prompt passes (reused by every plan) and the dense score."""

    questions: list
    prompts: list[list[int]]
    prefills: list  # qa.Prefill per batch
    dense: Any  # qa.QAScore
    tokenizer: Any
    new_tokens: int


def prepare_qa(model, tokenizer, config: EvalConfig, log=None, progress: Progress | None = None) -> QAData:
    from .qa import QAError, build_prompts, decode_prefilled, load_questions, prefill, score

    progress = progress or Progress()
    try:
        questions = load_questions(config.qa_file)
    except QAError as e:
        raise EvalError(f"QA questions: {e}") from None
    prompts = build_prompts(tokenizer, questions)
    started = time.perf_counter()
    with progress.stage("QA dense (prompts, answers)", 2) as tick:
        prefills = prefill(model, tokenizer, prompts, batch_size=config.batch_size)
        tick()
        answers = decode_prefilled(model, tokenizer, prefills, len(prompts), max_new_tokens=config.qa_new_tokens)
        tick()
    if log:
        log(f"QA: {len(questions)} questions, dense pass {time.perf_counter() - started:.0f} s")
    return QAData(questions, prompts, prefills, score(questions, answers), tokenizer, config.qa_new_tokens)


def qa_fields(model, data: EvalData, config: EvalConfig, plan=None, by_router: bool = False,
              strict: bool = True, dropped_layers: Sequence[int] | None = None, decode_hooks=None) -> dict[str, Any]:
    """QA accuracy and retention of one row. A plan continues from the shared dense prompt passes (it skips
    generated tokens only), as do `decode_hooks` (a context manager changing decode forwards only); routed class
    plans and dropped layers change the prompt pass, so they run it again."""
    from .qa import decode_prefilled, generate_answers, retention, score
    from .runtime import apply_plan

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
    return {"qa_accuracy": _r(kept["accuracy"]), "qa_retention": _r(kept["retention"]),
            "qa_retention_on_dense_correct": _r(kept["retention_on_dense_correct"]),
            "qa_per_class": {c: _r(a) for c, a in result.per_class.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Rows


def summarize(sums: FidelitySums, classes: Sequence[str], name: str) -> dict[str, Any]:
    try:
        overall = sums.summary(None)
        per_class = {c: _round_all(sums.summary(c)) for c in classes if c in sums.count}
    except FidelityError as e:
        raise EvalError(f"{name}: {e}") from None
    row = _round_all(overall)
    row["ppl_increase"] = _r(overall["ppl"] / overall["ppl_dense"] - 1.0)
    row["per_class"] = per_class
    return row


def _r(x: float) -> float:
    return float(f"{x:.6g}") if isinstance(x, float) else x


def _round_all(d: dict) -> dict:
    return {k: _r(v) for k, v in d.items()}


def _plan_layers(plan: SkipPlan) -> Any:
    if plan.mode == "static":
        return [[layer, _r(f)] for layer, f in sorted(plan.skip_layers.items())]
    return {"tau": sorted(set(_r(t) for t in (plan.tau or []))), "cold_start": plan.cold_start,
            "cold_end": plan.cold_end, "max_skip": plan.max_skip}


ROUTES = (None, "label", "router")


def _prompt_class(route: str | None, cls: str | None) -> str | None:
    """The runtime's prompt_class for a row: the global plan, the true label's class plan, or the plan's router."""
    return {None: None, "label": cls, "router": "auto"}[route]


def evaluate_plan(model, data: EvalData, plan: PlanFile | SkipPlan, name: str, kind: str, config: EvalConfig,
                  route: str | None = None, strict: bool = True,
                  profile_cost: "FlopModel | None" = None, family: str | None = None) -> dict[str, Any]:
    """One row: teacher-forced fidelity per class, realized skip ratio, greedy agreement, speed.

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
        sums, decode_positions, skipped, not_computed = FidelitySums(), 0, 0, 0
        generated = sum(int((ref.batch.lengths - ref.batch.prompt_len).clamp(min=0).sum()) for ref in data.references)
        num_layers = model_num_layers(model)
        class_skip: dict[str, float] = {}
        routed: dict[str, tuple[int, int]] = {}  # class -> (prompts routed to it, prompts)
        # Measured one class at a time (batches are per class) so each class's realized skip ratio is known: per-class
        # and global plans can only be compared fairly on a class at the skip ratio each realizes there.
        for cls in data.classes:
            try:
                part, stats = measure_plan(model, data.of_class(cls), plan,
                                           prompt_class=_prompt_class(route, cls), strict=strict,
                                           batch_decision=config.batch_decision)
            except FidelityError as e:
                raise EvalError(f"{name}: {e}") from None
            sums.merge(part)
            decode_positions += int(stats["decode_positions"])
            skipped += int(stats["decided_skips"])
            not_computed += int(stats["rows_not_computed"])
            if stats["decode_positions"]:
                class_skip[cls] = _r(stats["decided_skip_ratio"])
            if route == "router":
                chosen = stats["routed_classes"]
                routed[cls] = (sum(c == cls for c in chosen), len(chosen))
            tick()
        row = {"name": name, "kind": kind, "family": family or name}
        row.update(summarize(sums, data.classes, name))
        if routed:
            prompts = sum(n for _, n in routed.values())
            row["router_accuracy"] = _r(sum(h for h, _ in routed.values()) / max(prompts, 1))
            row["router_accuracy_per_class"] = {c: _r(h / n) if n else None for c, (h, n) in routed.items()}
        for cls, ratio in class_skip.items():
            row["per_class"][cls]["skip_ratio"] = ratio
        row["skip_ratio"] = _r(skipped / (decode_positions * num_layers)) if decode_positions else 0.0
        # What a generation skips: the rule's skips over every generated position, warm-up included. Not the rows
        # this teacher-forced pass left out: one forward over whole windows may mask rows that one-token decode steps
        # skip. The speed run reports the rows a real generation did not compute (speed_run_saved_ratio).
        row["saved_share"] = _r(skipped / (generated * num_layers)) if generated else 0.0
        row["rows_not_computed_share"] = _r(not_computed / (generated * num_layers)) if generated else 0.0
        row["gen_len"] = config.gen_len
        active = plan.global_plan if isinstance(plan, PlanFile) else plan
        row["warmup_tokens"] = active.warmup_tokens
        row["fitted_gen_len"] = active.fit.get("gen_len") if active.fit else None
        row["warnings"] = generation_warnings(active, config.gen_len, row["saved_share"])
        row["mode"] = active.mode
        row["layers"] = _plan_layers(active)
        row["expected_skip_ratio"] = active.expected_skip_ratio
        if active.fit.get("refined_kl") is not None:
            row["calibration_refined_kl"] = active.fit["refined_kl"]
        if data.prompts:
            row.update(_greedy_row(model, data, plan, route, strict, tick))
        if data.qa is not None:
            if route == "label":  # QA questions carry no class of the held-out data: only a router can pick a plan
                row["qa_note"] = "QA questions have no data-class label; the router row measures routed QA"
            else:
                row.update(qa_fields(model, data, config, plan, by_router=route == "router", strict=strict))
            tick()
        flops = profile_cost or FlopModel.of(model)
        context = config.prompt_len + config.gen_len // 2
        # A linear substitute still costs FLOPs in each skipped call: the FFN FLOPs saved are net of them.
        row["substitute_cost_share"] = _r(substitute_cost_share(model, active))
        row["ffn_flops_saved_share"] = _r(row["saved_share"] * (1.0 - row["substitute_cost_share"]))
        row["ideal_speedup"] = _r(flops.ideal_speedup(row["ffn_flops_saved_share"], context=context))
        row["decode_flops_saved_share"] = _r(1 - 1 / row["ideal_speedup"])
        if speed:
            row.update(_speed_row(model, data, plan, config, route))
            tick()
        else:
            row["speedup"] = None
        return row


def _greedy_row(model, data: EvalData, plan, route: str | None, strict: bool, tick) -> dict[str, Any]:
    from .runtime import apply_plan

    produced: list[list[int]] = []
    n_new = len(data.dense_greedy[0]) if data.dense_greedy else 0
    for prompt, cls in zip(data.prompts, data.prompt_classes):
        with apply_plan(model, plan, prompt_class=_prompt_class(route, cls), strict=strict):
            produced += greedy_tokens(model, [prompt], n_new)
        tick()
    cmp = compare_greedy(data.dense_greedy, produced)
    return {"greedy_agreement": _r(cmp.agreement), "first_divergence_mean": _r(cmp.first_divergence_mean),
            "greedy_identical": _r(cmp.identical), "greedy_new_tokens": n_new, "greedy_prompts": len(produced)}


def model_num_layers(model) -> int:
    from .registry import resolve

    return resolve(model).num_layers


# ---------------------------------------------------------------------------------------------------------------
# Speed: decode tokens/s, dense vs plan, interleaved, warm-up excluded, median


def _speed_row(model, data: EvalData, plan, config: EvalConfig, route: str | None) -> dict[str, Any]:
    """Decode tokens/s dense vs plan with the runtime's benchmark (interleaved, warm-up round dropped, median)."""
    from .bench import Arm, benchmark_decode

    cls = _prompt_class(route, data.prompt_classes[0])
    bench = benchmark_decode(model, [Arm("dense", None), Arm("plan", plan, prompt_class=cls)], batch=1,
                             prompt_tokens=config.prompt_len, new_tokens=config.speed_new_tokens,
                             repeats=config.speed_repeats, seed=config.seed)
    dense_row, plan_row = bench.rows()
    return {"tokens_per_s": _r(plan_row["tok_per_s"]), "tokens_per_s_dense": _r(dense_row["tok_per_s"]),
            "speedup": _r(plan_row["speedup"]), "speedup_min": _r(plan_row["speedup_min"]),
            "speedup_max": _r(plan_row["speedup_max"]), "speed_run_saved_ratio": _r(plan_row["saved_ratio"]),
            "speed_run_ideal_speedup": _r(plan_row["ideal_speedup"]),
            "speed_over_ideal": _r(plan_row["measured_over_ideal"]),
            "speed_repeats": config.speed_repeats, "speed_new_tokens": config.speed_new_tokens}


@dataclass
class FlopModel:
    """Per-decode-token FLOPs, counted by the runtime's benchmark module (`bench.token_flops`): attention projections
    and attention over the cache per layer, the FFN per layer, and the LM head."""

    flops: dict[str, float]

    @classmethod
    def of(cls, model) -> "FlopModel":
        from .bench import token_flops

        return cls(token_flops(model))

    def per_token(self, ffn_layers: float, context: int) -> float:
        f = self.flops
        attention = f["layers"] * (f["attn_proj"] + f["attn_per_position"] * context)
        return attention + ffn_layers * f["ffn"] + f["lm_head"]

    @property
    def lm_head(self) -> float:
        return self.flops["lm_head"]

    def ideal_speedup(self, skip_ratio: float, context: int) -> float:
        layers = self.flops["layers"]
        return self.per_token(layers, context) / self.per_token(layers * (1.0 - skip_ratio), context)


# ---------------------------------------------------------------------------------------------------------------
# Baselines at the same realized skip ratio


def budget_slots(budget: float, order: Sequence[int]) -> tuple[tuple[int, float], ...]:
    """Take layers in `order`: full layers while the budget lasts, then one fractional layer for the remainder."""
    full = int(math.floor(budget + 1e-9))
    rest = round(budget - full, 3)
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
                    fit={"baseline": "FFN-SkipLLM paper defaults"})


def contiguous_window(num_layers: int, budget: float) -> list[int]:
    """The input-agnostic window: consecutive middle layers, centred between the first and last layer."""
    middle = middle_layers(num_layers)
    width = min(len(middle), int(math.ceil(budget - 1e-9)))
    start = middle[0] + (len(middle) - width) // 2
    window = list(range(start, start + width))
    return window + [l for l in middle if l not in window]


def block_influence(model, references: Sequence[DenseReference]) -> list[float]:
    """ShortGPT's Block Influence per decoder layer: mean 1 - cos(layer input, layer output) over prompt tokens."""
    from .registry import first_tensor, resolve

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


def evaluate_layer_drop(model, data: EvalData, layers: Sequence[int], name: str, config: EvalConfig) -> dict[str, Any]:
    num_layers = model_num_layers(model)
    forward = model_forward(model)
    data.row_plans[name] = ("drop_layers", list(layers))  # harness runs (--lm-eval) drop the same layers
    row = _hooked_row(model, data, name, config, DroppedLayers(model, layers), lambda ref: forward(ref.batch),
                      family="ShortGPT layer drop", mode="layer_drop", layers=sorted(layers),
                      qa_dropped_layers=layers)
    row["skip_ratio"] = _r(len(layers) / num_layers)
    row["saved_share"] = row["skip_ratio"]
    flops = FlopModel.of(model)
    context = config.prompt_len + config.gen_len // 2
    dense = flops.per_token(num_layers, context)
    kept = num_layers - len(layers)
    remaining = flops.lm_head + kept / num_layers * (dense - flops.lm_head)  # attention and FFN both dropped
    row["ideal_speedup"] = _r(dense / remaining)
    row["decode_flops_saved_share"] = _r(1 - remaining / dense)
    row["note"] = "ShortGPT-style: whole decoder layers dropped (attention too, on prompt and decode positions)"
    return row


def _hooked_row(model, data: EvalData, name: str, config: EvalConfig, hooks, teacher_forced, *, family: str,
                mode: str, layers: list[int], qa_dropped_layers: Sequence[int] | None = None,
                qa_prefilled: bool = False) -> dict[str, Any]:
    """A baseline that changes the model with hooks (not a skip plan): teacher-forced fidelity with
    `teacher_forced(reference) -> logits`, greedy agreement and QA with `hooks` (a context manager) in place. QA:
    `qa_dropped_layers` reruns the prompts with those layers dropped; `qa_prefilled` continues the shared dense
    prompt passes (hooks that act on decode positions only)."""
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
        cmp = compare_greedy(data.dense_greedy, produced)
        row.update({"greedy_agreement": _r(cmp.agreement), "first_divergence_mean": _r(cmp.first_divergence_mean),
                    "greedy_identical": _r(cmp.identical)})
    row["speedup"] = None
    if data.qa is not None:
        with data.progress.stage(f"{name}: QA", 1):
            if qa_prefilled:
                row.update(qa_fields(model, data, config, decode_hooks=hooks))
            else:
                row.update(qa_fields(model, data, config, dropped_layers=qa_dropped_layers))
    return row


def layer_ranking_from_profile(profile, num_layers: int) -> list[int]:
    """LLM-Drop ranking: layers by mean `residual` cosine, most redundant first (decode regime when profiled)."""
    regime = "decode" if profile.tokens("decode") > 0 else "prompt"
    means = profile.layer_stats("residual", regime)["mean"]
    if len(means) != num_layers:
        raise EvalError(f"the profile has {len(means)} layers but the model has {num_layers}")
    return sorted(range(num_layers), key=lambda l: -float(means[l]))


def baseline_rows(model, data: EvalData, reference: SkipPlan, realized: float, config: EvalConfig,
                  profile=None, label: str = "", *, tokenizer=None,
                  reference_row: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Baselines at the reference plan's realized skip ratio (see docs/eval-schema.md for each definition)."""
    num_layers = model_num_layers(model)
    budget = realized * num_layers
    template = static_template(reference)
    suffix = f" @{realized:.3f}" if label else ""
    rows = []

    def static_row(name: str, order: Sequence[int], note: str, family: str) -> dict[str, Any]:
        plan = replace(template, skip_layers=dict(budget_slots(budget, order)))
        row = evaluate_plan(model, data, plan, name + suffix, "baseline", config, family=family)
        row["note"] = note
        return row

    middle = middle_layers(num_layers)
    seeds = []
    for seed in range(config.random_seeds):
        order = list(middle)
        random.Random(config.seed + seed).shuffle(order)
        seeds.append(static_row(f"random seed {config.seed + seed}", order, "random static FFN set", "random FFN"))
    rows.append(_average_rows(seeds, f"random FFN (mean of {len(seeds)} seeds){suffix}"))
    rows.append(static_row("contiguous window", contiguous_window(num_layers, budget),
                           "input-agnostic contiguous window of middle FFNs (paper's baseline)", "contiguous window"))
    if profile is not None:
        rows.append(static_row("LLM-Drop top-by-cosine", layer_ranking_from_profile(profile, num_layers),
                               "LLM-Drop-style static MLP drop: top-N layers by mean residual cosine",
                               "LLM-Drop top-by-cosine"))
    rows.append(_paper_adaptive_row(model, data, realized, config, suffix))
    drop_count = max(1, round(budget))
    with data.progress.stage(f"ShortGPT block influence{suffix}", 1):
        influence = block_influence(model, data.references)
    order = sorted(range(num_layers), key=lambda l: influence[l])[:drop_count]
    row = evaluate_layer_drop(model, data, order, f"ShortGPT layer drop ({drop_count} layers){suffix}", config)
    row["block_influence"] = [_r(x) for x in influence]
    rows.append(row)
    if tokenizer is not None and reference_row is not None:
        rows.append(replaceme_row(model, tokenizer, data, reference_row, config, suffix))
    return rows


def replaceme_row(model, tokenizer, data: EvalData, reference_row: dict[str, Any], config: EvalConfig,
                  suffix: str = "") -> dict[str, Any]:
    """ReplaceMe-style baseline (skipprofiler.blocks) with as many whole blocks replaced as save about the FLOPs
    per decode token that `reference_row` saves (net of its substitutes), fitted on calibration windows."""
    from .refine import SEARCH_DOCS_PER_CLASS, SEARCH_PROMPT_LEN, SUBSTITUTE_DOCS_PER_CLASS, SUBSTITUTE_GEN_LEN
    from .blocks import ReplacedBlocks, fit_block_replacement
    from .substitute import calibration_batches

    flops = FlopModel.of(model)
    context = config.prompt_len + config.gen_len // 2
    num_layers = model_num_layers(model)
    dense = flops.per_token(num_layers, context)
    saved = dense * reference_row["decode_flops_saved_share"]
    f = flops.flops
    block = f["attn_proj"] + f["attn_per_position"] * context + f["ffn"]
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

    row = _hooked_row(model, data, name, config, replaced, teacher_forced, family="ReplaceMe-style linear blocks",
                      mode="block_replacement", layers=replacement.layers, qa_prefilled=True)
    row["ideal_speedup"] = _r(dense / (dense - count * block + map_flops))
    row["decode_flops_saved_share"] = _r(1 - 1 / row["ideal_speedup"])
    row["skip_ratio"] = row["saved_share"] = _r(count / num_layers)
    row["fit"] = {"start": replacement.start, "count": count, **replacement.map.record,
                  "cosine_distance": {str(k): _r(v) for k, v in replacement.cosine_distance.items()}}
    row["note"] = ("ReplaceMe-style (training-free): a contiguous run of whole decoder blocks (attention and FFN) "
                   "replaced by one ridge least-squares linear map at decode positions, the run chosen by input/output "
                   "cosine distance; as many blocks as save the reference plan's decode FLOPs")
    return row


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
    row = evaluate_plan(model, data, plan, f"FFN-SkipLLM paper defaults (k={best_k}){suffix}", "baseline", config,
                        family="FFN-SkipLLM paper defaults")
    row["note"] = (f"tau 0.95, cold {plan.cold_start}+{plan.cold_end} layers, dense every 6th token, warm-up "
                   f"{plan.warmup_tokens}; k chosen for the closest realized ratio")
    return row


def _average_rows(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    out = dict(rows[0])
    out["name"] = name
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("greedy_new_tokens",
                                                                                         "greedy_prompts"):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            out[key] = _r(sum(vals) / len(vals))
    out["per_class"] = {c: {k: _r(sum(r["per_class"][c][k] for r in rows) / len(rows)) for k in v}
                        for c, v in rows[0]["per_class"].items()}
    if "qa_per_class" in rows[0]:
        out["qa_per_class"] = {c: _r(sum(r["qa_per_class"][c] for r in rows) / len(rows))
                               for c in rows[0]["qa_per_class"]}
    out["layers"] = [r["layers"] for r in rows]
    out["seeds"] = [{"name": r["name"], "kl_mean": r["kl_mean"], "layers": r["layers"]} for r in rows]
    out["note"] = "random static FFN sets among the middle layers, metrics averaged over seeds"
    return out


def oracle_row(model, data: EvalData, reference: SkipPlan, realized: float, config: EvalConfig,
               suffix: str = "") -> dict[str, Any]:
    """Exhaustive static reference on the held-out windows: the set of the same size with the lowest KL."""
    num_layers = model_num_layers(model)
    if reference.mode == "static":
        fractions = [f for _, f in sorted(reference.skip_layers.items())]
        template = replace(reference, fit={})
    else:
        fractions = [f for _, f in budget_slots(realized * num_layers, middle_layers(num_layers))]
        template = static_template(reference)
    sets = _oracle_set_count(len(middle_layers(num_layers)), fractions)
    with data.progress.stage(f"oracle search{suffix}", sets) as tick:
        evaluator = SetEvaluator(model, data.references, template, on_measure=lambda slots, kl: tick())
        result = oracle_static(model, data.references, template, fractions, evaluator=evaluator)
    plan = replace(template, mode="static", skip_layers=dict(result.slots))
    row = evaluate_plan(model, data, plan, f"oracle static (exhaustive, {result.evaluations} sets){suffix}",
                        "oracle", config, family="oracle static")
    row["note"] = ("reference, not deployable: searched on the held-out windows themselves over the middle layers")
    row["oracle_sets"] = result.evaluations
    row["oracle_top5"] = [{"layers": [l for l, _ in s], "kl_mean": _r(kl)} for s, kl in result.ranking[:5]]
    return row


def search_reference_row(model, data: EvalData, reference: SkipPlan, realized: float, config: EvalConfig,
                         suffix: str = "", log=None) -> dict[str, Any]:
    """Where exhaustive search does not fit: greedy add + swap descent by measured KL on held-out windows (the first
    `search_docs_per_class` documents of each class, cut to `search_gen_len` decode positions), each slot tried
    against the `search_shortlist` layers the greedy pass measured cheapest (export-plan uses 4). The set
    found is then measured like every other row, on all held-out windows."""
    from .refine import refine_slots

    num_layers = model_num_layers(model)
    if reference.mode == "static":
        slots = canonical(reference.skip_layers.items())
        template = replace(reference, fit={})
    else:
        slots = budget_slots(realized * num_layers, middle_layers(num_layers))
        template = static_template(reference)
    kept: dict[str, int] = {}
    windows, classes = [], []
    for tokens, cls in data.windows:
        if kept.get(cls, 0) < config.search_docs_per_class:
            kept[cls] = kept.get(cls, 0) + 1
            windows.append(tokens[:config.prompt_len + config.search_gen_len])
            classes.append(cls)
    batches = make_batches(windows, classes, config.prompt_len, data.pad_id, config.batch_size)
    started = time.perf_counter()
    with data.progress.stage(f"search reference: sets measured{suffix}", None) as tick:
        evaluator = SetEvaluator(model, dense_references(model, batches), template, on_measure=lambda s, kl: tick())
        best, info = refine_slots(evaluator, slots, middle_layers(num_layers), greedy_start=True,
                                  shortlist=config.search_shortlist)
    plan = replace(template, mode="static", skip_layers=dict(best))
    row = evaluate_plan(model, data, plan, f"search reference (greedy + swap on held-out){suffix}", "reference",
                        config, family="search reference")
    row["note"] = ("reference, not deployable: lazy greedy add + swap descent (shortlist "
                   f"{config.search_shortlist}) by measured KL on {len(windows)} held-out windows of "
                   f"{config.prompt_len}+{config.search_gen_len} tokens")
    row["search"] = {"evaluations": info["evaluations"], "layer_forwards": info["layer_forwards"],
                     "seconds": _r(time.perf_counter() - started), "search_kl": info["refined_kl"],
                     "starts": info["starts"]}
    if log:
        log(f"search reference: {info['evaluations']} sets in {row['search']['seconds']:.0f} s")
    return row


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def check_plan_fits(model, plan: PlanFile | SkipPlan, name: str) -> None:
    """Plan/model mismatch as a one-line error (the runtime's check: fingerprint, layers, compensation, router)."""
    from .runtime.checks import fit_problems

    problems = fit_problems(model, plan)
    if problems:
        raise EvalError(f"{name}: {'; '.join(problems)}")


def run_eval(model, tokenizer, plans: Sequence[tuple[str, PlanFile | SkipPlan]], data_spec: str | None = None,
             config: EvalConfig | None = None, profile=None, model_name: str = "", data_name: str = "",
             log=None, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate named plans (plus baselines / oracle at the first plan's realized ratio) and return the JSON dict."""
    config = config or EvalConfig()
    log = log or (lambda msg: None)
    if not plans:
        raise EvalError("no plan to evaluate")
    for name, plan in plans:
        check_plan_fits(model, plan, name)
    model.eval()
    data_spec = data_spec if data_spec is not None else config.data
    data = prepare_data(model, tokenizer, data_spec, config, progress)
    log(f"held-out: {sum(data.tokens().values())} measured decode positions over {len(data.classes)} classes")
    if config.qa:
        data.qa = prepare_qa(model, tokenizer, config, log, data.progress)
    flops = FlopModel.of(model)
    rows = []
    for name, plan in plans:
        rows.append(evaluate_plan(model, data, plan, name, "plan", config, profile_cost=flops))
        if isinstance(plan, PlanFile) and plan.classes and set(data.classes) <= set(plan.classes):
            rows.append(evaluate_plan(model, data, plan, f"{name} [class plans, routed by label]", "plan", config,
                                      route="label", profile_cost=flops))
            if plan.router is not None:
                rows.append(evaluate_plan(model, data, plan, f"{name} [class plans, routed by router]", "plan",
                                          config, route="router", profile_cost=flops))
    if config.baselines or config.oracle or config.search_reference:
        first = plans[0][1]
        reference = first.global_plan if isinstance(first, PlanFile) else first
        realized = rows[0]["skip_ratio"]
        if realized <= 0:
            raise EvalError(f"{plans[0][0]} skipped nothing on the held-out data; baselines need a ratio > 0")
        if config.baselines:
            log(f"baselines at realized skip ratio {realized:.3f}")
            rows += baseline_rows(model, data, reference, realized, config, profile, tokenizer=tokenizer,
                                  reference_row=rows[0])
        small = model_num_layers(model) <= config.oracle_max_layers
        want_oracle = config.oracle if config.oracle is not None else small
        if want_oracle:
            rows.append(oracle_row(model, data, reference, realized, config))
        want_search = config.search_reference if config.search_reference is not None else not want_oracle
        if (want_search and config.baselines) or config.search_reference:
            rows.append(search_reference_row(model, data, reference, realized, config, log=log))
    result = build_result(model, data, rows, config, data_spec, model_name, data_name)
    if config.lm_eval:
        add_lm_eval(model, tokenizer, plans, result, config, data, log)
    return result


def add_lm_eval(model, tokenizer, plans, result: dict, config: EvalConfig, data: EvalData, log=None) -> None:
    """The harness's numbers (`lm_eval` sections, docs/eval-schema.md) on the dense row, each named plan's row and,
    with baselines, every baseline / reference row (the random row: the mean over its seeds)."""
    try:
        from .harness import HarnessError, average_sections, eval_sections
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


def dense_row(data: EvalData) -> dict[str, Any]:
    sums = FidelitySums()
    for ref in data.references:
        for cls in dict.fromkeys(ref.row_class):
            sel = torch.tensor([c == cls for c in ref.row_class])
            nll = -ref.log_probs[sel].gather(1, ref.targets[sel][:, None]).double().sum()
            sums.add(cls, int(sel.sum()), 0.0, float(nll), float(nll), float(sel.sum()))
    return {"ppl": _r(sums.summary(None)["ppl_dense"]),
            "per_class": {c: {"ppl": _r(sums.summary(c)["ppl_dense"]), "tokens": sums.count[c]} for c in sums.count}}


def build_result(model, data: EvalData, rows, config: EvalConfig, data_spec, model_name, data_name) -> dict:
    from . import __version__
    from .registry import model_fingerprint

    for row in rows:
        for key in ("kl_mean", "ppl", "ppl_dense", "top1_agreement", "skip_ratio"):
            value = row.get(key)
            if value is None or not math.isfinite(value):
                raise EvalError(f"{row['name']}: {key} is not a finite number ({value})")
    return {
        "format": EVAL_FORMAT, "format_version": EVAL_FORMAT_VERSION, "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": model_name, "fingerprint": model_fingerprint(model)},
        "data": {"spec": data_spec or "bundled held-out split", "name": data_name, "classes": data.classes,
                 "tokens": data.tokens(), "documents": sum(r.batch.input_ids.shape[0] for r in data.references),
                 "prompt_len": config.prompt_len, "gen_len": config.gen_len, "window": config.window},
        "config": {k: v for k, v in vars(config).items()},
        "dense": dense_row(data) | ({"qa": data.qa.dense.to_dict()} if data.qa is not None else {}),
        "plans": rows,
    }


# ---------------------------------------------------------------------------------------------------------------
# Sweep: fit and evaluate several targets from one profile


def fit_sweep_plans(profile, target: float, gen_len: int, per_class: bool) -> dict[str, PlanFile]:
    """Static and adaptive plan files fitted at `target` with the plan stage's defaults."""
    from .fit import FitError, FitSettings, fit_plan_file

    plans = {}
    for mode in ("static", "adaptive"):
        try:
            plans[mode] = fit_plan_file(profile, FitSettings(target=target, mode=mode, gen_len=gen_len),
                                        per_class=per_class).plan_file
        except FitError as e:
            raise EvalError(f"fitting {mode} at {target}: {e}") from None
    return plans


def run_sweep(model, tokenizer, profile, config: EvalConfig,
              extra_plans: Sequence[tuple[str, PlanFile | SkipPlan]] = (), calibration_spec: str | None = None,
              oracle_max_sets: int = 150, model_name: str = "", log=None,
              progress: Progress | None = None) -> dict[str, Any]:
    """For each of `config.sweep`'s targets: fitted static (+ KL-refined with `config.sweep_refine`) and adaptive
    plans (+ class plans with `config.sweep_per_class`), baselines at the static plan's realized ratio, and the
    exhaustive oracle where it is affordable (at `config.oracle_targets` only, when given); rows carry `target`."""
    from .refine import RefineError, calibration_references, refine_plan_file, refine_static

    targets, data_spec, refine, per_class = config.sweep or [], config.data, config.sweep_refine, config.sweep_per_class
    if config.lm_eval:
        raise EvalError("--lm-eval runs for named PLAN files; it does not run with --sweep")
    oracle_targets = config.oracle_targets
    log = log or (lambda msg: None)
    for name, plan in extra_plans:
        check_plan_fits(model, plan, name)
    model.eval()
    data = prepare_data(model, tokenizer, data_spec, config, progress)
    if config.qa:
        data.qa = prepare_qa(model, tokenizer, config, log, data.progress)
    calibration = None
    if refine:
        with data.progress.stage("calibration references (for refining)", 1):
            calibration = calibration_references(model, tokenizer, calibration_spec, prompt_len=config.prompt_len,
                                                 window=config.window)
    rows = [evaluate_plan(model, data, plan, name, "plan", config) for name, plan in extra_plans]
    num_layers = model_num_layers(model)
    for target in targets:
        log(f"target {target:.2f}: fitting")
        fitted = fit_sweep_plans(profile, target, config.gen_len, per_class)
        static = fitted["static"]
        tag = f"@{target:.2f}"
        static_name = "fitted static (unrefined)" if refine else "fitted static"
        target_rows = [evaluate_plan(model, data, static, f"{static_name} {tag}", "plan", config,
                                     family=static_name)]
        reference_plan, reference_row = static.global_plan, target_rows[0]
        if refine:
            try:
                # swap descent from the fitted set only (no greedy-add restart): half the cost per target
                with data.progress.stage(f"target {target:.2f}: refining the static set by measured KL", 1):
                    refined = refine_static(model, tokenizer, static.global_plan, calibration_spec,
                                            references=calibration, greedy_start=False)
            except RefineError as e:
                raise EvalError(f"refining at {target}: {e}") from None
            target_rows.append(evaluate_plan(model, data, refined, f"fitted static (refined) {tag}", "plan", config,
                                             family="fitted static (refined)"))
            reference_plan, reference_row = refined, target_rows[-1]
        target_rows.append(evaluate_plan(model, data, fitted["adaptive"], f"fitted adaptive {tag}", "plan", config,
                                         family="fitted adaptive"))
        if per_class:
            for mode, plan in fitted.items():
                if plan.classes and set(data.classes) <= set(plan.classes):
                    target_rows.append(evaluate_plan(
                        model, data, plan, f"fitted {mode} per-class (routed by label) {tag}", "plan", config,
                        route="label", family=f"fitted {mode} per-class (routed by label)"))
            if refine and static.classes and set(data.classes) <= set(static.classes):
                per_class_refined = copy.deepcopy(static)
                per_class_refined.global_plan = refined
                try:
                    with data.progress.stage(f"target {target:.2f}: refining each class's static set", 1):
                        warnings = refine_plan_file(model, tokenizer, per_class_refined, calibration_spec,
                                                    references=calibration, greedy_start=False, refine_global=False)
                    for warning in warnings:
                        log(f"warning: {warning}")
                except RefineError as e:
                    raise EvalError(f"refining class plans at {target}: {e}") from None
                family = "fitted static per-class (refined, routed by label)"
                target_rows.append(evaluate_plan(model, data, per_class_refined, f"{family} {tag}", "plan", config,
                                                 route="label", family=family))
        realized = reference_row["skip_ratio"]
        if config.baselines and realized > 0:
            log(f"target {target:.2f}: baselines at realized ratio {realized:.3f}")
            target_rows += baseline_rows(model, data, reference_plan, realized, config, profile, label=tag)
        want_oracle = config.oracle if config.oracle is not None else num_layers <= config.oracle_max_layers
        if oracle_targets is not None and not any(abs(target - t) < 1e-9 for t in oracle_targets):
            want_oracle = False
        if want_oracle and realized > 0:
            fractions = [f for _, f in sorted(reference_plan.skip_layers.items())]
            sets = _oracle_set_count(len(middle_layers(num_layers)), fractions)
            if sets <= oracle_max_sets:
                log(f"target {target:.2f}: oracle over {sets} sets")
                target_rows.append(oracle_row(model, data, reference_plan, realized, config, suffix=f" {tag}"))
            else:
                log(f"target {target:.2f}: oracle skipped ({sets} sets > {oracle_max_sets})")
        for row in target_rows:
            row["target"] = target
        rows += target_rows
    result = build_result(model, data, rows, config, data_spec, model_name, "")
    result["sweep"] = {"targets": list(targets), "refine": refine, "per_class": per_class,
                       "profile": (profile.header or {}).get("corpus")}
    return result


def _oracle_set_count(candidates: int, fractions: Sequence[float]) -> int:
    k = len(fractions)
    partial = sum(1 for f in fractions if f < 1.0)
    per_combo = math.perm(k, partial) // math.factorial(partial) if partial else 1
    return math.comb(candidates, k) * per_combo if k <= candidates else 0
