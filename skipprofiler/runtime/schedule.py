"""One forward's plan: which FFN calls skip which positions, decided on the host before the forward runs.

Positions are flattened ``b * seq + s``; row b's decode index at column s is ``first_d[b] + s`` (plan.py defines d;
negative: a prompt position). A decode step (one token per row, every row skipping the same layers) costs a
dictionary lookup: no device work, no host sync. Other forwards (teacher forcing, prompts under ``apply_to: all``,
rows on different plans) are planned position by position (`positionwise`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..plan.model import ALL_POSITIONS, STATIC, SkipPlan


class Kind(enum.Enum):
    DENSE = "run every row"
    SKIP_ALL = "run no row"
    GATHER = "run the kept rows only"  # rows not computed are saved
    MASK = "run every row, replace the skipped ones"  # nothing saved: a gather would not pay
    NARROW = "run the kept neurons"  # neuron plans (runtime/neurons.py): narrowed rows, maybe full or skipped ones


class Fill(Protocol):
    """What skipped rows contribute instead of the FFN (runtime/compensation.py); None means zeros."""

    flops_per_row: float

    def __call__(self, ffn_input: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Action:
    kind: Kind
    fill: Fill | None = None
    kept: torch.Tensor | None = None  # GATHER: LongTensor [K] of flattened positions that run the FFN
    skip: torch.Tensor | None = None  # GATHER, MASK, NARROW: BoolTensor [P], True where the FFN output is replaced
    neurons: Any = None  # NARROW: the layer's neurons.Narrowing
    parts: Any = None  # NARROW: neurons.Parts of a mixed forward (None: every position narrowed)

    def filled(self, ffn_input: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor:
        """A fresh [rows, hidden] tensor: what the skipped rows contribute, given what the FFN would have read."""
        if self.fill is None:
            return ffn_input.new_zeros((ffn_input.shape[0], hidden))
        return self.fill(ffn_input, hidden, stream)


DENSE = Action(Kind.DENSE)


class Rule:
    """One plan's constants for the schedule: its eligibility rule, and per skippable layer what fills in."""

    def __init__(self, plan: SkipPlan, num_layers: int, fills: dict[int, Fill]):
        self.plan, self.fills = plan, fills
        self.static = plan.mode == STATIC
        self.skippable = plan.skippable_layers(num_layers) if not plan.is_empty() else []
        self.neurons: dict[int, Any] = {}  # neuron plans: layer -> neurons.Narrowing (set by the handle)
        self._actions: dict[tuple, dict[int, Action]] = {}

    def skip_all(self, layers: tuple[int, ...], narrowed: tuple[int, ...] = ()) -> dict[int, Action]:
        """The actions of a decode step skipping `layers` whole and running only the kept neurons of `narrowed`."""
        key = (layers, narrowed)
        actions = self._actions.get(key)
        if actions is None:  # a plan has few distinct layer sets (fractions repeat): built once each
            actions = self._actions[key] = {l: Action(Kind.SKIP_ALL, self.fills.get(l)) for l in layers}
            actions.update({l: Action(Kind.NARROW, neurons=self.neurons[l]) for l in narrowed})
        return actions

    def layers_at(self, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(layers skipped whole, layers narrowed) at decode index d; none at prompt positions (d < 0)."""
        if d < 0:
            return (), ()
        plan = self.plan
        return tuple(plan.static_layers_at(d)), tuple(plan.narrowed_layers_at(d)) if self.neurons else ()


@dataclass
class Counts:
    """What `SkipHandle.stats()` adds up: ints, or device tensors where counting real tokens needs the mask."""

    positions: Any = 0  # decode positions after warm-up (real tokens)
    decided: Any = 0  # FFN calls the plan's rule skipped (real tokens)
    not_computed: Any = 0  # FFN rows really not computed (real tokens; masked rows are computed)
    substitute_rows: int = 0  # rows a linear substitute ran for (padding included: work done)
    substitute_flops: float = 0.0
    narrowed: Any = 0  # FFN rows that ran only their kept neurons (real tokens)
    narrowed_flops_saved: Any = 0.0  # FLOPs those rows did not compute, less the mean bias's adds

    def __iadd__(self, other: Counts) -> Counts:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if isinstance(value, torch.Tensor) or value:
                setattr(self, name, getattr(self, name) + value)
        return self


@dataclass
class Forward:
    """Everything the patched FFNs read during one forward of the top-level model."""

    batch: int
    seq: int
    device: torch.device
    real: torch.Tensor | None  # BoolTensor [P] on the device: not padding (None: every position is real)
    actions: dict[int, Action] = field(default_factory=dict)  # planned per layer (DENSE when absent)
    counts: Counts = field(default_factory=Counts)
    fills: dict[int, Fill] = field(default_factory=dict)  # per layer, for dynamic decisions
    static_flags: dict[int, torch.Tensor] = field(default_factory=dict)  # per layer: CPU BoolTensor [P]
    eligible: list[tuple[Rule, torch.Tensor]] = field(default_factory=list)  # non-static rules: CPU BoolTensor [P]
    dynamic: Any = None  # decisions made while the forward runs: the adaptive plug-in (runtime/adaptive.py)

    @property
    def positions(self) -> int:
        return self.batch * self.seq

    def action(self, layer: int) -> Action:
        planned = self.actions.get(layer, DENSE)
        return planned if self.dynamic is None else self.dynamic.action(self, layer, planned)

    def count(self, action: Action) -> None:
        """Add the rows `action` leaves uncomputed and the substitute work it costs."""
        c, p = self.counts, self.positions
        if action.kind is Kind.SKIP_ALL:
            c.not_computed = c.not_computed + (p if self.real is None else self.real.sum())
        elif action.kind is Kind.GATHER:
            c.not_computed = c.not_computed + (p - len(action.kept) if self.real is None
                                               else (action.skip & self.real).sum())
        elif action.kind is Kind.NARROW:
            parts = action.parts
            if action.skip is not None:
                c.not_computed = c.not_computed + (action.skip.sum() if self.real is None
                                                   else (action.skip & self.real).sum())
            rows = (p if parts is None else len(parts.narrow)) if self.real is None else \
                (self.real.sum() if parts is None else (parts.narrow_mask & self.real).sum())
            c.narrowed = c.narrowed + rows
            c.narrowed_flops_saved = c.narrowed_flops_saved + rows * action.neurons.saved_per_row
        if action.kind is not Kind.DENSE and action.fill is not None and action.fill.flops_per_row:
            c.substitute_rows += p
            c.substitute_flops += p * action.fill.flops_per_row

    def check_rows(self, rows: int, layer: int) -> None:
        if rows != self.positions:
            raise RuntimeError(f"skipprofiler: the FFN of layer {layer} got {rows} positions but the model forward has "
                               f"{self.batch} x {self.seq}; this architecture reorders tokens before its FFN, which "
                               "the runtime does not support")


def first_decode_index(rules: list[Rule], past: int, prompt_end: list[int], pad_offsets: list[int] | None
                       ) -> list[int]:
    """Per row, the decode index of this forward's first new position. ``apply_to: all`` counts d from the row's
    first real token (pad_offsets: leading pads), other plans from the end of the prompt."""
    return [past - (pad_offsets[b] if r.plan.apply_to == ALL_POSITIONS else prompt_end[b]) for b, r in enumerate(rules)]


def decode_step(rules: list[Rule], first_d: list[int], seq: int, device: torch.device) -> Forward | None:
    """The plan of a plain decode step -- one new token per row, every row on one static plan and skipping the same
    layers -- from host integers only; None for any other forward."""
    rule = rules[0]
    if seq != 1 or not rule.static or any(r is not rule for r in rules) or all(d < 0 for d in first_d):
        return None
    layers = {rule.layers_at(d) for d in first_d}
    if len(layers) != 1:
        return None
    forward = Forward(len(rules), seq, device, None)  # one new token per row: a generated token, always real
    forward.counts.positions = sum(d >= rule.plan.warmup_tokens for d in first_d)
    skipped, narrowed = layers.pop()
    forward.actions = rule.skip_all(skipped, narrowed)
    forward.counts.decided = len(skipped) * forward.batch
    for action in forward.actions.values():
        forward.count(action)
    return forward
