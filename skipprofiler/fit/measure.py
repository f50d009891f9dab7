"""Measured cost of static skip sets: mean per-token KL(dense || plan) on teacher-forced decode positions of
calibration windows, with the plan applied by the runtime exactly as in generation (see fidelity.measure_plan).

The dense log-probs are computed once (`calibration_references`) and reused for every set, each set is one batched
forward over all windows, and `SetEvaluator` starts that forward at the first layer where the set differs from a
set it has kept the layer inputs of (prefix reuse). search.py decides which sets to measure.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from ..evaluation.fidelity import (DenseReference, FidelityError, FidelitySums, compare, dense_references, logits_of,
                                  model_forward, prepare_windows)
from ..plan.model import SkipPlan
from .search import RefineError, Slots, canonical

log = logging.getLogger("skipprofiler")

# Calibration windows of a search: 4 documents per class, 32-token prompt + 64 decode positions. A search measures
# a hundred sets or more, so each measurement must be cheap; the KL of a set on these windows ranks sets as the
# held-out text does (docs/results.md reports the held-out cost of what it picks).
SEARCH_PROMPT_LEN, SEARCH_WINDOW, SEARCH_DOCS_PER_CLASS = 32, 96, 4


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
        from ..arch.registry import resolve
        from ..runtime import apply_plan

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
    from ..arch.registry import first_tensor

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


def calibration_references(model, tokenizer, data_spec: str | None, *, split: str = "calibration",
                           prompt_len: int = SEARCH_PROMPT_LEN, window: int = SEARCH_WINDOW,
                           docs_per_class: int | None = SEARCH_DOCS_PER_CLASS, batch_size: int = 16,
                           text_column: str | None = None, class_column: str | None = None) -> list[DenseReference]:
    """Dense references on a data spec (default: the bundled calibration split), batched per class; documents are
    read as `skipprof profile` reads them (`text_column`, `class_column`, chat template)."""
    windows = prepare_windows(model, tokenizer, data_spec, split=split, window=window, min_len=prompt_len + 2,
                              prompt_len=prompt_len, batch_size=batch_size, per_class=docs_per_class,
                              text_column=text_column, class_column=class_column)
    return dense_references(model, windows.batches)


def ffn_output_means(model, references: Sequence[DenseReference]) -> dict[int, list[float]]:
    """Per layer, the dense model's mean FFN output over the references' decode positions (real tokens from the
    prompt length on): what compensation mean_output adds in place of a skipped FFN."""
    from ..arch.registry import RESIDUAL_INSIDE, first_tensor, resolve

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


def references_of_class(references: Sequence[DenseReference], cls: str) -> list[DenseReference]:
    """The calibration batches whose measured positions all belong to `cls` (calibration batches are per class)."""
    return [r for r in references if r.row_class and set(r.row_class) == {cls}]
