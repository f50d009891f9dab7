"""The schedule: from where one forward's new positions sit to what each plan does there (pure; no torch).

Positions are flattened ``b * seq + s``. Row b's decode index at column s is ``first_d[b] + s`` (plan.py defines d);
a negative or missing index is a prompt position. Static decisions depend only on these host-known integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..plan import ADAPTIVE, ALL_POSITIONS, STATIC, SkipPlan


@dataclass
class RowPlan:
    """One plan's constants, computed once per application."""

    plan: SkipPlan
    trigger_lo: int = 0  # adaptive: first layer whose cos may start a run
    trigger_hi: int = -1  # adaptive: last such layer
    end: int = 0  # adaptive: L - cold_end; runs are cut here
    static_memo: dict[int, tuple[int, ...]] = field(default_factory=dict)  # d -> layers a static plan skips

    @classmethod
    def of(cls, plan: SkipPlan, num_layers: int) -> RowPlan:
        rp = cls(plan)
        if plan.mode == ADAPTIVE and not plan.is_empty():
            rp.end = num_layers - plan.cold_end
            rp.trigger_lo = max(plan.cold_start - 1, 0)
            rp.trigger_hi = rp.end - 2  # the run starts at layer + 1 < end
        return rp

    def static_layers(self, d: int) -> tuple[int, ...]:
        layers = self.static_memo.get(d)
        if layers is None:
            if len(self.static_memo) > 65536:  # long sequences: keep the memo bounded
                self.static_memo.clear()
            layers = self.static_memo[d] = tuple(int(l) for l in self.plan.static_layers_at(d))
        return layers


def first_decode_index(plans: list[RowPlan], past: int, prompt_end: list[int] | None,
                       pad_offsets: list[int]) -> list[int | None]:
    """Per row, the decode index of this forward's first new position (None: no decode index, a prompt).

    past: positions already in the cache; prompt_end[b]: where row b's decode positions start (None: this forward is
    all prompt); pad_offsets[b]: row b's leading pads (``apply_to: all`` counts d from the first real token).
    """
    out: list[int | None] = []
    for b, rp in enumerate(plans):
        if rp.plan.apply_to == ALL_POSITIONS:
            out.append(past - pad_offsets[b])
        else:
            out.append(None if prompt_end is None else past - prompt_end[b])
    return out


@dataclass
class Schedule:
    """Per flattened position: counted in stats, layers skipped statically, adaptive plan that may start a run."""

    counted: list[bool]
    static: list[tuple[int, ...]]
    adaptive: list[RowPlan | None]

    def static_flags(self, layer: int) -> list[bool] | None:
        flags = [layer in layers for layers in self.static]
        return flags if any(flags) else None


def schedule(plans: list[RowPlan], seq: int, first_d: list[int | None]) -> Schedule | None:
    """What each position of the forward does; None when no position has a decode index."""
    if all(d is None or d + seq <= 0 for d in first_d):
        return None
    counted, static, adaptive = [], [], []
    for rp, d0 in zip(plans, first_d):
        plan = rp.plan
        for s in range(seq):
            d = None if d0 is None else d0 + s
            decode = d is not None and d >= 0
            counted.append(decode and d >= plan.warmup_tokens)
            eligible = decode and not plan.is_empty() and plan.eligible(d)
            static.append(rp.static_layers(d) if eligible and plan.mode == STATIC else ())
            adaptive.append(rp if eligible and plan.mode == ADAPTIVE else None)
    return Schedule(counted, static, adaptive)
