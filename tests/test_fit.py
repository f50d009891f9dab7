"""Fitting: static and adaptive plans hit the target ratio, cold layers come from the data, the simulation equals
plan.py's rule, per-class fallback, the router."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import BASE_CURVE, AdaptiveRule, synthetic_profile
from hypothesis import given, settings
from hypothesis import strategies as st

from skipprofiler.fit.from_profile import (
    FitError,
    FitSettings,
    adaptive_ratio_on,
    fit_adaptive,
    fit_plan_file,
    fit_router,
    fit_static,
    simulate_adaptive,
    static_skip_ratio,
)
from skipprofiler.plan.model import SkipPlan
from skipprofiler.plan import dump_plan, load_plan
from skipprofiler.profile import Profile


@pytest.fixture(scope="module")
def two_class_profile() -> Profile:
    code = tuple(min(0.99, c + (0.03 if 2 <= l <= 5 else -0.03)) if l < 11 else c for l, c in enumerate(BASE_CURVE))
    return synthetic_profile({"fiction": BASE_CURVE, "code": code})


@pytest.mark.parametrize("target", [0.1, 0.25, 0.35])
@pytest.mark.parametrize("dense_every,warmup", [(0, 0), (6, 8)])
def test_static_hits_target_and_takes_most_saturated_layers(two_class_profile, target, dense_every, warmup):
    plan = fit_static(two_class_profile, FitSettings(target, dense_every=dense_every, warmup_tokens=warmup),
                      cls="fiction")
    assert abs(plan.expected_skip_ratio - target) <= 0.01
    assert plan.expected_skip_ratio == pytest.approx(static_skip_ratio(plan, 12, plan.fit["horizon"]), abs=1e-6)
    whole = [l for l, f in plan.skip_layers.items() if f == 1.0]
    ranking = sorted(range(1, 11), key=lambda l: -BASE_CURVE[l])
    assert sorted(whole) == sorted(ranking[:len(whole)])  # the most saturated layers first
    assert 0 not in plan.skip_layers and 11 not in plan.skip_layers  # cold
    assert (plan.warmup_tokens, plan.dense_every) == (warmup, dense_every)


def test_static_ratio_counts_exactly_what_plan_py_skips():
    plan = SkipPlan("static", warmup_tokens=5, dense_every=6, skip_layers={2: 1.0, 4: 0.5, 7: 0.37})
    horizon = 600
    skipped = sum(len(plan.static_layers_at(d)) for d in range(5, 5 + horizon))
    assert static_skip_ratio(plan, 10, horizon) == skipped / (horizon * 10)


# (rows [1..6, L] of float32 cosines, tau [L], cold_start, cold_end, max_skip) for L in 2..9
ADAPTIVE_CASES = st.integers(2, 9).flatmap(lambda L: st.tuples(
    st.lists(st.lists(st.floats(-1, 1, width=32), min_size=L, max_size=L), min_size=1, max_size=6),
    st.lists(st.floats(-1, 1), min_size=L, max_size=L), st.integers(0, L), st.integers(0, L), st.integers(0, L)))


@settings(max_examples=200, deadline=None)
@given(ADAPTIVE_CASES)
def test_simulation_equals_the_rule(case):
    rows, tau, cold_start, cold_end, max_skip = case
    L = len(tau)
    cold_end = min(cold_end, L - cold_start)
    rows = np.asarray(rows, np.float32)
    skipped, _ = simulate_adaptive(rows, np.asarray(tau), cold_start, cold_end, max_skip)
    rule = AdaptiveRule(L, tau, cold_start, cold_end, max_skip)
    assert skipped.tolist() == [rule.skipped_of(r) for r in rows]


@settings(max_examples=100, deadline=None)
@given(ADAPTIVE_CASES)
def test_a_shared_group_is_simulated_as_its_minimum_row(case):
    group, tau, cold_start, cold_end, max_skip = case
    cold_end = min(cold_end, len(tau) - cold_start)
    group = np.asarray(group, np.float32)
    skipped, _ = simulate_adaptive(group.min(axis=0)[None], np.asarray(tau), cold_start, cold_end, max_skip)
    assert skipped[0] == AdaptiveRule(len(tau), tau, cold_start, cold_end, max_skip).skipped_of(group)


def test_shared_fit_hits_the_target_for_its_batch_size(two_class_profile):
    settings_ = FitSettings(0.25, mode="adaptive", batch_decision="shared", batch_size=4).resolve()
    plan = fit_adaptive(two_class_profile, settings_)
    assert abs(plan.expected_skip_ratio - 0.25) <= 0.01
    assert plan.batch_decision == "shared" and plan.fit["batch_size"] == 4
    assert adaptive_ratio_on(two_class_profile, plan, None) == pytest.approx(plan.expected_skip_ratio, abs=1e-6)
    alone = SkipPlan(**{**vars(plan), "batch_decision": "per_sequence"})
    assert adaptive_ratio_on(two_class_profile, alone, None) > 0.25 + 0.01  # lower tau: rows alone fire more often
    per_sequence = fit_adaptive(two_class_profile, FitSettings(0.25, mode="adaptive").resolve())
    assert per_sequence.batch_decision == "per_sequence" and "batch_size" not in per_sequence.fit


@pytest.mark.parametrize("target", [0.1, 0.25, 0.35])
@pytest.mark.parametrize("tau_mode", ["global", "per-layer"])
def test_adaptive_hits_target(two_class_profile, target, tau_mode):
    settings_ = FitSettings(target, mode="adaptive", tau_mode=tau_mode).resolve()
    plan = fit_adaptive(two_class_profile, settings_)
    assert abs(plan.expected_skip_ratio - target) <= 0.01
    assert (plan.dense_every, plan.warmup_tokens) == (6, 4)  # paper defaults: every 6th dense, gen_len 256 // 64
    assert plan.fit["gen_len"] == 256 and plan.fit["horizon"] == 256 - 4
    assert all(-1.0 <= t <= 1.0 for t in plan.tau) and len(plan.tau) == 12
    assert plan.cold_end >= 1 and plan.cold_start >= 1 and plan.max_skip >= 1
    assert plan.fit["k_search"] and plan.fit["eligible_share"] == pytest.approx(5 / 6, abs=1e-3)


def test_cold_layers_follow_the_data():
    # layers 0-3 never saturated here; in the second profile layer 1-3 are saturated too
    cold_first = (0.5, 0.55, 0.6, 0.62, 0.97, 0.975, 0.98, 0.975, 0.97, 0.96, 0.6)
    hot_first = (0.5, 0.97, 0.975, 0.97) + cold_first[4:]
    plan_a = fit_adaptive(synthetic_profile({"x": cold_first}), FitSettings(0.2, mode="adaptive", dense_every=0,
                                                                              warmup_tokens=0))
    plan_b = fit_adaptive(synthetic_profile({"x": hot_first}), FitSettings(0.2, mode="adaptive", dense_every=0,
                                                                             warmup_tokens=0))
    assert plan_a.cold_start == 4 and plan_a.cold_end == 1
    assert plan_b.cold_start < 4
    static_a = fit_static(synthetic_profile({"x": cold_first}), FitSettings(0.2))
    assert min(static_a.skip_layers) >= 4 and set(static_a.fit["cold_layers"]) >= {0, 1, 2, 3, 10}


def test_unreachable_target_is_a_clear_error():
    profile = synthetic_profile({"x": (0.5, 0.97, 0.97, 0.5)})
    with pytest.raises(FitError, match="out of reach.*lower FitSettings.target or FitSettings.cold_floor$"):
        fit_static(profile, FitSettings(0.9))
    with pytest.raises(FitError, match="out of reach.*lower FitSettings.target, FitSettings.dense_every=0 or "
                                      "FitSettings.cold_floor$"):
        fit_adaptive(profile, FitSettings(0.9, mode="adaptive", dense_every=0, warmup_tokens=0))
    with pytest.raises(FitError, match=r"\(0, 1\)"):
        FitSettings(1.5).resolve()


def test_per_class_plans_fallback_and_router(two_class_profile):
    result = fit_plan_file(two_class_profile, FitSettings(0.25), per_class=True)
    plan_file = result.plan_file
    assert set(plan_file.classes) == {"fiction", "code"}
    assert plan_file.classes["fiction"].skip_layers != plan_file.classes["code"].skip_layers
    assert all(abs(p.expected_skip_ratio - 0.25) <= 0.01 for p in plan_file.classes.values())
    assert plan_file.router is not None and plan_file.router.heldout_accuracy == 1.0
    assert plan_file.router.layer == 6 and len(plan_file.router.centroids[0]) == 8
    assert load_plan(dump_plan(plan_file)) == plan_file  # the fitted file is valid and round-trips
    assert plan_file.provenance["tokens"]["decode"] == 3000

    sparse = synthetic_profile({"fiction": BASE_CURVE, "code": BASE_CURVE}, tokens={"code": 40})
    result = fit_plan_file(sparse, FitSettings(0.25, mode="adaptive"), per_class=True)
    assert result.plan_file.classes["code"].fit["fallback"] == "global"
    assert any("class 'code' falls back to the global plan: 40 decode tokens < FitSettings.min_class_tokens="
               in w for w in result.warnings)
    assert result.plan_file.classes["code"].tau == result.plan_file.global_plan.tau
    with pytest.raises(FitError, match="unknown class 'poetry'"):
        fit_plan_file(sparse, FitSettings(0.25), classes=["poetry"])


def test_pooled_fit_weights_classes_by_tokens():
    # the same reservoir size per class, but "b" has 9x the tokens: the pooled static ranking must follow "b"
    a = (0.5, 0.97, 0.96, 0.90, 0.90, 0.5)
    b = (0.5, 0.90, 0.90, 0.96, 0.97, 0.5)
    profile = synthetic_profile({"a": a, "b": b}, tokens={"a": 1000, "b": 9000}, reservoir=1000)
    plan = fit_adaptive(profile, FitSettings(0.15, mode="adaptive", dense_every=0, warmup_tokens=0, max_skip=1))
    by_class = fit_plan_file(profile, FitSettings(0.15, mode="adaptive", dense_every=0, warmup_tokens=0,
                                                  max_skip=1)).plan_file.global_plan.fit["class_skip_ratio"]
    weighted = (1000 * by_class["a"] + 9000 * by_class["b"]) / 10000
    assert weighted == pytest.approx(plan.expected_skip_ratio, abs=1e-4)


def test_router_needs_documents_and_norm_gain_comes_from_stream_gain(two_class_profile):
    one_doc = synthetic_profile({"a": BASE_CURVE, "b": BASE_CURVE}, docs=1)
    router, why = fit_router(one_doc)
    assert router is None and "fewer than 2 documents" in why
    plan = fit_static(two_class_profile, FitSettings(0.25, compensation="norm_ratio"))
    expected = two_class_profile.layer_stats("stream_gain", "decode")["mean"]
    assert plan.norm_gain == pytest.approx(list(expected), abs=1e-6)
    assert all(1.0 <= g <= 1.1 for g in plan.norm_gain)


def test_prompt_only_profile_fits_on_prompt_tokens():
    profile = synthetic_profile({"x": BASE_CURVE}, regimes=("prompt",))
    result = fit_plan_file(profile, FitSettings(0.2))
    assert result.plan_file.global_plan.fit["regime"] == "prompt"
    assert any("no decode tokens" in w for w in result.warnings)


@pytest.mark.slow
def test_fitted_static_plan_matches_the_runtime_count():
    """The expected ratio is what apply_plan really skips (teacher-forced decode positions on a tiny model)."""
    import torch
    from tiny_models import tiny_model

    from skipprofiler.runtime import apply_plan

    model = tiny_model("llama", num_layers=4)
    plan = SkipPlan("static", warmup_tokens=2, dense_every=3, skip_layers={1: 1.0, 2: 0.4})
    prompt, decode = 4, 2 + 60
    ids = torch.randint(2, 96, (1, prompt + decode))
    with apply_plan(model, plan) as handle, handle.decode_from(prompt), torch.no_grad():
        model(ids)
        stats = handle.stats()
    assert stats["decode_positions"] == 60
    assert stats["decided_skip_ratio"] == pytest.approx(static_skip_ratio(plan, 4, horizon=60), abs=1e-12)
    assert math.isclose(static_skip_ratio(plan, 4, horizon=60) * 60 * 4, stats["decided_skips"])


def test_gen_len_sets_warmup_horizon_and_refuses_a_warmup_covering_it(two_class_profile):
    plan = fit_adaptive(two_class_profile, FitSettings(0.25, mode="adaptive", gen_len=640).resolve())
    assert plan.warmup_tokens == 10 and plan.fit["gen_len"] == 640 and plan.fit["horizon"] == 630
    static = fit_static(two_class_profile, FitSettings(0.25, gen_len=100, dense_every=6))
    assert static.fit["horizon"] == 100 and static.warmup_tokens == 0
    with pytest.raises(FitError, match="covers the whole generation length"):
        FitSettings(0.25, mode="adaptive", gen_len=64, warmup_tokens=64).resolve()
