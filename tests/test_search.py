"""The set searches of skipprofiler.fit.search on synthetic costs (no model): what each search finds, against brute force
where the space is small."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import pytest

from skipprofiler.fit.search import (RefineError, Slots, all_sets, canonical, closest_to_target, descend_from_starts,
                                 exhaustive, greedy_add, grow_within_budget, swap_descent)


@dataclass
class Synthetic:
    """A cost of a set from a plain function, memoised like SetEvaluator; records the anchors it was given."""

    function: Callable[[Slots], float]
    cache: dict[Slots, float] = field(default_factory=dict)
    anchors: list[Slots] = field(default_factory=list)

    def __call__(self, slots: Slots) -> float:
        key = canonical(slots)
        if key not in self.cache:
            self.cache[key] = self.function(key)
        return self.cache[key]

    def set_anchor(self, slots: Slots) -> None:
        self.anchors.append(canonical(slots))


WEIGHTS = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.3, 5: 0.7, 6: 0.2}


def additive(slots: Slots) -> float:
    return sum(WEIGHTS[layer] * f for layer, f in slots)


def best_by_brute_force(cost, fractions, candidates) -> float:
    return min(cost(canonical(zip(combo, perm))) for combo in itertools.combinations(candidates, len(fractions))
               for perm in itertools.permutations(fractions))


def pair_trap(slots: Slots) -> float:
    """Layer 1 alone is cheapest, but 1 with anything costs extra, and 2 + 3 together cost less than either with 1:
    greedy takes 1 first and is wrong for two slots."""
    layers = {layer for layer, _ in slots}
    cost = {1: 1.0, 2: 1.5, 3: 1.5, 4: 3.0}
    total = sum(cost[layer] for layer in layers)
    if 1 in layers and len(layers) > 1:
        total += 2.0
    if {2, 3} <= layers:
        total -= 1.0
    return total


@pytest.mark.parametrize("fractions", [[1.0], [1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5]])
@pytest.mark.parametrize("lazy", [True, False])
def test_greedy_on_an_additive_cost_finds_the_optimum(fractions, lazy):
    cost = Synthetic(additive)
    found = greedy_add(cost, fractions, sorted(WEIGHTS), lazy=lazy)
    assert sorted(f for _, f in found) == sorted(fractions)
    assert cost(found) == pytest.approx(best_by_brute_force(additive, fractions, sorted(WEIGHTS)))


def test_lazy_greedy_measures_fewer_sets_than_plain_greedy():
    lazy, plain = Synthetic(additive), Synthetic(additive)
    assert greedy_add(lazy, [1.0] * 3, sorted(WEIGHTS)) == greedy_add(plain, [1.0] * 3, sorted(WEIGHTS), lazy=False)
    assert len(lazy.cache) < len(plain.cache)


def test_swap_descent_repairs_a_set_where_greedy_is_wrong():
    cost = Synthetic(pair_trap)
    greedy = greedy_add(cost, [1.0, 1.0], [1, 2, 3, 4])
    assert {layer for layer, _ in greedy} >= {1}  # greedy took the cheapest single layer
    best, rounds = swap_descent(cost, greedy, [1, 2, 3, 4], max_rounds=10)
    assert best == ((2, 1.0), (3, 1.0)) and rounds >= 1
    assert cost(best) == best_by_brute_force(pair_trap, [1.0, 1.0], [1, 2, 3, 4]) < cost(greedy)
    assert greedy in cost.anchors  # each round tells the cost where the next sets are


def test_swap_descent_keeps_the_fractions_and_stops_at_a_local_optimum():
    cost = Synthetic(additive)
    best, rounds = swap_descent(cost, ((1, 1.0), (5, 0.5)), sorted(WEIGHTS), max_rounds=10)
    assert sorted(f for _, f in best) == [0.5, 1.0]
    assert cost(best) == pytest.approx(best_by_brute_force(additive, [1.0, 0.5], sorted(WEIGHTS)))
    assert swap_descent(cost, best, sorted(WEIGHTS), max_rounds=10) == (best, 0)


def test_descent_from_starts_keeps_the_cheapest_start_and_records_each():
    cost = Synthetic(pair_trap)
    best, record = descend_from_starts(cost, ((1, 1.0), (4, 1.0)), [1, 2, 3, 4],
                                       extra_starts={"other": ((2, 1.0), (4, 1.0)), "wrong shape": ((2, 0.5),)})
    assert best == ((2, 1.0), (3, 1.0)) and record["refined_kl"] == cost(best)
    assert record["initial_kl"] == cost(((1, 1.0), (4, 1.0)))
    assert list(record["starts"]) == ["greedy_add", "plan", "other"]  # a start of another shape is left out
    with pytest.raises(RefineError, match="nothing to refine"):
        descend_from_starts(cost, (), [1, 2])


def test_budget_search_takes_the_most_layers_within_the_budget():
    cost = Synthetic(additive)
    limit = 0.75  # 2 + 6 + 4 cost 0.6 and fit; adding 3 (0.5) breaks the budget, a quarter of it (0.125) fits
    chosen, path = grow_within_budget(cost, sorted(WEIGHTS), lambda s: cost(s) <= limit)
    assert cost(chosen) <= limit
    assert {layer for layer, f in chosen if f == 1.0} == {2, 4, 6}
    assert chosen == ((2, 1.0), (3, 0.25), (4, 1.0), (6, 1.0))  # 0.75 and 0.5 of layer 3 do not fit
    assert [len(s) for s in path] == [1, 2, 3, 4, 4] and cost(path[3]) > limit  # the prefix that broke it
    nothing, path = grow_within_budget(cost, sorted(WEIGHTS), lambda s: cost(s) <= 0.01)
    assert nothing == () and len(path) == 1
    everything, _ = grow_within_budget(cost, sorted(WEIGHTS), lambda s: True)
    assert len(everything) == len(WEIGHTS)


@pytest.mark.parametrize("fractions", [[1.0, 1.0], [1.0, 0.5], [1.0, 0.5, 0.25]])
def test_exhaustive_equals_brute_force(fractions):
    cost = Synthetic(pair_trap)
    ranking = exhaustive(cost, fractions, [1, 2, 3, 4], max_sets=1000)
    brute = {canonical(zip(combo, perm)) for combo in itertools.combinations([1, 2, 3, 4], len(fractions))
             for perm in itertools.permutations(fractions)}
    assert {s for s, _ in ranking} == brute and len(ranking) == len(brute)
    assert [c for _, c in ranking] == sorted(pair_trap(s) for s in brute)
    with pytest.raises(RefineError, match="max_sets"):
        exhaustive(cost, fractions, [1, 2, 3, 4], max_sets=len(brute) - 1)


def test_ties_are_broken_the_same_way_every_time():
    flat = Synthetic(lambda slots: 1.0)
    assert greedy_add(flat, [1.0, 1.0], [5, 3, 4]) == ((3, 1.0), (5, 1.0))  # earlier in the given order
    assert swap_descent(flat, ((3, 1.0),), [5, 3, 4], max_rounds=5) == (((3, 1.0),), 0)  # no strict gain, no move
    ranking = exhaustive(flat, [1.0, 0.5], [1, 2, 3], max_sets=100)
    assert [s for s, _ in ranking] == all_sets([1.0, 0.5], [1, 2, 3], 100)  # enumeration order
    assert ranking[0][0] == ((1, 1.0), (2, 0.5))
    assert closest_to_target([(0.30, 2.0), (0.26, 1.0), (0.24, 1.0)], 0.25, 0.025) == (1, True)
    assert closest_to_target([(0.5, 1.0), (0.0, 0.5)], 0.25, 0.025) == (0, False)  # equally far: the first


def test_closest_to_target_prefers_the_cheapest_at_the_target():
    measured = [(0.25, 3.0), (0.26, 1.0), (0.50, 0.1)]
    assert closest_to_target(measured, 0.25, 0.025) == (1, True)
    assert closest_to_target(measured, 0.45, 0.025) == (2, False)
