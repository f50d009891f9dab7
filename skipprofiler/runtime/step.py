"""One forward's state, and the typed decision each FFN call of that forward follows."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class Kind(enum.Enum):
    DENSE = "run every row"
    SKIP_ALL = "run no row"
    GATHER = "run the kept rows only"  # rows not computed are saved
    MASK = "run every row, replace the skipped ones"  # nothing saved: no host sync, or a gather would not pay


@dataclass(frozen=True)
class Decision:
    kind: Kind
    kept: torch.Tensor | None = None  # GATHER: LongTensor [K] of flattened positions that run the FFN
    skip: torch.Tensor | None = None  # GATHER, MASK: BoolTensor [P], True where the FFN output is replaced


DENSE = Decision(Kind.DENSE)
SKIP_ALL = Decision(Kind.SKIP_ALL)

GATHER_MIN_POSITIONS = 64  # from this many positions in a forward, running only the kept rows pays off


def decide(flags: list[bool] | None, device: torch.device) -> Decision:
    """The decision for host-known per-position skip flags."""
    n = sum(flags) if flags else 0
    if n == 0:
        return DENSE
    if n == len(flags):
        return SKIP_ALL
    skip = torch.tensor(flags, device=device)
    if len(flags) < GATHER_MIN_POSITIONS and 4 * (len(flags) - n) > len(flags):
        # A few decode rows are weight-bandwidth bound: an FFN over 2-7 of 8 rows costs about as much as over all 8
        # (benchmarks/ffn_partial_rows.py). Run every row and mask; gather only when it pays.
        return Decision(Kind.MASK, skip=skip)
    kept = torch.tensor([i for i, f in enumerate(flags) if not f], dtype=torch.long, device=device)
    return Decision(Kind.GATHER, kept=kept, skip=skip)


@dataclass
class Step:
    """Everything the patched modules need during one forward of the top-level model."""

    batch: int
    seq: int
    device: torch.device
    active: bool = False  # some position may skip in this forward
    static: list[list[bool] | None] = field(default_factory=list)  # per layer: per-position flags, None = none
    adaptive: Any = None  # HostAdaptive | DeviceAdaptive (runtime/adaptive.py)
    real: torch.Tensor | None = None  # BoolTensor [P]: not padding (None: all real)
    decisions: dict[int, Decision] = field(default_factory=dict)  # layer -> decision (made once per forward)
    counted: int | torch.Tensor = 0  # decode positions after warm-up (real tokens)
    decided: int | torch.Tensor = 0  # FFN calls the rule skipped (real tokens)
    gathered_saved: int | torch.Tensor = 0  # FFN rows GATHER decisions left out (real tokens)
    skip_all_calls: int = 0  # FFN calls SKIP_ALL decisions left out (each saves every real position)
    gain_scale: list[Any] = field(default_factory=list)  # norm_ratio: per layer None | float | Tensor [P, 1]
    mean_fill: dict[int, torch.Tensor] = field(default_factory=dict)  # mean_output: layer -> [H] or [P, H]
    linear_fill: dict[int, list] = field(default_factory=dict)  # linear: layer -> [(substitute, position mask | None)]
    substituted_rows: int = 0  # linear: rows a substitute map was computed for (padding included: it is work done)
    substitute_flops: float = 0.0  # linear: FLOPs those map applications cost
    ffn_input_stream: dict[int, torch.Tensor] = field(default_factory=dict)  # norm_ratio: layer -> h [P, H]
    contribution: dict[int, torch.Tensor] = field(default_factory=dict)  # adaptive: layer -> [P, H]
    cos_layers: frozenset[int] = frozenset()  # adaptive: layers whose cos may start a run in this forward
    _real_count: torch.Tensor | None = None

    def real_count(self) -> torch.Tensor:
        """Real (not padding) positions of this forward, as a device tensor (computed once)."""
        if self._real_count is None:
            self._real_count = self.real.sum()
        return self._real_count

    @property
    def positions(self) -> int:
        return self.batch * self.seq

    def wants_contribution(self, layer: int) -> bool:
        return layer in self.cos_layers and self.adaptive.may_trigger()

    def count_saved(self, decision: Decision) -> None:
        """Note the real rows this decision leaves uncomputed (SKIP_ALL and GATHER; MASK computes every row)."""
        if decision.kind is Kind.SKIP_ALL:
            self.skip_all_calls += 1
        elif decision.kind is Kind.GATHER:
            n = self.positions - len(decision.kept) if self.real is None else (decision.skip & self.real).sum()
            self.gathered_saved = self.gathered_saved + n

    def not_computed(self) -> int | torch.Tensor:
        """FFN rows not computed in this forward (real tokens; masked rows were computed)."""
        if not self.skip_all_calls:
            return self.gathered_saved
        return self.gathered_saved + self.skip_all_calls * (self.positions if self.real is None else self.real_count())

    def check_rows(self, rows: int, layer: int) -> None:
        if rows != self.positions:
            raise RuntimeError(f"skipprofiler: the FFN of layer {layer} got {rows} positions but the model forward has "
                               f"{self.batch} x {self.seq}; this architecture reorders tokens before its FFN, which "
                               "the runtime does not support")
