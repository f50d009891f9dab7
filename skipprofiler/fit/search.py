"""Searches over static skip sets on a cost of a set; pure (standard library only, no torch).

A static set is a multiset of *slots* (layer, fraction): refinement moves a slot to another layer and keeps its
fraction, so the expected skip ratio (sum of fractions / L x eligible share) never changes. A cost is lower for
better sets and 0 for the empty set (the dense model). refine.py searches with `SetEvaluator`, the measured KL on
calibration windows; tests/test_search.py with synthetic costs.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from .._jsonable import rounded

Slots = tuple[tuple[int, float], ...]
DEFAULT_SHORTLIST = 4  # swap candidates per slot after a greedy pass: the layers it measured cheapest to skip
BUDGET_FRACTIONS = (0.75, 0.5, 0.25)  # partial last slots tried when the next whole layer breaks the budget


class RefineError(ValueError):
    """Refinement cannot run (not a static plan, no candidates, search too large)."""


class SetCost(Protocol):
    """The cost of a skip set (called with canonical or raw slots). `set_anchor` says the next sets measured are
    near `slots`: a measurement may keep work for them (SetEvaluator's prefix reuse); a plain cost does nothing."""

    def __call__(self, slots: Slots) -> float: ...

    def set_anchor(self, slots: Slots) -> None: ...


def canonical(slots: Sequence[tuple[int, float]]) -> Slots:
    return tuple(sorted((int(layer), float(f)) for layer, f in slots))


def middle_layers(num_layers: int) -> list[int]:
    """Candidates for skipping: every layer but the first and the last (SLEB and LLM-Drop protect both)."""
    return list(range(1, num_layers - 1)) if num_layers > 2 else list(range(num_layers))


def swap_descent(cost: SetCost, slots: Slots, candidates: Sequence[int], max_rounds: int,
                 shortlist: int | None = None, cost_hint: dict[int, float] | None = None) -> tuple[Slots, int]:
    """Best-improvement swaps (one slot -> one unused candidate) until no swap lowers the cost. Returns (set, rounds).

    With `shortlist`, each slot is only tried against the `shortlist` unused candidates that `cost_hint` (a layer's
    measured cost, lower = cheaper to skip) ranks cheapest, which bounds a round to slots x shortlist sets. Ties keep
    the earlier move (slots in layer order, candidates in the given or hinted order)."""
    current, best_cost, rounds = canonical(slots), cost(slots), 0
    while rounds < max_rounds:
        cost.set_anchor(current)
        used = {layer for layer, _ in current}
        unused = [c for c in candidates if c not in used]
        if shortlist is not None and cost_hint:
            unused = sorted(unused, key=lambda c: cost_hint.get(c, math.inf))[:shortlist]
        best_move = None
        for i, (_, fraction) in enumerate(current):
            for cand in unused:
                trial = canonical(current[:i] + ((cand, fraction),) + current[i + 1:])
                trial_cost = cost(trial)
                if trial_cost < best_cost * (1 - 1e-9):
                    best_cost, best_move = trial_cost, trial
        if best_move is None:
            break
        current, rounds = best_move, rounds + 1
    return current, rounds


@dataclass
class LazyGreedy:
    """SLEB-style greedy growth of a skip set: each step adds the candidate whose addition costs the least.

    Lazy (CELF): a candidate's added cost measured at an earlier step is kept as its estimate; only the candidate
    with the lowest estimate is re-measured, and it is taken when its fresh cost still beats every other estimate.
    Skipping costs grow as the set grows (interactions add up), so an old estimate is a lower bound and the lazy
    choice is the greedy choice; where they do not grow the result is still a measured, locally good set.
    Ties go to the earlier candidate. `costs` holds each layer's latest added cost (the shortlist hint for
    `swap_descent`)."""

    cost: SetCost
    candidates: Sequence[int]
    lazy: bool = True
    chosen: Slots = ()
    costs: dict[int, float] = field(default_factory=dict)

    def step(self, fraction: float = 1.0) -> Slots:
        """The set with one more slot of `fraction` (the greedy choice); `chosen` becomes that set."""
        used = {layer for layer, _ in self.chosen}
        options = [c for c in self.candidates if c not in used]
        if not options:
            raise RefineError("more skip slots than candidate layers")
        base_cost = self.cost(self.chosen) if self.chosen else 0.0
        self.cost.set_anchor(self.chosen)
        fresh: set[int] = set()

        def added_cost(c: int) -> float:
            fresh.add(c)
            self.costs[c] = self.cost(canonical(self.chosen + ((c, fraction),))) - base_cost
            return self.costs[c]

        if not self.lazy or not self.costs:
            best = min(options, key=added_cost)
        else:
            while True:
                best = min(options, key=lambda c: self.costs.get(c, -math.inf))
                if best in fresh:
                    break
                added_cost(best)
        self.chosen = canonical(self.chosen + ((best, fraction),))
        return self.chosen


def greedy_add(cost: SetCost, fractions: Sequence[float], candidates: Sequence[int],
               lazy: bool = True, costs: dict[int, float] | None = None) -> Slots:
    """Greedy set with these slot fractions (full slots first); `costs` receives the layers' latest added costs."""
    greedy = LazyGreedy(cost, candidates, lazy, costs=costs if costs is not None else {})
    for fraction in sorted(fractions, reverse=True):
        greedy.step(fraction)
    return greedy.chosen


def descend_from_starts(cost: SetCost, slots: Slots, candidates: Sequence[int], max_rounds: int = 20,
                        greedy_start: bool = True, extra_starts: dict[str, Slots] | None = None,
                        shortlist: int | None = DEFAULT_SHORTLIST) -> tuple[Slots, dict]:
    """Lazy greedy add (optional), then swap descent from the greedy set, from the given set and from each of
    `extra_starts` (named sets with the same slot fractions, e.g. the global plan's set when refining a class plan);
    keep the cheapest. Swaps try the `shortlist` layers the greedy pass measured cheapest (all with None).

    Returns (set, record): `initial_kl` (the given set's cost), `refined_kl`, `shortlist`, `candidates` and per start
    its layers, cost, refined cost and swaps (`starts`); costs rounded as records store them."""
    if not slots:
        raise RefineError("the plan skips no layer: nothing to refine")
    candidates = sorted(set(candidates) | {layer for layer, _ in slots})
    if len(candidates) < len(slots):
        raise RefineError(f"{len(slots)} skip slots but only {len(candidates)} candidate layers")
    fractions = [f for _, f in slots]
    costs: dict[int, float] = {}
    starts: dict[str, dict] = {}
    best: Slots | None = None

    def descend(name: str, start: Slots) -> None:
        nonlocal best
        alt, rounds = swap_descent(cost, start, candidates, max_rounds, shortlist if costs else None, costs)
        starts[name] = {"layers": [layer for layer, _ in canonical(start)], "kl": rounded(cost(start)),
                        "refined_kl": rounded(cost(alt)), "swaps": rounds}
        if best is None or cost(alt) < cost(best):
            best = alt

    initial = cost(slots)
    if greedy_start:  # the greedy set, not the profile-ranked one: a second descent would double the cost
        descend("greedy_add", greedy_add(cost, fractions, candidates, costs=costs))
        starts["plan"] = {"layers": [layer for layer, _ in canonical(slots)], "kl": rounded(initial)}
        if initial < cost(best):
            best = canonical(slots)
    else:
        descend("plan", canonical(slots))
    for name, start in (extra_starts or {}).items():
        start = canonical(start)
        if sorted(f for _, f in start) != sorted(fractions):
            continue  # a different slot shape would change the skip ratio
        candidates = sorted(set(candidates) | {layer for layer, _ in start})
        descend(name, start)
    record = {"initial_kl": rounded(initial), "refined_kl": rounded(cost(best)),
              "shortlist": shortlist if costs else None, "candidates": candidates, "starts": starts}
    return best, record


def grow_within_budget(cost: SetCost, candidates: Sequence[int], within: Callable[[Slots], bool],
                       fractions: Sequence[float] = BUDGET_FRACTIONS) -> tuple[Slots, list[Slots]]:
    """The largest set `within` allows: lazy-greedy whole layers while the sets stay within, then the layer that
    broke it at the largest of `fractions` that still fits. Returns (set, path): the path is every greedy prefix
    tried (the last one broke the budget unless every candidate fits), then the fractional set when one fits. The
    set is empty when no single layer fits."""
    greedy = LazyGreedy(cost, list(candidates))
    path: list[Slots] = []
    chosen: Slots = ()
    while len(chosen) < len(candidates):
        trial = greedy.step(1.0)
        path.append(trial)
        if not within(trial):
            break
        chosen = trial
    if len(chosen) < len(candidates) and path:
        cost.set_anchor(chosen)
        taken = {layer for layer, _ in chosen}
        nxt = next(layer for layer, _ in path[-1] if layer not in taken)  # the layer that broke the budget
        for fraction in fractions:
            trial = canonical(chosen + ((nxt, fraction),))
            if within(trial):
                chosen = trial
                path.append(trial)
                break
    return chosen, path


def all_sets(fractions: Sequence[float], candidates: Sequence[int], max_sets: int) -> list[Slots]:
    """Every set with these slot fractions over `candidates`: each combination of layers, and with fractional slots
    each choice of which chosen layer carries which fraction; in lexicographic order of the layers. Refuses more than
    `max_sets` sets."""
    fractions = sorted(fractions, reverse=True)
    k = len(fractions)
    if k == 0 or k > len(candidates):
        raise RefineError(f"cannot choose {k} layers out of {len(candidates)} candidates")
    per_combo = math.factorial(k) // math.prod(math.factorial(n) for n in Counter(fractions).values())
    total = math.comb(len(candidates), k) * per_combo  # distinct ways to hand the fractions to k chosen layers
    if total > max_sets:
        raise RefineError(f"exhaustive search needs {total} sets (> max_sets={max_sets}); lower the layer count")
    assignments = list(dict.fromkeys(itertools.permutations(fractions)))
    sets = (canonical(zip(combo, a)) for combo in itertools.combinations(candidates, k) for a in assignments)
    return list(dict.fromkeys(sets))


def exhaustive(cost: SetCost, fractions: Sequence[float], candidates: Sequence[int],
               max_sets: int) -> list[tuple[Slots, float]]:
    """Every set of `all_sets` with its cost, cheapest first (ties in enumeration order)."""
    return sorted(((s, cost(s)) for s in all_sets(fractions, candidates, max_sets)), key=lambda sc: sc[1])


def closest_to_target(measured: Sequence[tuple[float, float]], target: float, slack: float) -> tuple[int, bool]:
    """Among (ratio, cost) pairs, the index of the cheapest whose ratio is within `slack` of `target`, else of the
    ratio closest to it (ties: the first); and whether it was at the target."""
    at_target = [i for i, (ratio, _) in enumerate(measured) if abs(ratio - target) <= slack]
    if at_target:
        return min(at_target, key=lambda i: measured[i][1]), True
    return min(range(len(measured)), key=lambda i: abs(measured[i][0] - target)), False
