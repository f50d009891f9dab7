"""Runtime: apply a skip plan to a loaded model so that planned FFN blocks really do no work at decode time.

Deployment code imports only this module (torch, yaml via planio, and the standard library)::

    handle = skipprofiler.apply_plan(model, "plans/demo-static-25.yaml")
    model.generate(...)          # prompt dense, generated tokens skip as planned
    handle.remove()              # bit-exact restore

How it works (rule semantics: the docstring of `skipprofiler.plan`):

* Each planned FFN gets an instance ``forward`` (state-dict keys unchanged, picked up by ``torch.compile`` when applied
  before compiling) and an instance ``extra_repr`` so ``print(model)`` shows the plan. A skipped FFN is not called: it
  returns a fresh zeros tensor (Bloom: the residual; OPT: fc1 returns an empty-width tensor and fc2 zeros). When only
  some positions of a forward skip, the FFN runs on the kept positions only (gather -> ffn on ``[1, K, H]`` ->
  scatter), except for adaptive plans on accelerators, where skipped rows are masked instead (no host sync).
* A forward pre-hook on the top-level model classifies every forward: an empty or absent cache is a prompt forward
  (dense unless ``apply_to: all``), later forwards carry decode positions d = position - prompt length, per row.
  Static decisions depend only on these host-known indices, so they cost no device synchronisation.
* Adaptive plans evaluate FFN-SkipLLM per position: after each dense layer in the trigger range,
  cos(h, h + contribution) with ``h = stream_out - contribution`` (the registry's decomposition). On CPU the state
  lives on the host (reading a CPU tensor is free); elsewhere it stays on the device as tensors. With
  ``batch_decision="shared"`` the rows of a batch fire together (column by column), so whole FFN calls are saved.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ._compat import cache_in, without_cache
from .plan import BATCH_DECISIONS, PlanError, PlanFile, SkipPlan
from .registry import (POST_NORM_OUTPUT, RESIDUAL_INSIDE, FFNSite, ResolvedArch, UnsupportedArchitecture,
                       first_tensor, model_fingerprint, resolve)

__all__ = ["apply_plan", "load_plan", "SkipHandle", "PlanError", "UnsupportedArchitecture"]

# Pre-FFN norms, by attribute name on the decoder layer: their input is h, needed by `compensation: norm_ratio`.
_PRE_FFN_NORMS = ("post_attention_layernorm", "ln_2", "final_layer_norm")
# Residual forms where a skipped FFN can return `(gain - 1) * h` as its contribution.
_COMPENSABLE_FORMS = ("sequential", RESIDUAL_INSIDE)
_HANDLE_ATTR = "_skipprof_handle"
_ALL = "skip-all"  # layer decision: every position of this forward skips


def load_plan(path_or_text: str | Path) -> PlanFile:
    """Load and validate a YAML plan file (path or YAML text); raises PlanError listing every problem."""
    from .planio import load_plan as _load  # lazy: planio pulls yaml only

    return _load(path_or_text)


# --------------------------------------------------------------------------------------------------------------------
# Validation (everything is checked before any module is touched)


def _check_fingerprint(plan_file: PlanFile, model: nn.Module, strict: bool) -> None:
    expected = (plan_file.model or {}).get("fingerprint") or {}
    if not expected:
        return
    actual = model_fingerprint(model)
    diffs = [f"{k}: plan {v!r} vs model {actual.get(k)!r}" for k, v in sorted(expected.items())
             if k in actual and actual[k] != v]
    if not diffs:
        return
    name = (plan_file.model or {}).get("name", "?")
    message = f"plan was fitted for another model ({name}): {'; '.join(diffs)}"
    if strict:
        raise PlanError(message + " (pass strict=False to apply it anyway)")
    warnings.warn(message + " -- applying anyway because strict=False", stacklevel=3)


def _plan_problems(plan: SkipPlan, label: str, arch: ResolvedArch) -> list[str]:
    L = arch.num_layers
    problems = []
    if plan.mode not in ("static", "adaptive"):
        problems.append(f"{label}: unknown mode {plan.mode!r} (expected static or adaptive)")
    if plan.apply_to not in ("decode", "all"):
        problems.append(f"{label}: unknown apply_to {plan.apply_to!r} (expected decode or all)")
    if plan.warmup_tokens < 0 or plan.dense_every < 0:
        problems.append(f"{label}: warmup_tokens and dense_every must be >= 0")
    if plan.mode == "static":
        bad = sorted(l for l in plan.skip_layers if not 0 <= int(l) < L)
        if bad:
            problems.append(f"{label}: skip_layers names layers {bad} but the model has {L} layers (0..{L - 1})")
        bad_f = sorted(l for l, f in plan.skip_layers.items() if not 0.0 < f <= 1.0)
        if bad_f:
            problems.append(f"{label}: skip fractions must be in (0, 1] (layers {bad_f})")
    if plan.mode == "adaptive" and not plan.is_empty():
        if plan.tau is None or len(plan.tau) != L:
            n = None if plan.tau is None else len(plan.tau)
            problems.append(f"{label}: adaptive plan needs one tau per layer ({L}), got {n}")
        if plan.cold_start < 0 or plan.cold_end < 0 or plan.cold_start + plan.cold_end > L:
            problems.append(f"{label}: cold_start {plan.cold_start} + cold_end {plan.cold_end} do not fit {L} layers")
        if plan.max_skip < 0:
            problems.append(f"{label}: max_skip must be >= 0")
    if plan.compensation == "norm_ratio" and not plan.is_empty():
        if plan.norm_gain is None or len(plan.norm_gain) != L:
            n = None if plan.norm_gain is None else len(plan.norm_gain)
            problems.append(f"{label}: compensation norm_ratio needs norm_gain for each of the {L} layers, got {n}")
        form = arch.residual_form
        if form not in _COMPENSABLE_FORMS:
            problems.append(f"{label}: compensation norm_ratio is not supported for {arch.model_type} "
                            f"(residual form {form!r}; supported: {', '.join(_COMPENSABLE_FORMS)}); "
                            "use compensation: none")
        elif form == "sequential" and any(_pre_ffn_norm(s) is None for s in arch.sites):
            problems.append(f"{label}: compensation norm_ratio needs the pre-FFN norm ({', '.join(_PRE_FFN_NORMS)}) "
                            f"but {arch.model_type} layers have none of these")
    elif plan.compensation == "mean_output" and not plan.is_empty():
        skippable = (sorted(plan.skip_layers) if plan.mode == "static"
                     else list(range(plan.cold_start, L - plan.cold_end)))
        means = plan.ffn_mean or {}
        missing = [l for l in skippable if l not in means]
        if missing:
            problems.append(f"{label}: compensation mean_output needs ffn_mean for every layer it may skip; "
                            f"missing {missing}")
        if any(site.contribution == RESIDUAL_INSIDE for site in arch.sites):
            problems.append(f"{label}: compensation mean_output is not supported for {arch.model_type} (its FFN "
                            "adds the residual itself); use compensation: none")
    elif plan.compensation not in ("none", "norm_ratio", "mean_output"):
        problems.append(f"{label}: unknown compensation {plan.compensation!r} (expected none, norm_ratio or "
                        "mean_output)")
    return problems


def _select_plans(plan_file: PlanFile, prompt_class: str | None, arch: ResolvedArch,
                  hidden_size: int | None) -> tuple[dict[str | None, SkipPlan], list[str]]:
    """The plans this application may use, keyed by class (None = global), and every problem found."""
    problems: list[str] = []
    if prompt_class is None:
        plans = {None: plan_file.global_plan}
    elif prompt_class == "auto":
        router = plan_file.router
        if router is None:
            known = ", ".join(sorted(plan_file.classes)) or "none"
            raise PlanError(f"prompt_class='auto' needs a plan with a router, and this plan has none; "
                            f"pass one of its classes ({known}) or None for the global plan")
        plans = {None: plan_file.global_plan}
        for name in router.classes:
            if name not in plan_file.classes:
                problems.append(f"router class {name!r} has no class plan (plan classes: "
                                f"{', '.join(sorted(plan_file.classes)) or 'none'})")
            else:
                plans[name] = plan_file.classes[name]
        if not 0 <= router.layer < arch.num_layers:
            problems.append(f"router.layer {router.layer} is outside the model's {arch.num_layers} layers")
        if len(router.centroids) != len(router.classes):
            problems.append(f"router has {len(router.classes)} classes but {len(router.centroids)} centroids")
        dims = {len(c) for c in router.centroids}
        if hidden_size is not None and dims and dims != {hidden_size}:
            problems.append(f"router centroids have dimension {sorted(dims)}, the model's hidden size is {hidden_size}")
    else:
        plans = {prompt_class: plan_file.select(prompt_class)}  # raises PlanError listing the plan's classes
    for name, plan in plans.items():
        problems += _plan_problems(plan, "global plan" if name is None else f"class {name!r}", arch)
    return plans, problems


def _pre_ffn_norm(site: FFNSite) -> nn.Module | None:
    for name in _PRE_FFN_NORMS:
        module = getattr(site.layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)


# --------------------------------------------------------------------------------------------------------------------
# Per-forward decisions


@dataclass
class _Mixed:
    """Some positions of this forward skip the layer's FFN: run it on `kept` only (or mask `skip` on accelerators)."""

    kept: torch.Tensor | None  # LongTensor [K] of flattened positions that run the FFN (None: masked compute)
    skip: torch.Tensor  # BoolTensor [P]


@dataclass
class _RowPlan:
    """A plan's per-forward constants, precomputed once per distinct plan."""

    plan: SkipPlan
    index: int
    trigger_lo: int = 0  # adaptive: first layer whose cos may trigger a run
    trigger_hi: int = -1  # adaptive: last such layer
    end: int = 0  # adaptive: L - cold_end (runs are cut here)


class _HostAdaptive:
    """FFN-SkipLLM state per flattened position, kept in Python (CPU models: reading a CPU tensor costs nothing).

    shared: the rows of a batch decide together, column by column (positions ``b * seq + s`` with the same ``s``):
    a column's open positions start their runs at the first layer where every real one among them passes its own
    threshold (see `apply_plan`'s ``batch_decision``).
    """

    def __init__(self, row_plans: list[_RowPlan | None], seq: int = 1, shared: bool = False,
                 real: list[bool] | None = None):
        self.row_plans = row_plans  # per position: its adaptive plan, or None (not eligible / not adaptive)
        n = len(row_plans)
        self.remaining = [0] * n
        self.used = [rp is None for rp in row_plans]
        self.run_len = [0] * n
        self.open = sum(1 for u in self.used if not u)  # positions that may still trigger
        self.seq, self.shared, self.real = seq, shared, real

    def skip_now(self) -> list[bool] | None:
        if not any(self.remaining):
            return None
        skips = [r > 0 for r in self.remaining]
        self.remaining = [r - 1 if r > 0 else 0 for r in self.remaining]
        return skips

    def may_trigger(self) -> bool:
        return self.open > 0

    def trigger_layers(self) -> set[int]:
        return {l for rp in {id(r): r for r in self.row_plans if r is not None}.values()
                for l in range(rp.trigger_lo, rp.trigger_hi + 1)}

    def update(self, layer: int, cos: torch.Tensor) -> None:
        values = cos.tolist()
        candidates = [p for p, rp in enumerate(self.row_plans)
                      if rp is not None and not self.used[p] and rp.trigger_lo <= layer <= rp.trigger_hi]
        if not self.shared:
            fired = [p for p in candidates if values[p] > self.row_plans[p].plan.tau[layer]]
        else:
            columns: dict[int, list[int]] = {}
            for p in candidates:
                columns.setdefault(p % self.seq, []).append(p)
            fired = []
            for members in columns.values():
                voters = [p for p in members if self.real is None or self.real[p]]  # padding follows, never votes
                if voters and all(values[p] > self.row_plans[p].plan.tau[layer] for p in voters):
                    fired += members
        for p in fired:
            rp = self.row_plans[p]
            length = min(rp.plan.max_skip, rp.end - (layer + 1))
            self.remaining[p], self.run_len[p], self.used[p] = length, length, True
            self.open -= 1

    def skipped_per_position(self) -> list[int]:
        return self.run_len


class _DeviceAdaptive:
    """The same state as device tensors: no host synchronisation per layer (accelerators)."""

    def __init__(self, row_plans: list[_RowPlan | None], num_layers: int, device: torch.device, seq: int = 1,
                 shared: bool = False, real: torch.Tensor | None = None):
        n = len(row_plans)
        self.seq, self.shared = seq, shared
        self.real = real if real is not None else torch.ones(n, dtype=torch.bool, device=device)
        tau = [[math.inf] * n for _ in range(num_layers)]
        run = [[0] * n for _ in range(num_layers)]
        self.trigger_layers_set: set[int] = set()
        for p, rp in enumerate(row_plans):
            if rp is None:
                continue
            for layer in range(rp.trigger_lo, rp.trigger_hi + 1):
                tau[layer][p] = rp.plan.tau[layer]
                run[layer][p] = min(rp.plan.max_skip, rp.end - (layer + 1))
                self.trigger_layers_set.add(layer)
        self.first_skip_layer = min(self.trigger_layers_set, default=num_layers) + 1
        self.tau = torch.tensor(tau, dtype=torch.float32).to(device, non_blocking=True)
        self.can_trigger = torch.isfinite(self.tau)  # [layer, position]: in that position's trigger range
        self.run = torch.tensor(run, dtype=torch.long).to(device, non_blocking=True)
        self.remaining = torch.zeros(n, dtype=torch.long, device=device)
        self.used = torch.zeros(n, dtype=torch.bool, device=device)
        self.run_len = torch.zeros(n, dtype=torch.long, device=device)

    def skip_mask(self, layer: int) -> torch.Tensor | None:
        if layer < self.first_skip_layer:
            return None
        skip = self.remaining > 0
        self.remaining = self.remaining - skip.long()
        return skip

    def may_trigger(self) -> bool:
        return True  # deciding would need a host sync

    def trigger_layers(self) -> set[int]:
        return self.trigger_layers_set

    def update(self, layer: int, cos: torch.Tensor) -> None:
        tau = self.tau[layer]
        passed = cos > tau
        if self.shared:  # a column fires when every open real position in it passes (as _HostAdaptive)
            open_ = ~self.used & self.can_trigger[layer]
            voters = open_ & self.real
            columns = (passed | ~voters).view(-1, self.seq).all(0) & voters.view(-1, self.seq).any(0)
            trigger = open_ & columns.repeat(len(cos) // self.seq)
        else:
            trigger = passed & ~self.used
        length = torch.where(trigger, self.run[layer], 0)
        self.remaining = torch.where(trigger, length, self.remaining)
        self.run_len = self.run_len + length
        self.used = self.used | trigger


@dataclass
class _Step:
    """Everything the wrappers need for one forward of the top-level model."""

    batch: int
    seq: int
    device: torch.device
    active: bool = False  # any position may skip in this forward
    static: list[list[bool] | None] = field(default_factory=list)  # per layer: per-position skip flags, None = none
    adaptive: _HostAdaptive | _DeviceAdaptive | None = None
    gain_scale: list[Any] = field(default_factory=list)  # per layer: None | float | Tensor [P, 1] ((gain-1)/mult)
    mean_fill: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H] or [P, H] (mean_output)
    decisions: dict[int, Any] = field(default_factory=dict)  # layer -> None | _ALL | _Mixed (computed once)
    contribution: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [P, H] (adaptive cos)
    ffn_input_stream: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> h [P, H] (compensation)
    counted: int | torch.Tensor = 0  # decode positions after warm-up (real tokens)
    static_skipped: int | torch.Tensor = 0
    real: torch.Tensor | None = None  # BoolTensor [P] on device, None = all real
    cos_layers: frozenset[int] = frozenset()  # adaptive: layers whose cos may trigger a run in this forward
    routing: bool = False  # dense pre-pass that only captures the router layer's output
    route_here: bool = False  # the router hook should route rows during this (dense prompt) forward
    prompt_weights: torch.Tensor | None = None  # [B, S] 1.0 for real prompt tokens (routing)

    def wants_contribution(self, layer: int) -> bool:
        return layer in self.cos_layers and self.adaptive is not None and self.adaptive.may_trigger()

    @property
    def positions(self) -> int:
        return self.batch * self.seq


class _RoutingDone(Exception):
    """Raised by the router hook to stop a routing pre-pass once the router layer has run."""


# --------------------------------------------------------------------------------------------------------------------
# The handle


class SkipHandle:
    """An applied plan. ``remove()`` (or leaving the ``with`` block) restores the model bit-exactly."""

    def __init__(self, model: nn.Module, arch: ResolvedArch, plans: dict[str | None, SkipPlan],
                 plan_file: PlanFile | None, prompt_class: str | None, host_state: bool | None = None,
                 batch_decision: str = "per_sequence"):
        self.model = model
        self.arch = arch
        self._plans = plans
        self._plan_file = plan_file
        self._prompt_class = prompt_class
        self._host_state = host_state  # None: host state on CPU, device state elsewhere
        self._batch_decision = batch_decision  # adaptive plans: "per_sequence" or "shared" (see apply_plan)
        self._row_plans: dict[int, _RowPlan] = {}
        for name, plan in plans.items():
            self._row_plans[id(plan)] = self._row_plan(plan, len(self._row_plans))
        self._restore: list[Callable[[], None]] = []
        self._step: _Step | None = None
        self._prompt_width: int | None = None
        self._pad_offsets: list[int] | None = None
        self._row_classes: list[str | None] | None = None
        self._decode_start: list[int] | None = None
        self._stats_host = [0, 0]  # decode positions, skipped FFN calls
        self._stats_device: list[torch.Tensor] = []
        self._skip_layers = self._plannable_layers()
        self._static_cache: dict[tuple[int, int], tuple[int, ...]] = {}
        self._mean_tensors: dict[tuple[int, int, str], torch.Tensor] = {}
        self._warned_no_cache = False
        self._removed = False

    # ---- public API ------------------------------------------------------------------------------------------------

    @property
    def plan(self) -> SkipPlan:
        """The active plan: the named class's, the global one, or (auto) the first row's routed class plan."""
        if self._prompt_class not in (None, "auto"):
            return self._plans[self._prompt_class]
        if self._prompt_class == "auto" and self._row_classes:
            return self._plans.get(self._row_classes[0], self._plans[None])
        return self._plans[None]

    @property
    def chosen_classes(self) -> list[str] | None:
        """Per row of the last prompt, the class the router chose (prompt_class='auto'); the named class otherwise."""
        if self._prompt_class == "auto":
            return None if self._row_classes is None else list(self._row_classes)
        return None if self._prompt_class is None else [self._prompt_class]

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

    def stats(self) -> dict[str, Any]:
        positions, skipped = self._stats_host
        if self._stats_device:
            totals = torch.stack([t.to("cpu") for t in self._stats_device]).sum(0).tolist()
            positions, skipped = positions + int(totals[0]), skipped + int(totals[1])
        L = self.arch.num_layers
        ratio = skipped / (positions * L) if positions else 0.0
        return {"decode_positions": positions, "skipped": skipped, "num_layers": L, "skip_ratio": ratio}

    def reset_stats(self) -> None:
        self._stats_host = [0, 0]
        self._stats_device = []

    def remove(self) -> None:
        """Undo everything apply_plan did (hooks, instance attributes); idempotent."""
        if self._removed:
            return
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        self._step = None
        self._removed = True

    def __enter__(self) -> SkipHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        batch = f", batch_decision={self._batch_decision}" if self.plan.mode == "adaptive" else ""
        return (f"SkipHandle({state}, {self.arch.model_type}, class={self._prompt_class!r}, "
                f"mode={self.plan.mode}{batch}, layers={sorted(self._skip_layers)})")

    # ---- installation ----------------------------------------------------------------------------------------------

    def _row_plan(self, plan: SkipPlan, index: int) -> _RowPlan:
        L = self.arch.num_layers
        rp = _RowPlan(plan, index)
        if plan.mode == "adaptive" and not plan.is_empty():
            rp.end = L - plan.cold_end
            rp.trigger_lo = max(plan.cold_start - 1, 0)
            rp.trigger_hi = rp.end - 2  # the run starts at layer + 1 < end
        return rp

    def _plannable_layers(self) -> set[int]:
        layers: set[int] = set()
        for plan in self._plans.values():
            if plan.is_empty():
                continue
            if plan.mode == "static":
                layers |= {int(l) for l in plan.skip_layers}
            else:
                layers |= set(range(plan.cold_start, self.arch.num_layers - plan.cold_end))
        return layers

    def _trigger_layers(self) -> set[int]:
        layers: set[int] = set()
        for rp in self._row_plans.values():
            layers |= set(range(rp.trigger_lo, rp.trigger_hi + 1))
        return layers

    def _install(self) -> None:
        model = self.model
        self._set_attr(model, _HANDLE_ATTR, self)
        self._add(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._add(model.register_forward_hook(self._after_forward))
        compensate = any(p.compensation == "norm_ratio" and not p.is_empty() for p in self._plans.values())
        triggers = self._trigger_layers()
        for site in self.arch.sites:
            l = site.index
            if l not in self._skip_layers and l not in triggers:
                continue
            if site.ffn is not None:
                self._wrap_module_ffn(site)
            else:
                self._wrap_fc_pair(site)
            if compensate and l in self._skip_layers and site.contribution != RESIDUAL_INSIDE:
                norm = _pre_ffn_norm(site)
                self._add(norm.register_forward_pre_hook(self._capture_stream(l)))
        for site in self.arch.sites:
            if site.index in triggers:
                if site.contribution == POST_NORM_OUTPUT:
                    self._add(site.post_norm.register_forward_hook(self._capture_post_norm(site.index)))
                self._add(site.layer.register_forward_hook(self._layer_done(site)))
        if self._prompt_class == "auto":
            router_layer = self.arch.sites[self._plan_file.router.layer].layer
            self._add(router_layer.register_forward_hook(self._route))

    def _add(self, hook_handle) -> None:
        self._restore.append(hook_handle.remove)

    def _set_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)

        def undo() -> None:
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)

        object.__setattr__(obj, name, value)
        self._restore.append(undo)

    def _describe(self, layer: int) -> str:
        if layer not in self._skip_layers:
            return f"skipprof: layer {layer}: dense, adaptive trigger (cos read here)"
        parts = []
        for name, plan in self._plans.items():
            if plan.is_empty():
                continue
            where = "on decode" if plan.apply_to == "decode" else "on all positions"
            if plan.mode == "static":
                if layer not in plan.skip_layers:
                    continue
                f = plan.skip_layers[layer]
                what = "static skip" + ("" if f >= 1.0 else f" {f:g} of positions")
            else:
                if not plan.cold_start <= layer < self.arch.num_layers - plan.cold_end:
                    continue
                shared = ", decided per batch" if self._batch_decision == "shared" else ""
                what = f"adaptive skip (tau, runs of {plan.max_skip}{shared})"
            comp = ", norm_ratio compensation" if plan.compensation == "norm_ratio" else ""
            label = "" if name is None else f" [{name}]"
            parts.append(f"{what} {where}{comp}{label}")
        return f"skipprof: layer {layer}: " + "; ".join(parts)

    def _wrap_module_ffn(self, site: FFNSite) -> None:
        ffn, layer = site.ffn, site.index
        original = ffn.forward  # the bound class method (or an earlier instance forward, e.g. accelerate's)
        bloom = site.contribution == RESIDUAL_INSIDE
        record_here = site.contribution != POST_NORM_OUTPUT  # post-norm sites record in the post-norm hook

        def forward(x, *args, **kwargs):
            step = self._step
            decision = self._decision(layer) if step is not None and step.active else None
            if decision is None:
                out = original(x, *args, **kwargs)
                if step is not None and step.cos_layers and record_here and step.wants_contribution(layer):
                    step.contribution[layer] = self._contribution_of(site, out, args, kwargs)
                return out
            if bloom:
                residual = args[0] if args else kwargs["residual"]
                return self._skip_bloom(site, decision, x, residual, original)
            return self._skip_ffn(site, decision, x, args, kwargs, original)

        self._set_attr(ffn, "forward", forward)
        self._set_extra_repr(ffn, self._describe(layer))

    def _wrap_fc_pair(self, site: FFNSite) -> None:
        """OPT: fc1 -> activation -> fc2 inline on [B*S, H]. fc1 drops skipped rows, fc2 scatters them back."""
        fc1, fc2, layer = site.fc1, site.fc2, site.index
        fc1_forward, fc2_forward = fc1.forward, fc2.forward
        pending: dict[str, Any] = {}

        def fc1_wrapped(x):
            step = self._step
            decision = self._decision(layer) if step is not None and step.active else None
            pending["decision"] = decision
            if decision is None:
                return fc1_forward(x)
            pending["rows"] = x.shape[0]
            _check_rows(x.shape[0], step, layer)
            if decision is _ALL:
                return x.new_empty((x.shape[0], 0))
            if decision.kept is None:  # masked compute
                return fc1_forward(x)
            return fc1_forward(x.index_select(0, decision.kept))

        def fc2_wrapped(a):
            step = self._step
            decision = pending.pop("decision", None)
            if decision is None:
                out = fc2_forward(a)
                if step is not None and step.cos_layers and step.wants_contribution(layer):
                    step.contribution[layer] = out.reshape(-1, out.shape[-1])
                return out
            rows = pending.pop("rows")
            filler = self._filler(site, step, rows, fc2.out_features, a.dtype, a.device)
            if decision is _ALL:
                return filler
            y = fc2_forward(a)
            if decision.kept is None:
                out = torch.where(decision.skip[:, None], filler, y)
            else:
                out = filler.index_copy_(0, decision.kept, y.to(filler.dtype))
            if step.wants_contribution(layer):
                step.contribution[layer] = out
            return out

        self._set_attr(fc1, "forward", fc1_wrapped)
        self._set_attr(fc2, "forward", fc2_wrapped)
        self._set_extra_repr(fc1, self._describe(layer) + " (fc1 of the FFN pair)")
        self._set_extra_repr(fc2, self._describe(layer) + " (fc2 of the FFN pair)")

    def _set_extra_repr(self, module: nn.Module, text: str) -> None:
        base = type(module).extra_repr(module)

        def extra_repr() -> str:
            return f"{base}, {text}" if base else text

        self._set_attr(module, "extra_repr", extra_repr)

    # ---- skipping --------------------------------------------------------------------------------------------------

    def _filler(self, site: FFNSite, step: _Step, rows: int, hidden: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A fresh [rows, H] tensor holding what skipped positions contribute (zeros, (gain - 1) * h / mult, or the
        calibrated mean FFN output)."""
        mean = step.mean_fill.get(site.index)
        if mean is not None:
            return mean.to(dtype).expand(rows, hidden).clone()
        scale = step.gain_scale[site.index] if step.gain_scale else None
        h = step.ffn_input_stream.get(site.index)
        if scale is None or h is None:
            return torch.zeros((rows, hidden), dtype=dtype, device=device)
        return (h.reshape(rows, -1) * scale).to(dtype)

    def _skip_ffn(self, site: FFNSite, decision: Any, x: torch.Tensor, args, kwargs, original) -> torch.Tensor:
        step = self._step
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _check_rows(flat.shape[0], step, site.index)
        filler = self._filler(site, step, flat.shape[0], flat.shape[-1], flat.dtype, flat.device)
        if decision is _ALL:
            out = filler
        elif decision.kept is None:  # masked compute: accelerators (no host sync) and small CPU batches
            y = first_tensor(original(x, *args, **kwargs)).reshape(flat.shape[0], -1)
            out = torch.where(decision.skip[:, None], filler, y)
        else:
            y = first_tensor(original(flat.index_select(0, decision.kept).unsqueeze(0), *args, **kwargs))
            out = filler.index_copy_(0, decision.kept, y.reshape(-1, filler.shape[-1]).to(filler.dtype))
        if site.contribution != POST_NORM_OUTPUT and step.wants_contribution(site.index):
            c = out * site.multiplier if site.multiplier != 1.0 else out
            step.contribution[site.index] = c.clone() if site.ffn_output_mutated and c is out else c
        return out.view(*shape[:-1], out.shape[-1])

    def _skip_bloom(self, site: FFNSite, decision: Any, x, residual, original) -> torch.Tensor:
        step = self._step
        scale = step.gain_scale[site.index] if step.gain_scale else None
        res_flat = residual.reshape(-1, residual.shape[-1])
        _check_rows(res_flat.shape[0], step, site.index)
        kept_value = res_flat * (scale + 1.0) if scale is not None else res_flat.clone()
        if decision is _ALL:
            out = kept_value
        elif decision.kept is None:
            y = original(x, residual).reshape(res_flat.shape)
            out = torch.where(decision.skip[:, None], kept_value, y)
        else:
            x_flat = x.reshape(-1, x.shape[-1])
            y = original(x_flat.index_select(0, decision.kept).unsqueeze(0),
                         res_flat.index_select(0, decision.kept).unsqueeze(0))
            out = kept_value.index_copy_(0, decision.kept, y.reshape(-1, res_flat.shape[-1]))
        if step.wants_contribution(site.index):
            step.contribution[site.index] = out - res_flat
        return out.view(residual.shape)

    @staticmethod
    def _contribution_of(site: FFNSite, out, args, kwargs) -> torch.Tensor:
        if site.contribution == RESIDUAL_INSIDE:
            residual = args[0] if args else kwargs["residual"]
            return (out - residual).reshape(-1, out.shape[-1])
        out = first_tensor(out)
        c = out.reshape(-1, out.shape[-1])
        if site.multiplier != 1.0:
            return c * site.multiplier
        return c.clone() if site.ffn_output_mutated else c  # Falcon adds attention into the returned tensor in place

    def _decision(self, layer: int) -> Any:
        step = self._step
        if layer in step.decisions:
            return step.decisions[layer]
        static = step.static[layer] if step.static else None
        adaptive = step.adaptive
        decision: Any = None
        if isinstance(adaptive, _DeviceAdaptive):
            skip = adaptive.skip_mask(layer)
            if static is not None:
                static_mask = torch.tensor(static, device=step.device)
                skip = static_mask if skip is None else skip | static_mask
            decision = None if skip is None else _Mixed(None, skip)
        else:
            flags = adaptive.skip_now() if adaptive is not None else None
            if static is not None:
                flags = static if flags is None else [a or b for a, b in zip(flags, static)]
            decision = _decision_from_flags(flags, step.device)
        step.decisions[layer] = decision
        return decision

    # ---- hooks -----------------------------------------------------------------------------------------------------

    def _capture_stream(self, layer: int):
        def hook(module, args):
            step = self._step
            if step is not None and step.active:
                h = args[0]
                step.ffn_input_stream[layer] = h.reshape(-1, h.shape[-1])

        return hook

    def _capture_post_norm(self, layer: int):
        def hook(module, args, out):
            step = self._step
            if step is not None and step.cos_layers and step.wants_contribution(layer):
                step.contribution[layer] = out.reshape(-1, out.shape[-1])

        return hook

    def _layer_done(self, site: FFNSite):
        layer = site.index

        def hook(module, args, out):
            step = self._step
            if step is None or not step.contribution:
                return None
            c = step.contribution.pop(layer, None)
            if c is None:
                return None
            stream_out = first_tensor(out)
            stream_out = stream_out.reshape(-1, stream_out.shape[-1]).float()
            h = stream_out - c.float()
            cos = torch.nn.functional.cosine_similarity(h, stream_out, dim=-1)
            step.adaptive.update(layer, cos)
            return None

        return hook

    def _route(self, module, args, out):
        step = self._step
        if step is None or not (step.routing or step.route_here):
            return None
        hidden = first_tensor(out).float()
        weights = step.prompt_weights  # [B, S] float, 1 for real prompt tokens
        pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
        router = self._plan_file.router
        centroids = torch.tensor(router.centroids, dtype=torch.float32, device=pooled.device)
        sims = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(centroids, dim=-1).T
        best = sims.argmax(-1).tolist()
        has_prompt = (weights.sum(1) > 0).tolist()
        self._row_classes = [router.classes[i] if ok else None for i, ok in zip(best, has_prompt)]
        step.route_here = False
        if step.routing:
            raise _RoutingDone()
        return None

    def _before_forward(self, module, args, kwargs):
        step = self._step
        if step is not None and step.routing:
            return None  # inside the routing pre-pass: stay dense
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            self._step = None
            return None
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            mask = None  # custom 4-D masks: treat every position as real
        batch, seq = ref.shape[0], ref.shape[1]
        past = _cache_length(cache_in(kwargs))
        if kwargs.get("use_cache") is False and past == 0 and self._decode_start is None and not self._warned_no_cache:
            self._warned_no_cache = True  # once per handle: generate(use_cache=False) calls this every token
            warnings.warn("skipprofiler: a forward without a KV cache (use_cache=False) looks like a prompt, so its "
                          "FFNs run dense and nothing is skipped; generate with the cache, or mark generated "
                          "positions with `with handle.decode_from(prompt_len):`", stacklevel=3)
        step = _Step(batch, seq, ref.device)
        self._step = step
        if self._decode_start is None and past == 0:
            self._prompt_width = seq
            self._pad_offsets = None
            if self._prompt_class == "auto":
                self._row_classes = None
        if self._prompt_width is None:  # the cache was filled outside our view: treat it as the prompt
            self._prompt_width = past
        if self._prompt_class == "auto":
            self._prepare_routing(module, step, args, kwargs, mask, past)
        self._plan_step(step, mask, past)
        return None

    def _prepare_routing(self, module, step: _Step, args, kwargs, mask, past: int) -> None:
        """Route rows by their prompt: in this same pass when the prompt is dense, else by an early-exit pre-pass."""
        prompt_forward = self._decode_start is None and past == 0
        if not prompt_forward and self._decode_start is None:
            return  # decode forward: classes were chosen at the prompt
        weights = _real_weights(mask, step.batch, step.seq, step.device)
        if self._decode_start is not None:
            cols = torch.arange(step.seq, device=step.device) + past
            starts = torch.tensor(_per_row(self._decode_start, step.batch), device=step.device)
            weights = weights * (cols[None, :] < starts[:, None])
        step.prompt_weights = weights
        if prompt_forward and all(p.apply_to == "decode" for p in self._plans.values()):
            step.route_here = True  # the prompt runs dense: capture the router output on the way
            return
        step.routing = True
        try:
            routed_kwargs = without_cache(kwargs)
            with torch.no_grad():
                module(*args, **routed_kwargs)
        except _RoutingDone:
            pass
        finally:
            step.routing = False
            self._step = step

    def _after_forward(self, module, args, out):
        step = self._step
        if step is None or step.routing:
            return None
        counted, skipped = step.counted, step.static_skipped
        if step.adaptive is not None:
            skipped = skipped + self._adaptive_skipped(step)
        if isinstance(counted, torch.Tensor) or isinstance(skipped, torch.Tensor):
            # accumulate on the device: reading the counts would cost a host sync per forward on accelerators
            self._stats_device.append(torch.stack([torch.as_tensor(counted, device=step.device).long(),
                                                   torch.as_tensor(skipped, device=step.device).long()]))
            if len(self._stats_device) > 64:
                self._stats_device = [torch.stack(self._stats_device).sum(0)]
        else:
            self._stats_host[0] += counted
            self._stats_host[1] += skipped
        self._step = None
        return None

    def _adaptive_skipped(self, step: _Step) -> int | torch.Tensor:
        adaptive = step.adaptive
        if isinstance(adaptive, _HostAdaptive):
            per_position = adaptive.skipped_per_position()
            if step.real is None:
                return sum(per_position)
            return (torch.tensor(per_position, device=step.device) * step.real).sum()
        per_position = adaptive.run_len
        return (per_position * step.real).sum() if step.real is not None else per_position.sum()

    # ---- planning one forward --------------------------------------------------------------------------------------

    def _plan_step(self, step: _Step, mask: torch.Tensor | None, past: int) -> None:
        """Decode index and plan per position; static skip flags per layer; adaptive state; stats."""
        batch, seq = step.batch, step.seq
        plans = self._row_plan_list(batch)
        needs_offsets = any(rp.plan.apply_to == "all" for rp in plans)
        if mask is not None:
            new_cols = mask[:, -seq:] if mask.shape[1] >= seq else None
            step.real = None if new_cols is None else new_cols.reshape(-1).bool()
        if needs_offsets and (self._pad_offsets is None or self._decode_start is not None or past == 0):
            self._pad_offsets = _leading_pads(mask, batch) if mask is not None else [0] * batch
        starts = _per_row(self._decode_start, batch) if self._decode_start is not None else None
        # d per row for the first new position (d grows by one along the sequence)
        first_d: list[int | None] = []
        for b, rp in enumerate(plans):
            if rp.plan.apply_to == "all":
                first_d.append(past - self._pad_offsets[b])
            elif starts is not None:
                first_d.append(past - starts[b])
            elif past == 0:
                first_d.append(None)  # prompt forward: no decode index
            else:
                first_d.append(past - self._prompt_width)
        if all(d is None or d + seq <= 0 for d in first_d):
            return  # no decode positions at all
        L = self.arch.num_layers
        counted: list[bool] = []
        static_rows: list[tuple[int, ...]] = []  # per position: layers skipped statically
        adaptive_rows: list[_RowPlan | None] = []
        for b, rp in enumerate(plans):
            d0 = first_d[b]
            for s in range(seq):
                d = None if d0 is None else d0 + s
                decode = d is not None and d >= 0
                counted.append(decode and d >= rp.plan.warmup_tokens)
                eligible = decode and not rp.plan.is_empty() and rp.plan.eligible(d)
                static_rows.append(self._static_layers(rp, d) if eligible and rp.plan.mode == "static" else ())
                adaptive_rows.append(rp if eligible and rp.plan.mode == "adaptive" else None)
        self._count(step, counted, static_rows)
        any_static = any(static_rows)
        any_adaptive = any(rp is not None for rp in adaptive_rows)
        if not (any_static or any_adaptive):
            return
        step.active = True
        if any_static:
            step.static = [None] * L
            for layer in self._skip_layers:
                flags = [layer in rows for rows in static_rows]
                step.static[layer] = flags if any(flags) else None
        if any_adaptive:
            host = self._host_state if self._host_state is not None else step.device.type == "cpu"
            shared = self._batch_decision == "shared"
            if host:
                real = step.real.tolist() if shared and step.real is not None else None
                step.adaptive = _HostAdaptive(adaptive_rows, seq, shared, real)
            else:
                step.adaptive = _DeviceAdaptive(adaptive_rows, L, step.device, seq, shared, step.real)
            step.cos_layers = frozenset(step.adaptive.trigger_layers())
        self._plan_compensation(step, plans)

    def _static_layers(self, rp: _RowPlan, d: int) -> tuple[int, ...]:
        key = (rp.index, d)
        layers = self._static_cache.get(key)
        if layers is None:
            if len(self._static_cache) > 65536:  # long sequences: keep the memo bounded
                self._static_cache.clear()
            layers = self._static_cache[key] = tuple(int(l) for l in rp.plan.static_layers_at(d))
        return layers

    def _row_plan_list(self, batch: int) -> list[_RowPlan]:
        if self._prompt_class == "auto":
            classes = self._row_classes if self._row_classes and len(self._row_classes) == batch else [None] * batch
            return [self._row_plans[id(self._plans.get(c, self._plans[None]))] for c in classes]
        return [self._row_plans[id(self.plan)]] * batch

    def _count(self, step: _Step, counted: list[bool], static_rows: list[tuple[int, ...]]) -> None:
        skipped = [len(rows) for rows in static_rows]
        if step.real is None:
            step.counted = sum(counted)
            step.static_skipped = sum(skipped)
            return
        real = step.real
        if all(counted):
            step.counted = real.sum()
        elif any(counted):
            step.counted = (torch.tensor(counted, device=step.device) & real).sum()
        if any(skipped):
            step.static_skipped = (torch.tensor(skipped, device=step.device) * real).sum()

    def _plan_compensation(self, step: _Step, plans: list[_RowPlan]) -> None:
        if any(rp.plan.compensation == "mean_output" for rp in plans):
            self._plan_mean_fill(step, plans)
        if not any(rp.plan.compensation == "norm_ratio" for rp in plans):
            return
        mult = self.arch.sites[0].multiplier
        step.gain_scale = [None] * self.arch.num_layers
        for layer in self._skip_layers:
            per_row = [(rp.plan.norm_gain[layer] - 1.0) / mult if rp.plan.compensation == "norm_ratio" else 0.0
                       for rp in plans]
            if len(set(per_row)) == 1:
                step.gain_scale[layer] = per_row[0]
            else:
                per_position = [v for v in per_row for _ in range(step.seq)]
                step.gain_scale[layer] = torch.tensor(per_position, device=step.device)[:, None]


    def _plan_mean_fill(self, step: _Step, plans: list[_RowPlan]) -> None:
        """Per skippable layer, the mean output each row's plan substitutes (zeros for rows without mean_output)."""
        for layer in self._skip_layers:
            per_row = [self._mean_vector(rp.plan, layer, step.device) for rp in plans]
            if all(v is per_row[0] for v in per_row):
                if per_row[0] is not None:
                    step.mean_fill[layer] = per_row[0]
                continue
            hidden = next(v.shape[0] for v in per_row if v is not None)
            rows = [v if v is not None else torch.zeros(hidden, device=step.device) for v in per_row]
            step.mean_fill[layer] = torch.stack(rows).repeat_interleave(step.seq, dim=0)

    def _mean_vector(self, plan: SkipPlan, layer: int, device: torch.device) -> torch.Tensor | None:
        if plan.compensation != "mean_output" or not plan.ffn_mean or layer not in plan.ffn_mean:
            return None
        key = (id(plan), layer, str(device))
        if key not in self._mean_tensors:  # converted once per plan, layer and device
            self._mean_tensors[key] = torch.tensor(plan.ffn_mean[layer], dtype=torch.float32, device=device)
        return self._mean_tensors[key]


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _check_rows(rows: int, step: _Step, layer: int) -> None:
    if rows != step.positions:
        raise RuntimeError(f"skipprofiler: the FFN of layer {layer} got {rows} positions but the model forward has "
                           f"{step.batch} x {step.seq}; this architecture reorders tokens before its FFN, which the "
                           "runtime does not support")


_GATHER_MIN_POSITIONS = 64  # from this many positions in a forward, running only the kept rows pays off


def _decision_from_flags(flags: list[bool] | None, device: torch.device) -> Any:
    if flags is None:
        return None
    n = sum(flags)
    if n == 0:
        return None
    if n == len(flags):
        return _ALL
    skip = torch.tensor(flags, device=device)
    if len(flags) < _GATHER_MIN_POSITIONS and 4 * (len(flags) - n) > len(flags):
        # A few decode rows are weight-bandwidth bound: an FFN over 2-7 of 8 rows costs about as much as over all 8
        # (benchmarks/ffn_partial_rows.py), so gathering the running rows saves nothing. Run every row and mask;
        # gather only when it pays (many positions, or at most a quarter of the rows running).
        return _Mixed(None, skip)
    kept = torch.tensor([i for i, f in enumerate(flags) if not f], dtype=torch.long, device=device)
    return _Mixed(kept, skip)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    return 0


def _per_row(values: list[int], batch: int) -> list[int]:
    if len(values) == 1:
        return values * batch
    if len(values) != batch:
        raise ValueError(f"decode_from got {len(values)} start positions for a batch of {batch}")
    return values


def _leading_pads(mask: torch.Tensor, batch: int) -> list[int]:
    return (mask.cumsum(1) == 0).sum(1).tolist() if mask.shape[0] == batch else [0] * batch


def _real_weights(mask: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    if mask is None or mask.shape[1] < seq:
        return torch.ones(batch, seq, device=device)
    return mask[:, -seq:].float()


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def apply_plan(model: nn.Module, plan: PlanFile | SkipPlan | str | Path, prompt_class: str | None = None,
               strict: bool = True, *, host_state: bool | None = None,
               batch_decision: str | None = None) -> SkipHandle:
    """Make `model` skip FFNs as `plan` says; returns a handle (context manager) whose ``remove()`` restores it.

    plan: a PlanFile, a bare SkipPlan (applied as is, no fingerprint check), or a YAML path / text.
    prompt_class: None = the global plan; a class name = that class's plan; "auto" = route each prompt with the
        plan's router (the choice is on ``handle.chosen_classes``).
    strict: a plan fitted for another model is an error; False applies it with a warning.
    host_state: keep adaptive state on the host (default: on CPU models) or on the device (no per-layer sync).
    batch_decision: how adaptive plans treat the rows of a batch (None: the plan's ``batch_decision``, by default
        per_sequence). "per_sequence": every row follows the FFN-SkipLLM rule on its own. "shared": the rows
        decoding the same step decide together -- their runs start at the first layer where every real row's cos
        passes its threshold, so all rows skip the same FFNs. Each row skips only after a layer where its own cos
        passed; rows that would have fired earlier wait for the others.
        Use it for batched decoding where the FFN over part of a batch costs as much as over all of it (small
        batches on CPU: benchmarks/ffn_partial_rows.py): per-sequence runs that do not coincide there save nothing.
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
    if isinstance(plan, SkipPlan):
        if prompt_class not in (None,):
            raise PlanError(f"prompt_class={prompt_class!r} needs a PlanFile with class plans; a bare SkipPlan "
                            "has none (pass prompt_class=None)")
        plans, plan_file = {None: plan}, None
        problems = _plan_problems(plan, "plan", arch)
    elif isinstance(plan, PlanFile):
        _check_fingerprint(plan, model, strict)
        plans, problems = _select_plans(plan, prompt_class, arch, _hidden_size(model))
        plan_file = plan
    else:
        raise TypeError(f"apply_plan expects a PlanFile, SkipPlan, or a YAML path; got {type(plan).__name__}")
    decisions = {p.batch_decision for p in plans.values() if p.mode == "adaptive" and not p.is_empty()}
    if batch_decision is None and len(decisions) > 1:
        problems.append(f"the selected plans disagree on batch_decision ({', '.join(sorted(decisions))}); "
                        "pass batch_decision= to apply_plan to choose")
    if problems:
        raise PlanError(problems)
    batch_decision = batch_decision or (decisions.pop() if decisions else "per_sequence")
    handle = SkipHandle(model, arch, plans, plan_file, prompt_class, host_state, batch_decision)
    try:
        handle._install()
    except BaseException:
        handle.remove()
        raise
    return handle
