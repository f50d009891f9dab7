"""Forwards that are not a plain decode step, planned position by position: teacher forcing, prompts under
``apply_to: all``, rows at different decode indices or on different plans (routing), adaptive positions. Flags are
CPU tensors built with a few ops per plan and per layer it may skip; no Python loop over positions."""

from __future__ import annotations

import torch

from ..plan.model import fraction_pattern
from .schedule import DENSE, Action, Fill, Forward, Kind, Rule


def action_from_flags(flags: torch.Tensor, fill: Fill | None, device: torch.device, rows_of_a_step: bool) -> Action:
    """The action for per-position skip flags (CPU BoolTensor [P]). `rows_of_a_step`: one new token per row."""
    n, p = int(flags.sum()), len(flags)
    if n == 0:
        return DENSE
    if n == p:
        return Action(Kind.SKIP_ALL, fill)
    skip = flags.to(device)
    if rows_of_a_step and 4 * (p - n) > p:
        # A few decode rows are weight-bandwidth bound: an FFN over 2-7 of 8 rows costs about as much as over all 8
        # (benchmarks/ffn_partial_rows.py). Run every row and mask. Longer forwards run only the rows they keep.
        return Action(Kind.MASK, fill, skip=skip)
    return Action(Kind.GATHER, fill, kept=(~flags).nonzero().flatten().to(device), skip=skip)


def plan_forward(rules: list[Rule], first_d: list[int], seq: int, device: torch.device,
                 real: torch.Tensor | None) -> Forward:
    """Any forward's actions and counts, from per-position flags built with CPU tensor ops: one pass per distinct
    plan, one per layer it may skip. `real`: BoolTensor [P] on the device, not padding (None: every position is
    real). `handle.forward_plan` decides which forwards come here."""
    forward = Forward(len(rules), seq, device, real)
    d = torch.tensor(first_d)[:, None] + torch.arange(forward.seq)  # [B, S]
    counted = torch.zeros_like(d, dtype=torch.bool)
    decided = torch.zeros_like(d)
    fill_groups: dict[int, list[tuple[Fill | None, torch.Tensor]]] = {}
    narrowed: dict[int, tuple[object, torch.Tensor]] = {}  # layer -> (neurons.Narrowing, CPU BoolTensor [P])
    for rule in {id(r): r for r in rules}.values():
        plan = rule.plan
        rows = torch.tensor([r is rule for r in rules])[:, None]
        counted |= rows & (d >= plan.warmup_tokens) & (d >= 0)
        eligible = rows & plan.eligible(d) & (d >= 0)
        if plan.is_empty() or not eligible.any():
            continue
        if not rule.static:
            forward.eligible.append((rule, eligible.flatten()))
            for layer in rule.skippable:
                fill_groups.setdefault(layer, []).append((rule.fills.get(layer), eligible.flatten()))
            continue
        hits = {}
        for layer, fraction in plan.skip_layers.items():
            hit = hits[layer] = eligible & fraction_pattern(fraction, d)
            decided += hit
            flags = forward.static_flags.get(layer)
            forward.static_flags[layer] = hit.flatten() if flags is None else flags | hit.flatten()
            fill_groups.setdefault(layer, []).append((rule.fills.get(layer), hit.flatten()))
        for layer, narrowing in rule.neurons.items():  # neuron plans: eligible positions not skipped whole
            hit = (eligible & ~hits[layer] if layer in hits else eligible).flatten()
            narrowed[layer] = (narrowing, hit if layer not in narrowed else narrowed[layer][1] | hit)
    if forward.real is None:  # host ints; with padding, device counts of the real positions
        forward.counts.positions, forward.counts.decided = int(counted.sum()), int(decided.sum())
    else:
        forward.counts.positions = (counted.flatten().to(forward.device) & forward.real).sum()
        forward.counts.decided = (decided.flatten().to(forward.device) * forward.real).sum()
    for layer, groups in fill_groups.items():
        forward.fills[layer] = _one_fill(groups, forward.device)
    for layer, flags in forward.static_flags.items():
        if layer in narrowed and narrowed[layer][1].any():
            continue
        action = forward.actions[layer] = action_from_flags(flags, forward.fills.get(layer), forward.device,
                                                             forward.seq == 1)
        if not forward.eligible:  # with adaptive positions the dynamic decisions are counted as they are made
            forward.count(action)
    for layer, (narrowing, flags) in narrowed.items():
        if not flags.any():
            continue
        from .neurons import narrow_action

        action = forward.actions[layer] = narrow_action(forward.static_flags.get(layer), flags,
                                                        forward.fills.get(layer), narrowing, forward.device)
        if not forward.eligible:  # with adaptive positions the dynamic decisions are counted as they are made
            forward.count(action)
    return forward


def _one_fill(groups: list[tuple[Fill | None, torch.Tensor]], device: torch.device) -> Fill | None:
    """One fill for a layer whose positions follow different plans (rows of another plan get theirs)."""
    distinct = {id(f): f for f, _ in groups}
    if len(distinct) == 1:
        return groups[0][0]
    masks: dict[int, torch.Tensor] = {}
    for f, mask in groups:
        masks[id(f)] = mask | masks[id(f)] if id(f) in masks else mask
    return MixedFill([(distinct[k], m.to(device)) for k, m in masks.items() if distinct[k] is not None])


class MixedFill:
    def __init__(self, groups: list[tuple[Fill, torch.Tensor]]):
        self.groups = groups
        self.flops_per_row = sum(f.flops_per_row for f, _ in groups)

    def __call__(self, ffn_input: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor:
        out = ffn_input.new_zeros((ffn_input.shape[0], hidden))
        for fill, positions in self.groups:
            out = torch.where(positions[:, None], fill(ffn_input, hidden, stream), out)
        return out
