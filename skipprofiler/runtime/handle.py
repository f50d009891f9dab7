"""The public handle: `apply_plan` patches a model; `SkipHandle` plans each forward, counts, and restores the model.

Per forward the pre-hook reads where the forward's decode positions start (below: generate's input length,
`decode_from`, `verifying`, the cache) and each row's plan, and leaves the `Forward` that `forward_plan` returns on
the handle; each patched FFN (`ffn`) takes its layer's action from it; the post-hook adds the forward's counts.
Adaptive plans and prompt routing are plug-ins (`plugins.Plugin`: `adaptive`, `routing`), compensation is the fills of
`compensation`: each is imported only when a plan needs it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..arch.compat import cache_in
from ..arch.registry import ResolvedArch, resolve
from ..plan.model import ADAPTIVE, ALL_POSITIONS, BATCH_DECISIONS, NO_COMPENSATION, SHARED, PlanError, PlanFile, SkipPlan
from .checks import check_fingerprint, describe_layer, plans_for
from .ffn import patch_ffn
from .patcher import Patcher
from .schedule import Counts, Forward, Rule, decode_step, first_decode_index

_HANDLE_ATTR = "_skipprof_handle"


class SkipHandle:
    """An applied plan. ``remove()`` (or leaving the ``with`` block) restores the model bit-exactly."""

    def __init__(self, model: nn.Module, arch: ResolvedArch, plans: dict[str | None, SkipPlan], prompt_class: str | None):
        self.model, self.arch, self.patcher = model, arch, Patcher()
        self.forward: Forward | None = None  # the forward in progress (read by the patched FFNs)
        self.row_classes: list[str | None] | None = None  # per row of the last prompt, when a router chose them
        self._plans, self._prompt_class = plans, prompt_class
        self._class = None if prompt_class == "auto" else prompt_class  # the class every row follows unless routed
        self._rules: dict[str | None, Rule] = {}
        self._plugins: list = []  # plugins.Plugin: adaptive, routing
        self._pad_offsets: list[int] | None = None  # per row of the last prompt: leading pads (apply_to: all)
        self._totals = Counts()
        self._removed = False
        # where decode positions start: decode_from's starts (per row, or one for all); inside generate the length
        # of its input; outside it where the last prompt ended
        self._decode_start: list[int] | None = None
        self._generate_prompt_end: int | None = None
        self._prompt_end: int | None = None
        self._verifying = False
        self._warned_no_cache = False
        self._ffn_flops_per_call: float | None = None

    # ---- public API ------------------------------------------------------------------------------------------------

    @property
    def plan(self) -> SkipPlan:
        """The active plan: the named class's, the global one, or (auto) the first row's routed class plan."""
        classes = self.chosen_classes
        return self._plans.get(classes[0] if classes else None, next(iter(self._plans.values())))

    @property
    def chosen_classes(self) -> list[str | None] | None:
        """Per row of the last prompt, the class the router chose (prompt_class='auto'); the named class otherwise."""
        if self.row_classes is not None:
            return list(self.row_classes)
        return None if self._class is None else [self._class]

    @property
    def chosen_class(self) -> str | None:
        classes = self.chosen_classes
        return classes[0] if classes else None

    @contextlib.contextmanager
    def decode_from(self, start: int | torch.Tensor | Sequence[int]) -> Iterator[SkipHandle]:
        """For cache-less full-sequence forwards (teacher forcing): positions >= start[b] are decode positions."""
        if isinstance(start, torch.Tensor):
            start = start.tolist()
        previous = self._decode_start
        self._decode_start = [int(start)] if isinstance(start, int) else [int(s) for s in start]
        try:
            yield self
        finally:
            self._decode_start = previous

    @contextlib.contextmanager
    def verifying(self) -> Iterator[SkipHandle]:
        """For hand-written speculative decoding: multi-token forwards on a non-empty cache are decode positions."""
        previous, self._verifying = self._verifying, True
        try:
            yield self
        finally:
            self._verifying = previous

    def stats(self) -> dict[str, Any]:
        """Counts over decode positions after warm-up (real tokens). ``decided_skips``: FFN calls the plan's rule
        skipped; ``rows_not_computed``: FFN rows really not computed (masked rows run the FFN: they count 0);
        ``substitute_rows`` / ``substitute_flops``: rows a linear substitute map was computed for instead, and what
        that cost (every position of a skipped call, padding included: the work done); ``narrowed_rows``: FFN rows
        that ran only their kept neurons (neuron plans); ``ffn_flops_saved_share``: the share of the decode positions'
        FFN FLOPs not computed, net of substitutes: whole-FFN skips count the FFN, narrowed rows (I - k) of I neurons'
        matmul FLOPs; linear maps' FLOPs and the mean bias's adds are subtracted. ``plan_bytes``: memory the applied
        plans hold beside the model's weights (linear maps, neuron biases and maps, fill refit's down columns; at the
        model's dtype), ``model_bytes``: the model's parameters and buffers."""
        t = self._totals  # device counts are read here, once
        positions, decided, saved = int(t.positions), int(t.decided), int(t.not_computed)
        calls = positions * self.arch.num_layers
        narrowed_saved, substitutes = float(t.narrowed_flops_saved), float(t.substitute_flops)
        share = 0.0
        if calls and (saved or narrowed_saved or substitutes):
            ffn = self._ffn_flops()
            share = (saved * ffn + narrowed_saved - substitutes) / (calls * ffn) if ffn else 0.0
        return {"decode_positions": positions, "num_layers": self.arch.num_layers,
                "decided_skips": decided, "decided_skip_ratio": decided / calls if calls else 0.0,
                "rows_not_computed": saved, "not_computed_ratio": saved / calls if calls else 0.0,
                "substitute_rows": int(t.substitute_rows), "substitute_flops": substitutes,
                "narrowed_rows": int(t.narrowed), "ffn_flops_saved_share": share,
                "plan_bytes": self._plan_bytes(), "model_bytes": self._model_bytes()}

    def _plan_bytes(self) -> int:
        held = {id(h): h for rule in self._rules.values() for h in (*rule.fills.values(), *rule.neurons.values())}
        size = next(self.model.parameters()).element_size()
        return int(sum(getattr(h, "extra_elements", 0) for h in held.values()) * size)

    def _model_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers())))

    def _ffn_flops(self) -> float:
        """FLOPs of one FFN call for one position (arch.flops, imported when a plan saved something)."""
        if self._ffn_flops_per_call is None:
            from ..arch.flops import token_flops

            self._ffn_flops_per_call = token_flops(self.model)["ffn"]
        return self._ffn_flops_per_call

    def reset_stats(self) -> None:
        self._totals = Counts()

    def remove(self) -> None:
        """Undo everything apply_plan did (hooks, instance attributes); idempotent."""
        self.patcher.undo_all()
        self.forward = None
        self._removed = True

    def __enter__(self) -> SkipHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        layers = sorted({l for r in self._rules.values() for l in r.skippable})
        batch = f", batch_decision={self._batch_decision}" if self.plan.mode == ADAPTIVE else ""
        return (f"SkipHandle({state}, {self.arch.model_type}, class={self._prompt_class!r}, "
                f"mode={self.plan.mode}{batch}, layers={layers})")

    # ---- installation ----------------------------------------------------------------------------------------------

    def _install(self, plan_file: PlanFile | None, host_state: bool | None, batch_decision: str) -> None:
        patch, model, L = self.patcher, self.model, self.arch.num_layers
        self._batch_decision = batch_decision
        patch.set_attr(model, _HANDLE_ATTR, self)
        # Host-side bookkeeping stays out of compiled graphs (HF's automatic compile wraps ``model.__call__``): traced,
        # the cache length would specialise every graph to one position and recompile per token.
        patch.hook(model.register_forward_pre_hook(torch.compiler.disable(self._before_forward), with_kwargs=True))
        patch.hook(model.register_forward_hook(torch.compiler.disable(self._after_forward)))
        if callable(getattr(model, "generate", None)):
            patch.set_attr(model, "generate", self._wrap_generate(model.generate))
        if callable(getattr(model, "init_continuous_batching", None)):
            patch.set_attr(model, "init_continuous_batching", _refuse_continuous_batching)
        streams: dict[int, torch.Tensor] = {}  # norm_ratio: each layer's latest pre-FFN stream
        for name, plan in self._plans.items():
            rule = self._rules[name] = Rule(plan, L, {})
            if plan.compensation != NO_COMPENSATION and rule.skippable:
                from .compensation import fills_for

                rule.fills.update(fills_for(plan, rule.skippable, self.arch, patch, streams))
        self._rule = self._rules.get(self._class, self._rules.get(None))  # a row's rule unless routed elsewhere
        layers = {l for rule in self._rules.values() for l in rule.skippable}
        narrowing = [r for r in self._rules.values() if r.static and r.plan.neurons is not None
                     and r.plan.neurons.tensors]
        widths: dict[int, int] = {}
        if narrowing:
            from .neurons import install

            narrowings = install(self.arch, [r.plan for r in narrowing], patch)  # permutes the kept neurons first
            for rule in narrowing:
                rule.neurons = {l: narrowings[l] for l in rule.plan.neurons.layers}
            layers |= set(narrowings)
            widths = {l: n.size for l, n in narrowings.items()}
        for site in self.arch.sites:
            if site.index in layers:
                patch_ffn(site, self, patch, describe_layer(site.index, self._plans, L, batch_decision,
                                                            widths.get(site.index)))
        adaptive = [r for r in self._rules.values() if not r.static and r.skippable]
        if adaptive:
            from .adaptive import AdaptivePlugin

            self._plugins.append(AdaptivePlugin(self, adaptive, host_state, batch_decision == SHARED))
        if self._prompt_class == "auto":
            from .routing import RoutingPlugin

            dense = all(p.apply_to != ALL_POSITIONS for p in self._plans.values())
            self._plugins.append(RoutingPlugin(self, plan_file, dense))
        self._tracks_pads = any(p.apply_to == ALL_POSITIONS for p in self._plans.values())

    def _wrap_generate(self, original: Callable) -> Callable:
        """``model.generate`` that records its input length as the prompt end while it runs."""
        @functools.wraps(original)
        def generate(*args, **kwargs):
            outer, self._generate_prompt_end = self._generate_prompt_end, _input_length(args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self._generate_prompt_end = outer

        return generate

    # ---- per forward -----------------------------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        self.forward = None
        if any(p.passive for p in self._plugins):
            return None  # a plug-in's own forward (the routing pre-pass) runs dense
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None  # custom 4-D masks: treat every position as real
        batch, seq = ref.shape[0], ref.shape[1]
        past = cache_length(cache_in(kwargs))
        prompt_end = self._prompt_ends(batch, seq, past, kwargs.get("use_cache"))
        teacher_forced = self._decode_start is not None
        for plugin in self._plugins:
            plugin.before(module, args, kwargs, ref=ref, mask=mask, past=past, prompt_end=prompt_end,
                          teacher_forced=teacher_forced)
        if self._tracks_pads and (past == 0 or teacher_forced or self._pad_offsets is None):
            self._pad_offsets = (mask.cumsum(1) == 0).sum(1).tolist() if mask is not None and mask.shape[0] == batch \
                else [0] * batch
        classes = self.row_classes
        if classes is None or len(classes) != batch:
            rules = [self._rule] * batch
        else:
            rules = [self._rules.get(c, self._rule) for c in classes]
        # One new token per row is a generated token, always real; longer forwards read padding from the mask.
        real = mask[:, -seq:].reshape(-1).bool() if seq > 1 and mask is not None and mask.shape[1] >= seq else None
        first_d = first_decode_index(rules, past, prompt_end, self._pad_offsets)
        self.forward = forward_plan(rules, first_d, seq, ref.device, real)
        if self.forward is not None:
            for plugin in self._plugins:
                plugin.begin(self.forward)
        return None

    def _after_forward(self, module, args, out):
        forward, self.forward = self.forward, None
        if forward is None or any(p.passive for p in self._plugins):
            return None
        for plugin in self._plugins:
            plugin.end(forward)
        self._totals += forward.counts  # device counts are summed on the device: no host sync per forward
        return None

    def _prompt_ends(self, batch: int, seq: int, past: int, use_cache: Any) -> list[int]:
        """Per row, the first decode position of a forward feeding `seq` new tokens after `past` cached ones:
        decode_from's start; inside generate its input length (a chat turn's previous turns included), however the
        cache is filled or verified; otherwise an empty cache or several new tokens on a non-empty one (the next turn)
        is a prompt, one new token per row (or a ``verifying()`` forward) continues the last prompt."""
        if self._decode_start is not None:
            starts = self._decode_start
            if len(starts) not in (1, batch):
                raise ValueError(f"decode_from got {len(starts)} start positions for a batch of {batch}")
            return starts * batch if len(starts) == 1 else list(starts)
        if self._generate_prompt_end is not None:
            end = self._generate_prompt_end
        elif past == 0 or (seq > 1 and not self._verifying):
            end = past + seq  # a prompt, or the next prompt chunk on a reused cache: dense
            if use_cache is False and not self._warned_no_cache:
                self._warned_no_cache = True  # once per handle
                warnings.warn("skipprofiler: a forward without a KV cache (use_cache=False) outside generate() looks "
                              "like a prompt, so its FFNs run dense and nothing is skipped; mark generated positions "
                              "with `with handle.decode_from(prompt_len):`", stacklevel=5)
        else:
            end = self._prompt_end if self._prompt_end is not None else past  # cache filled outside our view
        self._prompt_end = end
        return [end] * batch


def forward_plan(rules: list[Rule], first_d: list[int], seq: int, device: torch.device,
                 real: torch.Tensor | None) -> Forward | None:
    """The one place that decides how a forward is planned: no decode position, None (dense); a plain decode step,
    `schedule.decode_step` (host integers only); anything else position by position (`positionwise`, imported on
    first use). `real`: BoolTensor [P] on the device, not padding (None: every position is real)."""
    if all(d + seq <= 0 for d in first_d):
        return None
    forward = decode_step(rules, first_d, seq, device)
    if forward is None:
        from .positionwise import plan_forward

        forward = plan_forward(rules, first_d, seq, device, real)
    return forward


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy tuple cache
        return int(cache[0][0].shape[-2]) if cache and cache[0] is not None else 0
    raise TypeError(f"skipprofiler: cannot read the decode position from a {type(cache).__name__} (it has no "
                    "get_seq_length); use a DynamicCache or StaticCache, or call handle.remove() first")


def _input_length(args: tuple, kwargs: dict) -> int | None:
    """The prompt length of a ``generate`` call: its input ids (or embeddings), previous turns included."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None,
                  kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > 0:
            return int(value.shape[1])
    return None


def _refuse_continuous_batching(*args, **kwargs):
    raise RuntimeError("skipprofiler: continuous batching (generate_batch / init_continuous_batching with its "
                       "PagedAttentionCache) is not supported: its packed forwards carry no decode positions the "
                       "runtime reads, so the plan would run dense. Use generate(), or call handle.remove() first.")


def load_plan(path_or_text: str | Path) -> PlanFile:
    """Load and validate a YAML plan file (path or YAML text); raises PlanError listing every problem."""
    from ..plan import load_plan as _load  # lazy: the plan stage pulls yaml only

    return _load(path_or_text)


def apply_plan(model: nn.Module, plan: PlanFile | SkipPlan | str | Path, prompt_class: str | None = None,
               strict: bool = True, *, host_state: bool | None = None,
               batch_decision: str | None = None) -> SkipHandle:
    """Make `model` skip FFNs as `plan` says; returns a handle (context manager) whose ``remove()`` restores it.

    plan: a PlanFile, a bare SkipPlan (applied as is, no fingerprint check), or a YAML path / text.
    prompt_class: None = the global plan; a class name = that class's plan; "auto" = route each prompt with the
        plan's router (the choice is on ``handle.chosen_classes``).
    strict: a plan fitted for another model is an error; False applies it with a warning.
    host_state: keep adaptive state on the host (default: on CPU models) or on the device (no per-layer sync;
        skipped rows are masked, so ``stats()["rows_not_computed"]`` stays 0 for them).
    batch_decision: how adaptive plans treat the rows of a batch (None: the plan's ``batch_decision``, by default
        per_sequence). "per_sequence": every row follows the FFN-SkipLLM rule on its own. "shared": the rows
        decoding the same step decide together -- their runs start at the first layer where every real row's cos
        passes its threshold, so all rows skip the same FFNs (whole FFN calls saved; use it for small batches on
        CPU, where an FFN over part of a batch costs as much as over all of it: benchmarks/ffn_partial_rows.py).
    Every check runs before any module is touched: on error the model is unchanged.
    """
    if batch_decision is not None and batch_decision not in BATCH_DECISIONS:
        raise ValueError(f"batch_decision must be one of {', '.join(BATCH_DECISIONS)}, got {batch_decision!r}")
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and not existing._removed:
        raise RuntimeError("a skip plan is already applied to this model; call .remove() on its handle first")
    arch = resolve(model)
    if isinstance(plan, PlanFile):
        check_fingerprint(plan, model, strict)
    plans, problems = plans_for(arch, plan, prompt_class)
    decisions = {p.batch_decision for p in plans.values() if p.mode == ADAPTIVE and not p.is_empty()}
    if batch_decision is None and len(decisions) > 1:
        problems.append(f"the selected plans disagree on batch_decision ({', '.join(sorted(decisions))}); "
                        "pass batch_decision= to apply_plan to choose")
    if problems:
        raise PlanError(problems)
    handle = SkipHandle(model, arch, plans, prompt_class)
    try:
        handle._install(plan if isinstance(plan, PlanFile) else None, host_state,
                        batch_decision or (decisions.pop() if decisions else BATCH_DECISIONS[0]))
    except BaseException:
        handle.remove()
        raise
    return handle
