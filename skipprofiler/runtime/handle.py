"""The public handle: `apply_plan` patches a model; `SkipHandle` plans each forward, counts, and restores the model.

Per forward: the pre-hook asks `positions` where decode positions start, `schedule` what each plan does there, and
leaves a `Step`; each patched FFN takes its layer's `Decision` from it; the post-hook adds the step's counts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .._compat import cache_in
from ..plan import (ADAPTIVE, ALL_POSITIONS, BATCH_DECISIONS, LINEAR, MEAN_OUTPUT, NO_COMPENSATION, NORM_RATIO,
                    SHARED, STATIC, PlanError, PlanFile, SkipPlan)
from ..registry import ResolvedArch, resolve
from .checks import check_fingerprint, plans_for
from .patcher import Patcher
from .positions import Positions, cache_length, refuse_continuous_batching
from .schedule import RowPlan, first_decode_index, schedule
from .step import Decision, Step, decide
from .strategies import patch_ffn

_HANDLE_ATTR = "_skipprof_handle"


class SkipHandle:
    """An applied plan. ``remove()`` (or leaving the ``with`` block) restores the model bit-exactly."""

    def __init__(self, model: nn.Module, arch: ResolvedArch, plans: dict[str | None, SkipPlan],
                 plan_file: PlanFile | None, prompt_class: str | None, host_state: bool | None, batch_decision: str):
        self.model, self.arch = model, arch
        self.step: Step | None = None  # the forward in progress (read by the patched modules)
        self._plans, self._plan_file, self._prompt_class = plans, plan_file, prompt_class
        self._host_state = host_state  # None: host state on CPU, device state elsewhere
        self._batch_decision = batch_decision
        self._row_plans = {id(p): RowPlan.of(p, arch.num_layers) for p in plans.values()}
        self._skip_layers = self._plannable_layers()
        self._patcher = Patcher()
        self._router = self._compensation = None
        self._positions = Positions()
        self._pad_offsets: list[int] | None = None
        # decode positions, decided skips, FFN rows not computed, rows a linear substitute was computed for, its FLOPs
        self._totals: list[int | float | torch.Tensor] = [0, 0, 0, 0, 0.0]
        self._removed = False

    # ---- public API ------------------------------------------------------------------------------------------------

    @property
    def plan(self) -> SkipPlan:
        """The active plan: the named class's, the global one, or (auto) the first row's routed class plan."""
        if self._router is None:
            return next(iter(self._plans.values()))  # the only plan
        classes = self._router.row_classes
        return self._plans.get(classes[0] if classes else None, self._plans[None])

    @property
    def chosen_classes(self) -> list[str | None] | None:
        """Per row of the last prompt, the class the router chose (prompt_class='auto'); the named class otherwise."""
        if self._router is not None:
            return None if self._router.row_classes is None else list(self._router.row_classes)
        return None if self._prompt_class is None else [self._prompt_class]

    @property
    def chosen_class(self) -> str | None:
        classes = self.chosen_classes
        return classes[0] if classes else None

    @contextlib.contextmanager
    def decode_from(self, start: int | torch.Tensor | Sequence[int]) -> Iterator[SkipHandle]:
        """For cache-less full-sequence forwards (teacher forcing): positions >= start[b] are decode positions."""
        with self._positions.decode_from(start):
            yield self

    @contextlib.contextmanager
    def verifying(self) -> Iterator[SkipHandle]:
        """For hand-written speculative decoding: multi-token forwards on a non-empty cache are decode positions."""
        with self._positions.verifying():
            yield self

    def stats(self) -> dict[str, Any]:
        """Counts over decode positions after warm-up (real tokens). ``decided_skips``: FFN calls the plan's rule
        skipped; ``rows_not_computed``: FFN rows really not computed (masked rows run the FFN: they count 0);
        ``substitute_rows`` / ``substitute_flops``: rows a linear substitute map was computed for instead, and what
        that cost (every position of a skipped call, padding included: the work done)."""
        positions, decided, saved, substituted = (int(t) for t in self._totals[:4])  # device counts: read once
        calls = positions * self.arch.num_layers
        return {"decode_positions": positions, "num_layers": self.arch.num_layers,
                "decided_skips": decided, "decided_skip_ratio": decided / calls if calls else 0.0,
                "rows_not_computed": saved, "not_computed_ratio": saved / calls if calls else 0.0,
                "substitute_rows": substituted, "substitute_flops": float(self._totals[4])}

    def reset_stats(self) -> None:
        self._totals = [0, 0, 0, 0, 0.0]

    def remove(self) -> None:
        """Undo everything apply_plan did (hooks, instance attributes); idempotent."""
        self._patcher.undo_all()
        self.step = None
        self._removed = True

    def __enter__(self) -> SkipHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        batch = f", batch_decision={self._batch_decision}" if self.plan.mode == ADAPTIVE else ""
        return (f"SkipHandle({state}, {self.arch.model_type}, class={self._prompt_class!r}, "
                f"mode={self.plan.mode}{batch}, layers={sorted(self._skip_layers)})")

    # ---- installation ----------------------------------------------------------------------------------------------

    def _plannable_layers(self) -> set[int]:
        layers: set[int] = set()
        for plan in self._plans.values():
            if plan.is_empty():
                continue
            if plan.mode == STATIC:
                layers |= {int(l) for l in plan.skip_layers}
            else:
                layers |= set(range(plan.cold_start, self.arch.num_layers - plan.cold_end))
        return layers

    def _install(self) -> None:
        patch, model = self._patcher, self.model
        patch.set_attr(model, _HANDLE_ATTR, self)
        # Host-side bookkeeping stays out of compiled graphs (HF's automatic compile wraps ``model.__call__``): traced,
        # the cache length would specialise every graph to one position and recompile per token.
        patch.hook(model.register_forward_pre_hook(torch.compiler.disable(self._before_forward), with_kwargs=True))
        patch.hook(model.register_forward_hook(torch.compiler.disable(self._after_forward)))
        if callable(getattr(model, "generate", None)):
            patch.set_attr(model, "generate", self._positions.wrap_generate(model.generate))
        if callable(getattr(model, "init_continuous_batching", None)):
            patch.set_attr(model, "init_continuous_batching", refuse_continuous_batching)
        triggers = {l for rp in self._row_plans.values() for l in range(rp.trigger_lo, rp.trigger_hi + 1)}
        for site in self.arch.sites:
            if site.index in self._skip_layers or site.index in triggers:
                patch_ffn(site, self, patch, self._describe(site.index))
        if triggers:
            from .adaptive import patch_cos_reading

            for site in self.arch.sites:
                if site.index in triggers:
                    patch_cos_reading(site, self, patch)
        compensations = {p.compensation for p in self._plans.values() if not p.is_empty()} - {NO_COMPENSATION}
        if compensations:
            from .compensation import Compensation

            self._compensation = Compensation(self.arch, self._skip_layers, self, patch, NORM_RATIO in compensations)
        if self._prompt_class == "auto":
            from .routing import PromptRouter

            self._router = PromptRouter(self._plan_file, self.arch, patch)

    def _describe(self, layer: int) -> str:
        if layer not in self._skip_layers:
            return f"skipprof: layer {layer}: dense, adaptive trigger (cos read here)"
        parts = []
        for name, plan in self._plans.items():
            if plan.is_empty():
                continue
            where = "on decode" if plan.apply_to != ALL_POSITIONS else "on all positions"
            if plan.mode == STATIC:
                if layer not in plan.skip_layers:
                    continue
                f = plan.skip_layers[layer]
                what = "static skip" + ("" if f >= 1.0 else f" {f:g} of positions")
            else:
                if not plan.cold_start <= layer < self.arch.num_layers - plan.cold_end:
                    continue
                shared = ", decided per batch" if self._batch_decision == SHARED else ""
                what = f"adaptive skip (tau, runs of {plan.max_skip}{shared})"
            comp = {NORM_RATIO: ", norm_ratio compensation", MEAN_OUTPUT: ", mean output in its place",
                    LINEAR: ", linear substitute"
                    + (f" (rank {plan.linear.rank})" if plan.linear is not None and plan.linear.rank else "")
                    }.get(plan.compensation, "")
            parts.append(f"{what} {where}{comp}" + ("" if name is None else f" [{name}]"))
        return f"skipprof: layer {layer}: " + "; ".join(parts)

    # ---- per forward -----------------------------------------------------------------------------------------------

    def decision(self, layer: int) -> Decision:
        """This forward's decision for one layer's FFN (made once, when the FFN is first called)."""
        step = self.step
        decision = step.decisions.get(layer)
        if decision is None:
            static = step.static[layer] if step.static else None
            decision = (step.adaptive.decide(layer, static, step.device) if step.adaptive is not None
                        else decide(static, step.device))
            step.decisions[layer] = decision
            step.count_saved(decision)
        return decision

    def _before_forward(self, module, args, kwargs):
        if self._router is not None and self._router.prepass:
            return None  # the routing pre-pass runs dense
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        self.step = None
        if ref is None:
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None  # custom 4-D masks: treat every position as real
        batch, seq = ref.shape[0], ref.shape[1]
        past = cache_length(cache_in(kwargs))
        prompt_end = self._positions.prompt_end(batch, seq, past, kwargs.get("use_cache"))
        teacher_forced = self._positions.decode_start is not None
        step = self.step = Step(batch, seq, ref.device)
        if mask is not None and mask.shape[1] >= seq:
            step.real = mask[:, -seq:].reshape(-1).bool()
        if self._router is not None and (teacher_forced or past == 0):
            dense_prompt = not teacher_forced and all(p.apply_to != ALL_POSITIONS for p in self._plans.values())
            self._router.route(module, args, kwargs, mask, batch, seq, past, ref.device,
                               prompt_end if teacher_forced else None, dense_prompt)
        if past == 0 or teacher_forced or self._pad_offsets is None:
            self._pad_offsets = (mask.cumsum(1) == 0).sum(1).tolist() if mask is not None and mask.shape[0] == batch \
                else [0] * batch
        self._plan_step(step, past, prompt_end)
        return None

    def _plan_step(self, step: Step, past: int, prompt_end: list[int]) -> None:
        classes = self._router.row_classes if self._router is not None else None
        if classes is None or len(classes) != step.batch:
            classes = [self._prompt_class if self._router is None else None] * step.batch
        plans = [self._row_plans[id(self._plans.get(c, self._plans.get(None)))] for c in classes]
        sched = schedule(plans, step.seq, first_decode_index(plans, past, prompt_end, self._pad_offsets))
        if sched is None:
            return
        if step.real is None:
            step.counted = sum(sched.counted)
        elif all(sched.counted):  # the usual decode step: no host-to-device copy
            step.counted = step.real_count()
        elif any(sched.counted):
            step.counted = (torch.tensor(sched.counted, device=step.device) & step.real).sum()
        skips = [len(layers) for layers in sched.static]
        if any(skips):
            step.decided = sum(skips) if step.real is None else (torch.tensor(skips, device=step.device) * step.real).sum()
        any_adaptive = any(rp is not None for rp in sched.adaptive)
        if not (any(skips) or any_adaptive):
            return
        step.active = True
        step.static = [sched.static_flags(l) if l in self._skip_layers else None for l in range(self.arch.num_layers)]
        if any_adaptive:
            from .adaptive import adaptive_state

            host = self._host_state if self._host_state is not None else step.device.type == "cpu"
            step.adaptive = adaptive_state(sched.adaptive, self.arch.num_layers, step.device, step.seq,
                                           self._batch_decision == SHARED, step.real, host)
            step.cos_layers = frozenset(step.adaptive.trigger_layers())
        if self._compensation is not None:
            self._compensation.plan_step(step, plans)

    def _after_forward(self, module, args, out):
        step = self.step
        if step is None or (self._router is not None and self._router.prepass):
            return None
        decided = step.decided if step.adaptive is None else step.decided + step.adaptive.decided(step.real)
        # device counts are summed on the device: reading them would cost a host sync per forward on accelerators
        counts = (step.counted, decided, step.not_computed(), step.substituted_rows, step.substitute_flops)
        self._totals = [total + c if isinstance(c, torch.Tensor) or c else total for total, c in zip(self._totals, counts)]
        self.step = None
        return None


def load_plan(path_or_text: str | Path) -> PlanFile:
    """Load and validate a YAML plan file (path or YAML text); raises PlanError listing every problem."""
    from ..planio import load_plan as _load  # lazy: planio pulls yaml only

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
    plans, problems = plans_for(model, arch, plan, prompt_class)
    plan_file = plan if isinstance(plan, PlanFile) else None
    decisions = {p.batch_decision for p in plans.values() if p.mode == ADAPTIVE and not p.is_empty()}
    if batch_decision is None and len(decisions) > 1:
        problems.append(f"the selected plans disagree on batch_decision ({', '.join(sorted(decisions))}); "
                        "pass batch_decision= to apply_plan to choose")
    if problems:
        raise PlanError(problems)
    batch_decision = batch_decision or (decisions.pop() if decisions else BATCH_DECISIONS[0])
    handle = SkipHandle(model, arch, plans, plan_file, prompt_class, host_state, batch_decision)
    try:
        handle._install()
    except BaseException:
        handle.remove()
        raise
    return handle
