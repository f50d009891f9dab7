"""KL-measured static skip sets: `refine_static` (greedy add + swap, SLEB-style) and `oracle_static` (exhaustive).

Cosine ranking is only a proxy for what skipping a layer costs. Both functions here measure the real cost: mean
per-token KL(dense || plan) on teacher-forced decode positions, with the plan applied by the runtime exactly as in
generation (see fidelity.measure_plan). The dense log-probs are computed once and reused for every candidate set, and
each candidate set is one batched forward over all calibration windows, so a search costs one forward per set.

A static set is a multiset of *slots* (layer, fraction): refinement moves a slot to another layer and keeps its
fraction, so the expected skip ratio (sum of fractions / L x eligible share) never changes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .fidelity import (DenseReference, FidelityError, FidelitySums, compare, dense_references, load_documents,
                       logits_of, make_batches, measure_plan, model_forward, pad_id_of, token_windows)
from .plan import SkipPlan

Slots = tuple[tuple[int, float], ...]
log = logging.getLogger("skipprofiler")
DEFAULT_SHORTLIST = 4  # swap candidates per slot after a greedy pass: the layers it measured cheapest to skip
# Calibration windows of a search: 4 documents per class, 32-token prompt + 64 decode positions. A search measures
# a hundred sets or more, so each measurement must be cheap; the KL of a set on these windows ranks sets as the
# held-out text does (docs/results.md reports the held-out cost of what it picks).
SEARCH_PROMPT_LEN, SEARCH_WINDOW, SEARCH_DOCS_PER_CLASS = 32, 96, 4


class RefineError(ValueError):
    """Refinement cannot run (not a static plan, no candidates, search too large)."""


@dataclass
class SetEvaluator:
    """Measured KL of static skip sets on fixed calibration references (memoised: a set is measured once).

    Prefix reuse: a static set changes nothing before its first skipped layer, and two sets agree on every layer
    before the first layer where their slots differ. The evaluator keeps the per-layer stream of `anchor` sets (the
    dense model always; the search's current set via `set_anchor`), and measures a new set by starting its forward
    at the first layer where it differs from the closest anchor, from that anchor's stream. The KL is the same as a
    full forward (checked by the tests); the cost falls with the share of layers skipped over.
    """

    model: object
    references: Sequence[DenseReference]
    template: SkipPlan  # eligibility settings (apply_to, warm-up, dense-every, compensation) shared by every set
    cache: dict[Slots, float] = field(default_factory=dict)
    on_measure: Callable[[Slots, float], None] | None = None
    reuse_prefix: bool = True
    layers_run: int = 0  # decoder layers run over all references (the search's cost, in layer forwards)
    ppl_ratio: dict[Slots, float] = field(default_factory=dict)  # perplexity with the set / dense perplexity
    _anchors: dict[Slots, list[list]] = field(default_factory=dict)  # set -> per reference, per layer input stream
    _started: float = field(default_factory=time.perf_counter)

    def __call__(self, slots: Slots) -> float:
        key = canonical(slots)
        if key not in self.cache:
            self.cache[key] = self._measure(key, record=False)
            if self.on_measure:
                self.on_measure(key, self.cache[key])
            log.info("set %d: layers %s KL %.4f ppl %+.1f%% (%.0f s)", len(self.cache),
                     " ".join(f"{l}" if f == 1.0 else f"{l}x{f:g}" for l, f in key), self.cache[key],
                     100 * (self.ppl_ratio[key] - 1.0), time.perf_counter() - self._started)
        return self.cache[key]

    def set_anchor(self, slots: Slots) -> None:
        """Keep `slots`' per-layer stream (replacing the previous non-dense anchor) so sets near it start late."""
        key = canonical(slots)
        if not self.reuse_prefix or key in self._anchors:
            return
        for old in [a for a in self._anchors if a]:
            del self._anchors[old]
        kl = self._measure(key, record=True)
        self.cache.setdefault(key, kl)

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def _plan(self, key: Slots) -> SkipPlan:
        return replace(self.template, mode="static", skip_layers=dict(key), tau=None, max_skip=0,
                       fit=dict(self.template.fit))

    def _measure(self, key: Slots, record: bool) -> float:
        from .registry import resolve
        from .runtime import apply_plan

        layers = resolve(self.model).layers
        if self.reuse_prefix and () not in self._anchors and key:
            self._anchors[()] = self._record_dense(layers)
        base, start = self._closest_anchor(key, len(layers)) if self.reuse_prefix else (None, 0)
        states = [[] for _ in self.references] if record else None
        sums = FidelitySums()
        with apply_plan(self.model, self._plan(key)) as handle, torch.inference_mode():
            for i, ref in enumerate(self.references):
                stream = None if base is None else self._anchors[base][i]
                if record:
                    states[i].extend(stream[:start] if stream is not None else [])
                with handle.decode_from(ref.batch.prompt_len), _start_at(layers, start, stream), \
                        _record_inputs(layers[start:], states[i] if record else None):
                    measured_logits(self.model, ref, compare_into=sums)
        self.layers_run += (len(layers) - start) * len(self.references)
        if record:
            self._anchors[key] = states
        total = sums.summary(None)
        self.ppl_ratio[key] = total["ppl"] / total["ppl_dense"]
        kl = sums.total_kl_mean()
        if not math.isfinite(kl):
            raise FidelityError(f"non-finite KL for skip set {list(key)}")
        return kl

    def _record_dense(self, layers) -> list[list]:
        forward = model_forward(self.model)
        states = [[] for _ in self.references]
        returns: list[bool] = []
        probe = layers[0].register_forward_hook(lambda m, a, out: returns.append(isinstance(out, torch.Tensor)))
        try:
            with torch.inference_mode():
                for i, ref in enumerate(self.references):
                    with _record_inputs(layers, states[i]):
                        forward(ref.batch)
        finally:
            probe.remove()
        self.layers_run += len(layers) * len(self.references)
        if not all(returns):  # layers returning tuples: the hand-off cannot stand in for them, run every layer
            self.reuse_prefix = False
        return states

    def _closest_anchor(self, key: Slots, num_layers: int) -> tuple[Slots | None, int]:
        """(anchor, first layer to run): the anchor sharing the longest prefix of layers with `key`."""
        best: tuple[Slots | None, int] = (None, 0)
        for anchor in self._anchors:
            differ = set(key) ^ set(anchor)
            start = min((layer for layer, _ in differ), default=num_layers)
            start = min(start, num_layers - 1)  # always run the last layer: the logits come from a forward
            if start > best[1]:
                best = (anchor, start)
        return best


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def measured_logits(model, reference: DenseReference, compare_into) -> None:
    """Forward one reference batch and add its fidelity to `compare_into`, computing the LM head only on the
    positions that are measured (the decode part of the window) when the model's forward takes `logits_to_keep`:
    with a 49k vocabulary the head is a large share of a small model's work."""
    batch = reference.batch
    width = batch.input_ids.shape[1]
    keeps = _takes_logits_to_keep(type(model))
    if not keeps or batch.prompt_len >= width - 1:
        compare(reference, model_forward(model)(batch), compare_into)
        return
    device = next(model.parameters()).device
    kept = torch.arange(batch.prompt_len, width - 1)  # every measured position p has prompt_len <= p <= width - 2
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                use_cache=False, logits_to_keep=kept.to(device))
    compare(replace(reference, mask=reference.mask[:, kept]), logits_of(out).cpu(), compare_into)


@contextlib.contextmanager
def _record_inputs(layers, into: list | None):
    """Append each decoder layer's input stream (a detached copy) to `into`, in layer order."""
    if into is None:
        yield
        return
    from .registry import first_tensor

    def grab(module, args, kwargs):
        into.append(first_tensor(args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _start_at(layers, start: int, stream: list | None):
    """Run the forward from layer `start` on: earlier layers pass their input through, and the one before `start`
    returns the recorded input of `start` (transformers 5 decoder layers return the hidden states tensor)."""
    if stream is None or start == 0:
        yield
        return

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def handoff(hidden_states, *args, **kwargs):
        return stream[start]

    patched = list(layers[:start])
    saved = [layer.__dict__.get("forward") for layer in patched]  # an instance forward (e.g. accelerate's) stays
    for layer in patched[:-1]:
        layer.forward = passthrough
    patched[-1].forward = handoff
    try:
        yield
    finally:
        for layer, forward in zip(patched, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def canonical(slots: Sequence[tuple[int, float]]) -> Slots:
    return tuple(sorted((int(layer), float(f)) for layer, f in slots))


def middle_layers(num_layers: int) -> list[int]:
    """Candidates for skipping: every layer but the first and the last (SLEB and LLM-Drop protect both)."""
    return list(range(1, num_layers - 1)) if num_layers > 2 else list(range(num_layers))


def swap_descent(evaluate: SetEvaluator, slots: Slots, candidates: Sequence[int], max_rounds: int,
                 shortlist: int | None = None, cost_hint: dict[int, float] | None = None) -> tuple[Slots, int]:
    """Best-improvement swaps (one slot -> one unused candidate) until no swap lowers the KL. Returns (set, rounds).

    With `shortlist`, each slot is only tried against the `shortlist` unused candidates that `cost_hint` (a layer's
    measured cost, lower = cheaper to skip) ranks cheapest, which bounds a round to slots x shortlist sets."""
    current, best_kl, rounds = canonical(slots), evaluate(slots), 0
    while rounds < max_rounds:
        evaluate.set_anchor(current)
        used = {layer for layer, _ in current}
        unused = [c for c in candidates if c not in used]
        if shortlist is not None and cost_hint:
            unused = sorted(unused, key=lambda c: cost_hint.get(c, math.inf))[:shortlist]
        best_move = None
        for i, (_, fraction) in enumerate(current):
            for cand in unused:
                trial = canonical(current[:i] + ((cand, fraction),) + current[i + 1:])
                kl = evaluate(trial)
                if kl < best_kl * (1 - 1e-9):
                    best_kl, best_move = kl, trial
        if best_move is None:
            break
        current, rounds = best_move, rounds + 1
    return current, rounds


@dataclass
class LazyGreedy:
    """SLEB-style greedy growth of a skip set: each step adds the candidate whose addition costs the least measured
    KL.

    Lazy (CELF): a candidate's added cost measured at an earlier step is kept as its estimate; only the candidate
    with the lowest estimate is re-measured, and it is taken when its fresh cost still beats every other estimate.
    Skipping costs grow as the set grows (interactions add up), so an old estimate is a lower bound and the lazy
    choice is the greedy choice; where they do not grow the result is still a measured, locally good set.
    `costs` holds each layer's latest added cost (the shortlist hint for `swap_descent`)."""

    evaluate: SetEvaluator
    candidates: Sequence[int]
    lazy: bool = True
    chosen: Slots = ()
    costs: dict[int, float] = field(default_factory=dict)

    def step(self, fraction: float = 1.0) -> Slots:
        """The set with one more slot of `fraction` (the greedy choice); `chosen` becomes that set."""
        used = {layer for layer, _ in self.chosen}
        options = [c for c in self.candidates if c not in used]
        if not options:
            raise RefineError("more skip slots than candidate layers")
        base_kl = self.evaluate(self.chosen) if self.chosen else 0.0
        self.evaluate.set_anchor(self.chosen)
        fresh: set[int] = set()

        def added_cost(c: int) -> float:
            fresh.add(c)
            self.costs[c] = self.evaluate(canonical(self.chosen + ((c, fraction),))) - base_kl
            return self.costs[c]

        if not self.lazy or not self.costs:
            best = min(options, key=added_cost)
        else:
            while True:
                best = min(options, key=lambda c: self.costs.get(c, -math.inf))
                if best in fresh:
                    break
                added_cost(best)
        self.chosen = canonical(self.chosen + ((best, fraction),))
        return self.chosen


def greedy_add(evaluate: SetEvaluator, fractions: Sequence[float], candidates: Sequence[int],
               lazy: bool = True, costs: dict[int, float] | None = None) -> Slots:
    """Greedy set with these slot fractions (full slots first); `costs` receives the layers' latest added costs."""
    greedy = LazyGreedy(evaluate, candidates, lazy, costs=costs if costs is not None else {})
    for fraction in sorted(fractions, reverse=True):
        greedy.step(fraction)
    return greedy.chosen


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


BUDGET_FRACTIONS = (0.75, 0.5, 0.25)  # partial last slots tried when the next whole layer breaks the budget


def fit_to_budget(evaluate: SetEvaluator, candidates: Sequence[int], budget: Budget) -> tuple[Slots, dict]:
    """The largest static set the budget allows: lazy-greedy whole layers while the measured cost stays within the
    budget, then the next layer at the largest of `BUDGET_FRACTIONS` that still fits. Returns (set, record) with the
    greedy path (each prefix's measured KL and perplexity increase)."""
    greedy = LazyGreedy(evaluate, list(candidates))
    path: list[dict] = []
    chosen: Slots = ()
    while len(chosen) < len(candidates):
        trial = greedy.step(1.0)
        kl, ratio = evaluate(trial), evaluate.ppl_ratio[trial]
        path.append({"layers": [layer for layer, _ in trial], "kl": _r(kl), "ppl_increase": _r(ratio - 1.0)})
        if not budget.allows(kl, ratio):
            break
        chosen = trial
    if len(chosen) < len(candidates) and path:
        evaluate.set_anchor(chosen)
        taken = {layer for layer, _ in chosen}
        nxt = next(layer for layer in path[-1]["layers"] if layer not in taken)  # the layer that broke the budget
        for fraction in BUDGET_FRACTIONS:
            trial = canonical(chosen + ((nxt, fraction),))
            kl, ratio = evaluate(trial), evaluate.ppl_ratio[trial]
            if budget.allows(kl, ratio):
                chosen = trial
                path.append({"layers": [[l, f] for l, f in trial], "kl": _r(kl), "ppl_increase": _r(ratio - 1.0)})
                break
    if not chosen:
        raise RefineError(f"no FFN can be skipped within the budget {budget.describe()}: skipping the cheapest layer "
                          f"alone measures KL {path[0]['kl']}, perplexity {path[0]['ppl_increase']:+.1%}")
    record = {"budget": budget.describe(), "kl": _r(evaluate(chosen)),
              "ppl_increase": _r(evaluate.ppl_ratio[canonical(chosen)] - 1.0), "path": path,
              "evaluations": evaluate.evaluations, "layer_forwards": evaluate.layers_run}
    return chosen, record


def refine_slots(evaluate: SetEvaluator, slots: Slots, candidates: Sequence[int], max_rounds: int = 20,
                 greedy_start: bool = True, extra_starts: dict[str, Slots] | None = None,
                 shortlist: int | None = DEFAULT_SHORTLIST) -> tuple[Slots, dict]:
    """Lazy greedy add (optional), then swap descent from the greedy set, from the given set and from each of
    `extra_starts` (named sets with the same slot fractions, e.g. the global plan's set when refining a class plan);
    keep the lowest KL. Swaps try the `shortlist` layers the greedy pass measured cheapest (all with None)."""
    if not slots:
        raise RefineError("the plan skips no layer: nothing to refine")
    candidates = sorted(set(candidates) | {layer for layer, _ in slots})
    if len(candidates) < len(slots):
        raise RefineError(f"{len(slots)} skip slots but only {len(candidates)} candidate layers")
    fractions = [f for _, f in slots]
    costs: dict[int, float] = {}
    starts: dict[str, dict] = {}
    best: Slots | None = None

    def descend(name: str, start: Slots) -> None:
        nonlocal best
        alt, rounds = swap_descent(evaluate, start, candidates, max_rounds, shortlist if costs else None, costs)
        starts[name] = {"layers": [layer for layer, _ in canonical(start)], "kl": _r(evaluate(start)),
                        "refined_kl": _r(evaluate(alt)), "swaps": rounds}
        if best is None or evaluate(alt) < evaluate(best):
            best = alt

    initial_kl = evaluate(slots)
    if greedy_start:  # the greedy set, not the profile-ranked one: a second descent would double the cost
        descend("greedy_add", greedy_add(evaluate, fractions, candidates, costs=costs))
        starts["plan"] = {"layers": [layer for layer, _ in canonical(slots)], "kl": _r(initial_kl)}
        if initial_kl < evaluate(best):
            best = canonical(slots)
    else:
        descend("plan", canonical(slots))
    for name, start in (extra_starts or {}).items():
        start = canonical(start)
        if sorted(f for _, f in start) != sorted(fractions):
            continue  # a different slot shape would change the skip ratio
        candidates = sorted(set(candidates) | {layer for layer, _ in start})
        descend(name, start)
    info = {"initial_kl": _r(initial_kl), "refined_kl": _r(evaluate(best)), "evaluations": evaluate.evaluations,
            "layer_forwards": evaluate.layers_run, "shortlist": shortlist if costs else None,
            "candidates": candidates, "starts": starts}
    return best, info


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def calibration_references(model, tokenizer, data_spec: str | None, *, split: str = "calibration",
                           prompt_len: int = SEARCH_PROMPT_LEN, window: int = SEARCH_WINDOW,
                           docs_per_class: int | None = SEARCH_DOCS_PER_CLASS, batch_size: int = 16,
                           text_column: str | None = None, class_column: str | None = None) -> list[DenseReference]:
    """Dense references on a data spec (default: the bundled calibration split), batched per class; documents are
    read as `skipprof profile` reads them (`text_column`, `class_column`, chat template)."""
    docs = load_documents(data_spec, split=split, text_column=text_column, class_column=class_column)
    tokens, classes = token_windows(tokenizer, docs, window, docs_per_class, prompt_len + 2)
    pad = pad_id_of(tokenizer, model)
    batches = []
    for cls in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == cls]
        batches += make_batches([tokens[i] for i in idx], [cls] * len(idx), prompt_len, pad, batch_size)
    return dense_references(model, batches)


def ffn_output_means(model, references: Sequence[DenseReference]) -> dict[int, list[float]]:
    """Per layer, the dense model's mean FFN output over the references' decode positions (real tokens from the
    prompt length on): what compensation mean_output adds in place of a skipped FFN."""
    from .registry import RESIDUAL_INSIDE, first_tensor, resolve

    sites = resolve(model).sites
    if any(site.contribution == RESIDUAL_INSIDE for site in sites):
        raise RefineError("compensation mean_output is not supported for this architecture (its FFN adds the "
                          "residual itself)")
    sums: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def fn(module, args, output):
            out = first_tensor(output)
            flat = out.reshape(-1, out.shape[-1]).double()
            picked = flat[state["mask"].reshape(-1).to(flat.device)]
            sums[index] = sums.get(index, 0) + picked.sum(0).cpu()
        return fn

    handles = [site.ffn_modules[-1].register_forward_hook(hook(site.index)) for site in sites]
    count = 0
    forward = model_forward(model)
    try:
        with torch.inference_mode():
            for ref in references:
                batch = ref.batch
                pos = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
                state["mask"] = batch.attention_mask.bool() & (pos >= batch.prompt_len)
                count += int(state["mask"].sum())
                forward(batch)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise RefineError("no decode positions to average FFN outputs over")
    return {i: [float(x) for x in (v / count).float()] for i, v in sorted(sums.items())}


def with_mean_outputs(model, plan: SkipPlan, references: Sequence[DenseReference]) -> SkipPlan:
    """`plan` with ffn_mean for every layer when it asks for compensation mean_output (a search may skip any)."""
    if plan.compensation != "mean_output" or plan.ffn_mean:
        return plan
    return replace(plan, ffn_mean=ffn_output_means(model, references))


# Statistics windows of linear substitutes: 24 documents per class after the search's own, 32-token prompt + 128
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
    from .plan import LinearMaps
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
        "seconds": _r(time.perf_counter() - started),
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
    from .plan import LinearMaps
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
    record = {"kl_independent": _r(kl_before), "kl_error_aware": _r(kl_after), "kept": bool(keep),
              "min_gain": ERROR_AWARE_MIN_GAIN, "seconds": _r(time.perf_counter() - started)}
    fit = dict(chosen.fit)
    fit["substitutes"] = {**fit.get("substitutes", {}), "error_aware": record}
    if keep and "refined_kl" in fit:
        fit["refined_kl"] = _r(kl_after)
    log.info("error-aware substitutes: KL %.4f -> %.4f (%s)", kl_before, kl_after, "kept" if keep else "not kept")
    return replace(chosen, fit=fit)


def class_substitutes(model, tokenizer, plan_file, data_spec: str | None = None, *, text_column: str | None = None,
                      class_column: str | None = None) -> None:
    """Per-class maps on the global layer set: each class plan becomes the global plan with maps fitted on that
    class's calibration windows only (as many positions per class as the global maps had in all), so a router can
    send a prompt to the maps of its kind of text. Class layer *sets* are not searched: with a few documents per
    class they overfit (docs/results.md)."""
    from .plan import LinearMaps
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
                              "seconds": _r(time.perf_counter() - started),
                              "layers": {int(l): {k: m.record[k] for k in ("lambda", "heldout_error",
                                                                            "heldout_error_mean")}
                                         for l, m in maps.items()}}
        fit["class_maps_on_global_set"] = True
        plan_file.classes[name] = replace(glob, linear=LinearMaps(glob.linear.rank, tensors), fit=fit)


def substitute_cost_share(model, plan: SkipPlan) -> float:
    """A plan's substitute FLOPs per skipped call as a share of one FFN call's FLOPs (0 without linear maps)."""
    if plan.compensation != "linear" or plan.linear is None:
        return 0.0
    from .bench import token_flops

    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd")
    return plan.linear.flops_per_call(hidden) / token_flops(model)["ffn"]


def keep_skipped_means(plan: SkipPlan) -> SkipPlan:
    """Drop the mean outputs and linear maps of layers the plan never skips (they only make the files longer)."""
    if not plan.ffn_mean and plan.linear is None:
        return plan
    num_layers = len(plan.tau) if plan.tau is not None else None
    skippable = (set(plan.skip_layers) if plan.mode == "static"
                 else set(range(plan.cold_start, (num_layers or 0) - plan.cold_end)))
    if plan.linear is not None:
        plan = replace(plan, linear=plan.linear.keep(skippable))
        if "substitutes" in plan.fit:
            record = dict(plan.fit["substitutes"])
            record["layers"] = {l: v for l, v in record["layers"].items() if l in skippable}
            plan.fit = {**plan.fit, "substitutes": record}
    if not plan.ffn_mean:
        return plan
    return replace(plan, ffn_mean={l: v for l, v in plan.ffn_mean.items() if l in skippable})


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
        raise RefineError(f"--refine works on static plans; this plan is {plan.mode!r}")
    from .registry import resolve

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
    evaluate = SetEvaluator(model, references, plan)
    best, info = refine_slots(evaluate, canonical(plan.skip_layers.items()), cands, max_rounds, greedy_start,
                              extra_starts)
    info["data"] = {"spec": data_spec or "bundled calibration split", "prompt_len": prompt_len, "window": window,
                    "docs_per_class": docs_per_class, "tokens": sum(int(r.mask.sum()) for r in references)}
    fit = dict(plan.fit)
    fit["refined_kl"] = info["refined_kl"]
    fit["refine"] = info
    plan = keep_skipped_means(replace(plan, skip_layers=dict(best), fit=fit))
    return error_aware_substitutes(model, tokenizer, plan, references, data_spec) if error_aware else plan



def fit_budget_plan(model, tokenizer, template: SkipPlan, budget: Budget, data_spec: str | None = None, *,
                    references: Sequence[DenseReference] | None = None, candidates: Sequence[int] | None = None,
                    prompt_len: int = SEARCH_PROMPT_LEN, window: int = SEARCH_WINDOW,
                    docs_per_class: int | None = SEARCH_DOCS_PER_CLASS, gen_len: int | None = None,
                    rank: int | None = None) -> SkipPlan:
    """A static plan with the most FFN skips whose measured cost on calibration windows stays within `budget`
    (`fit_to_budget`); `template` gives the eligibility settings. The plan records the budget, the measured cost and
    the greedy path in `fit`, and its expected skip ratio."""
    from .fit import DEFAULT_HORIZON, static_skip_ratio
    from .registry import resolve

    num_layers = resolve(model).num_layers
    if references is None:
        references = calibration_references(model, tokenizer, data_spec, prompt_len=prompt_len, window=window,
                                            docs_per_class=docs_per_class)
    template = with_mean_outputs(model, template, references)
    cands = list(candidates) if candidates is not None else middle_layers(num_layers)
    template = with_substitutes(model, tokenizer, template, data_spec, cands, rank)
    evaluate = SetEvaluator(model, references, replace(template, mode="static", skip_layers={}))
    slots, record = fit_to_budget(evaluate, cands, budget)
    horizon = max(1, (gen_len or DEFAULT_HORIZON) - template.warmup_tokens)
    plan = replace(template, mode="static", skip_layers=dict(slots), tau=None, max_skip=0)
    plan.expected_skip_ratio = _r(static_skip_ratio(plan, num_layers, horizon))
    record["data"] = {"spec": data_spec or "bundled calibration split", "prompt_len": prompt_len, "window": window,
                      "docs_per_class": docs_per_class, "tokens": sum(int(r.mask.sum()) for r in references)}
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
    lowest mean KL wins (else the closest ratio). `fit.measured` records every candidate's ratio and KL."""
    from .fit import FitError, fit_adaptive

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
            log.info("adaptive k %d dense-every %d: realized %.3f KL %.4f", k, every, stats["decided_skip_ratio"], tried[-1][2])
    if not tried:
        raise RefineError(f"no adaptive plan reaches {settings.target:g} for any run length in {list(run_lengths)}")
    at_target = [t for t in tried if abs(t[1] - settings.target) <= RATIO_SLACK]
    plan, ratio, kl, summary = (min(at_target, key=lambda t: t[2]) if at_target
                                else min(tried, key=lambda t: abs(t[1] - settings.target)))
    plan.fit["measured"] = {
        "kl": _r(kl), "ppl_increase": _r(summary["ppl"] / summary["ppl_dense"] - 1.0),
        "calibration_skip_ratio": _r(ratio), "chosen_from": "at target" if at_target else "closest ratio",
        "candidates": [[t[0].max_skip, t[0].dense_every, _r(t[1]), _r(t[2])] for t in tried],  # k, every, ratio, KL
        "tokens": sum(int(r.mask.sum()) for r in references)}
    return plan


def compare_with_static(model, adaptive: SkipPlan, references: Sequence[DenseReference]) -> dict:
    """The refined static plan at the adaptive plan's realized calibration ratio, measured on the same windows:
    what an adaptive plan has to beat (FFN-SkipLLM's rule is only worth its per-token work when it wins)."""
    from .registry import resolve

    num_layers = resolve(model).num_layers
    ratio = adaptive.fit["measured"]["calibration_skip_ratio"]
    budget = ratio * num_layers
    full = int(math.floor(budget + 1e-9))
    fractions = [1.0] * full + ([round(budget - full, 3)] if budget - full >= 0.01 else [])
    template = with_mean_outputs(model, SkipPlan(mode="static", compensation=adaptive.compensation,
                                                 norm_gain=adaptive.norm_gain), references)
    evaluate = SetEvaluator(model, references, template)
    start = tuple((layer, f) for layer, f in zip(middle_layers(num_layers), fractions))  # any set of this shape
    best, info = refine_slots(evaluate, start, middle_layers(num_layers), greedy_start=True)  # as export-plan --refine
    return {"skip_ratio": _r(sum(fractions) / num_layers), "layers": [[l, f] for l, f in best],
            "kl": _r(evaluate(best)), "adaptive_kl": adaptive.fit["measured"]["kl"],
            "static_wins": bool(evaluate(best) < adaptive.fit["measured"]["kl"])}


def references_of_class(references: Sequence[DenseReference], cls: str) -> list[DenseReference]:
    """The calibration batches whose measured positions all belong to `cls` (calibration batches are per class)."""
    return [r for r in references if r.row_class and set(r.row_class) == {cls}]


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
