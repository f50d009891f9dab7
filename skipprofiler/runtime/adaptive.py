"""Adaptive plans (FFN-SkipLLM): one state machine per forward, with a host and a device backend.

Per position, after each dense layer in its trigger range, cos(h, h + contribution) with
``h = stream_out - contribution`` (the registry's decomposition); once it passes tau[layer], the next max_skip FFNs
(cut at L - cold_end) skip, one run per position. On CPU the state lives on the host (reading a CPU tensor is free);
elsewhere it stays on the device as tensors (no host sync per layer; skipped rows are masked, not saved).
With ``shared`` the rows of a batch fire together column by column (positions ``b * seq + s`` with the same s): a
column's open positions start their runs at the first layer where every real one passes its own threshold.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..plan import SkipPlan
from ..registry import POST_NORM_OUTPUT, FFNSite, first_tensor
from .patcher import Patcher
from .schedule import RowPlan
from .step import DENSE, Decision, Kind, decide


def adaptive_problems(plan: SkipPlan, label: str, num_layers: int) -> list[str]:
    L, problems = num_layers, []
    if plan.tau is None or len(plan.tau) != L:
        n = None if plan.tau is None else len(plan.tau)
        problems.append(f"{label}: adaptive plan needs one tau per layer ({L}), got {n}")
    if plan.cold_start < 0 or plan.cold_end < 0 or plan.cold_start + plan.cold_end > L:
        problems.append(f"{label}: cold_start {plan.cold_start} + cold_end {plan.cold_end} do not fit {L} layers")
    if plan.max_skip < 0:
        problems.append(f"{label}: max_skip must be >= 0")
    return problems


class HostAdaptive:
    """The state in Python lists, one entry per flattened position."""

    def __init__(self, row_plans: list[RowPlan | None], seq: int, shared: bool, real: list[bool] | None):
        self.row_plans = row_plans  # per position: its adaptive plan, or None (not eligible)
        n = len(row_plans)
        self.remaining = [0] * n
        self.used = [rp is None for rp in row_plans]
        self.run_len = [0] * n
        self.open = sum(1 for u in self.used if not u)  # positions that may still start a run
        self.seq, self.shared, self.real = seq, shared, real

    def skip_flags(self, layer: int) -> list[bool] | None:
        """Per position: skip this layer's FFN (None: no position does)."""
        if not any(self.remaining):
            return None
        skips = [r > 0 for r in self.remaining]
        self.remaining = [r - 1 if r > 0 else 0 for r in self.remaining]
        return skips

    def decide(self, layer: int, static: list[bool] | None, device: torch.device) -> Decision:
        flags = self.skip_flags(layer)
        if static is not None:
            flags = static if flags is None else [a or b for a, b in zip(flags, static)]
        return decide(flags, device)

    def may_trigger(self) -> bool:
        return self.open > 0

    def trigger_layers(self) -> set[int]:
        plans = {id(r): r for r in self.row_plans if r is not None}.values()
        return {l for rp in plans for l in range(rp.trigger_lo, rp.trigger_hi + 1)}

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

    def decided(self, real: torch.Tensor | None) -> int | torch.Tensor:
        if real is None:
            return sum(self.run_len)
        return (torch.tensor(self.run_len, device=real.device) * real).sum()


class DeviceAdaptive:
    """The same state as device tensors [positions] (and [layer, position] constants)."""

    def __init__(self, row_plans: list[RowPlan | None], num_layers: int, device: torch.device, seq: int,
                 shared: bool, real: torch.Tensor | None):
        n = len(row_plans)
        self.seq, self.shared = seq, shared
        self.real = real if real is not None else torch.ones(n, dtype=torch.bool, device=device)
        tau = [[math.inf] * n for _ in range(num_layers)]
        run = [[0] * n for _ in range(num_layers)]
        self.layers: set[int] = set()
        for p, rp in enumerate(row_plans):
            if rp is None:
                continue
            for layer in range(rp.trigger_lo, rp.trigger_hi + 1):
                tau[layer][p] = rp.plan.tau[layer]
                run[layer][p] = min(rp.plan.max_skip, rp.end - (layer + 1))
                self.layers.add(layer)
        self.first_skip_layer = min(self.layers, default=num_layers) + 1
        self.tau = torch.tensor(tau, dtype=torch.float32).to(device, non_blocking=True)
        self.can_trigger = torch.isfinite(self.tau)  # [layer, position]: in that position's trigger range
        self.run = torch.tensor(run, dtype=torch.long).to(device, non_blocking=True)
        self.remaining = torch.zeros(n, dtype=torch.long, device=device)
        self.used = torch.zeros(n, dtype=torch.bool, device=device)
        self.run_len = torch.zeros(n, dtype=torch.long, device=device)

    def skip_mask(self, layer: int) -> torch.Tensor | None:
        """BoolTensor [P]: skip this layer's FFN (None before any run can have started)."""
        if layer < self.first_skip_layer:
            return None
        skip = self.remaining > 0
        self.remaining = self.remaining - skip.long()
        return skip

    def decide(self, layer: int, static: list[bool] | None, device: torch.device) -> Decision:
        skip = self.skip_mask(layer)
        if static is not None:
            static_mask = torch.tensor(static, device=device)
            skip = static_mask if skip is None else skip | static_mask
        return DENSE if skip is None else Decision(Kind.MASK, skip=skip)

    def may_trigger(self) -> bool:
        return True  # deciding would need a host sync

    def trigger_layers(self) -> set[int]:
        return self.layers

    def update(self, layer: int, cos: torch.Tensor) -> None:
        passed = cos > self.tau[layer]
        if self.shared:  # a column fires when every open real position in it passes (as HostAdaptive)
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

    def decided(self, real: torch.Tensor | None) -> torch.Tensor:
        return (self.run_len * real).sum() if real is not None else self.run_len.sum()


def adaptive_state(row_plans: list[RowPlan | None], num_layers: int, device: torch.device, seq: int, shared: bool,
                   real: torch.Tensor | None, host: bool) -> HostAdaptive | DeviceAdaptive:
    if host:
        return HostAdaptive(row_plans, seq, shared, real.tolist() if shared and real is not None else None)
    return DeviceAdaptive(row_plans, num_layers, device, seq, shared, real)


def patch_cos_reading(site: FFNSite, ctx: Any, patcher: Patcher) -> None:
    """Hooks that read cos(h, h + contribution) after the layer and hand it to the step's adaptive state."""
    layer = site.index
    if site.contribution == POST_NORM_OUTPUT:  # the contribution is the post-norm's output
        def post_norm_done(module, args, out):
            step = ctx.step
            if step is not None and step.cos_layers and step.wants_contribution(layer):
                step.contribution[layer] = out.reshape(-1, out.shape[-1])

        patcher.hook(site.post_norm.register_forward_hook(post_norm_done))

    def layer_done(module, args, out):
        step = ctx.step
        c = step.contribution.pop(layer, None) if step is not None and step.contribution else None
        if c is None:
            return None
        stream_out = first_tensor(out)
        stream_out = stream_out.reshape(-1, stream_out.shape[-1]).float()
        cos = torch.nn.functional.cosine_similarity(stream_out - c.float(), stream_out, dim=-1)
        step.adaptive.update(layer, cos)
        return None

    patcher.hook(site.layer.register_forward_hook(layer_done))
