"""Adaptive plans (FFN-SkipLLM), a runtime plug-in: one state machine per forward, with a host and a device backend.

Per position, after each dense layer in its trigger range, cos(h, h + contribution) with
``h = stream_out - contribution`` (the registry's decomposition); once it passes tau[layer], the next max_skip FFNs
(cut at L - cold_end) skip, one run per position. On CPU the state lives on the host (reading a CPU tensor is free);
elsewhere it stays on the device as tensors (no host sync per layer; skipped rows are masked, not saved).
With ``shared`` the rows of a batch fire together column by column (positions ``b * seq + s`` with the same s): a
column's open positions start their runs at the first layer where every real one passes its own threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..plan.model import SkipPlan
from ..arch.registry import POST_NORM_OUTPUT, RESIDUAL_INSIDE, FFNSite, first_tensor
from .patcher import Patcher
from .plugins import Plugin
from .positionwise import action_from_flags
from .schedule import DENSE, Action, Forward, Kind, Rule


@dataclass(frozen=True)
class Trigger:
    """One adaptive plan's constants: the layers whose cos may start a run, and where runs are cut."""

    plan: SkipPlan
    trigger_lo: int  # first layer whose cos may start a run
    trigger_hi: int  # last such layer (the run starts at layer + 1 < end)
    end: int  # L - cold_end

    @classmethod
    def of(cls, plan: SkipPlan, num_layers: int) -> Trigger:
        end = num_layers - plan.cold_end
        return cls(plan, max(plan.cold_start - 1, 0), end - 2, end)


class HostAdaptive:
    """The state in Python lists, one entry per flattened position."""

    def __init__(self, row_plans: list[Trigger | None], seq: int, shared: bool, real: list[bool] | None):
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

    def __init__(self, row_plans: list[Trigger | None], num_layers: int, device: torch.device, seq: int,
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


class AdaptivePlugin(Plugin):
    """Installs the cos-reading hooks and, per forward with eligible positions, the state that decides each layer."""

    def __init__(self, handle, rules: list[Rule], host_state: bool | None, shared: bool):
        arch, patcher = handle.arch, handle.patcher
        self.handle, self.host_state, self.shared = handle, host_state, shared
        self.triggers = {id(r): Trigger.of(r.plan, arch.num_layers) for r in rules if not r.static}
        self.layers = sorted({l for t in self.triggers.values() for l in range(t.trigger_lo, t.trigger_hi + 1)})
        self.state: HostAdaptive | DeviceAdaptive | None = None
        self.decisions: dict[int, Action] = {}
        self.contribution: dict[int, torch.Tensor] = {}
        self.cos_layers: frozenset[int] = frozenset()  # layers whose cos may start a run in this forward
        for layer in self.layers:
            _read_cos(arch.sites[layer], self, patcher)

    def begin(self, forward: Forward) -> None:
        self.state, self.decisions, self.contribution, self.cos_layers = None, {}, {}, frozenset()
        if not forward.eligible:
            return
        row_plans: list[Trigger | None] = [None] * forward.positions
        for rule, eligible in forward.eligible:
            for p in eligible.nonzero().flatten().tolist():
                row_plans[p] = self.triggers[id(rule)]
        host = self.host_state if self.host_state is not None else forward.device.type == "cpu"
        if host:
            real = forward.real.tolist() if self.shared and forward.real is not None else None
            self.state = HostAdaptive(row_plans, forward.seq, self.shared, real)
        else:
            self.state = DeviceAdaptive(row_plans, self.handle.arch.num_layers, forward.device, forward.seq,
                                        self.shared, forward.real)
        self.cos_layers = frozenset(self.state.trigger_layers())
        forward.dynamic = self

    def end(self, forward: Forward) -> None:
        if self.state is not None:
            forward.counts.decided = forward.counts.decided + self.state.decided(forward.real)
        self.state = None

    def wants_contribution(self, layer: int) -> bool:
        return layer in self.cos_layers and self.state is not None and self.state.may_trigger()

    def action(self, forward: Forward, layer: int, planned: Action) -> Action:
        """This forward's action for one layer, decided once (when its FFN is first called) and counted then."""
        action = self.decisions.get(layer)
        if action is None:
            static = forward.static_flags.get(layer)
            if isinstance(self.state, HostAdaptive):
                flags = self.state.skip_flags(layer)
                flags = static if flags is None else torch.tensor(flags) | (False if static is None else static)
                action = DENSE if flags is None else action_from_flags(flags, forward.fills.get(layer), forward.device,
                                                                       forward.seq == 1)
            else:
                skip = self.state.skip_mask(layer)
                if static is not None:
                    skip = static.to(forward.device) if skip is None else skip | static.to(forward.device)
                action = DENSE if skip is None else Action(Kind.MASK, forward.fills.get(layer), skip=skip)
            self.decisions[layer] = action
            forward.count(action)
        return action


def _read_cos(site: FFNSite, plugin: AdaptivePlugin, patcher: Patcher) -> None:
    """Hooks that keep what the FFN added (its contribution) and, after the layer, hand cos(h, h + contribution) to
    the forward's adaptive state."""
    layer = site.index

    def keep(c: torch.Tensor) -> None:
        if plugin.wants_contribution(layer):
            plugin.contribution[layer] = c

    if site.contribution == POST_NORM_OUTPUT:  # the contribution is the post-norm's output
        patcher.hook(site.post_norm.register_forward_hook(lambda m, a, out: keep(out.reshape(-1, out.shape[-1]))))
    elif site.ffn is None:  # OPT: fc2's output, already [P, H]
        patcher.hook(site.fc2.register_forward_hook(lambda m, a, out: keep(out)))
    else:
        patcher.hook(site.ffn.register_forward_hook(
            lambda m, a, kw, out: keep(contribution_of(site, out, a, kw)), with_kwargs=True))

    def layer_done(module, args, out):
        c = plugin.contribution.pop(layer, None)
        if c is None or plugin.state is None:
            return None
        stream_out = first_tensor(out)
        stream_out = stream_out.reshape(-1, stream_out.shape[-1]).float()
        cos = torch.nn.functional.cosine_similarity(stream_out - c.float(), stream_out, dim=-1)
        plugin.state.update(layer, cos)
        return None

    patcher.hook(site.layer.register_forward_hook(layer_done))


def contribution_of(site: FFNSite, out: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """What an FFN call added to the stream, flattened to [P, H]."""
    if site.contribution == RESIDUAL_INSIDE:
        residual = args[1] if len(args) > 1 else kwargs["residual"]
        return (out - residual).reshape(-1, out.shape[-1])
    out = first_tensor(out)
    c = out.reshape(-1, out.shape[-1])
    if site.multiplier != 1.0:
        return c * site.multiplier
    return c.clone() if site.ffn_output_mutated else c  # Falcon adds attention into the returned tensor in place
