"""KL-measured refinement of static sets and the exhaustive oracle, on tiny models with the real runtime (the
searches alone, on synthetic costs: test_search.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import char_tokenizer
from tiny_models import tiny_model

from skipprofiler.evaluation.fidelity import dense_references, make_batches, measure_plan
from skipprofiler.plan.model import SkipPlan
from skipprofiler.fit.measure import SetEvaluator, calibration_references
from skipprofiler.fit.refine import RefineError, oracle_static, refine_static
from skipprofiler.fit.search import canonical, middle_layers


def _references(model, docs: int = 4, length: int = 20):
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(2, 96, (length,), generator=g).tolist() for _ in range(docs)]
    return dense_references(model, make_batches(tokens, ["x"] * docs, prompt_len=6, pad_id=0, batch_size=8))


def _model_with_heavy_layer(heavy: int, num_layers: int = 6):
    """A tiny Llama where one FFN dominates the stream: skipping it must cost far more KL than any other."""
    model = tiny_model("llama", num_layers=num_layers)
    with torch.no_grad():
        model.model.layers[heavy].mlp.down_proj.weight.mul_(40.0)
    return model


def test_oracle_measures_every_combination_and_returns_the_minimum():
    model = tiny_model("llama", num_layers=6)
    refs = _references(model)
    template = SkipPlan(mode="static")
    result = oracle_static(model, refs, template, [1.0, 1.0])
    assert result.evaluations == math.comb(len(middle_layers(6)), 2)
    kls = [kl for _, kl in result.ranking]
    assert kls == sorted(kls) and result.kl == kls[0]
    # the winner re-measured directly through the runtime gives the same KL
    sums, stats = measure_plan(model, refs, SkipPlan(mode="static", skip_layers=dict(result.slots)))
    assert sums.total_kl_mean() == pytest.approx(result.kl, rel=1e-6)
    assert stats["decided_skip_ratio"] == pytest.approx(2 / 6)


def test_oracle_with_a_fractional_slot_tries_each_carrier():
    model = tiny_model("llama", num_layers=5)
    result = oracle_static(model, _references(model), SkipPlan(mode="static"), [1.0, 0.5])
    assert result.evaluations == math.comb(3, 2) * 2
    assert sorted(f for _, f in result.slots) == [0.5, 1.0]
    with pytest.raises(RefineError, match="max_sets"):
        oracle_static(model, _references(model), SkipPlan(mode="static"), [1.0, 0.5], max_sets=3)


def test_refine_swaps_out_a_costly_layer_and_keeps_fractions():
    model = _model_with_heavy_layer(heavy=2)
    refs = _references(model)
    start = SkipPlan(mode="static", skip_layers={2: 1.0, 3: 0.5}, fit={"statistic": "mean residual cos"})
    refined = refine_static(model, None, start, references=refs)
    assert 2 not in refined.skip_layers
    assert sorted(refined.skip_layers.values()) == [0.5, 1.0]
    info = refined.fit["refine"]
    assert refined.fit["refined_kl"] < info["initial_kl"]
    assert refined.fit["statistic"] == "mean residual cos"  # the fitter's record is kept
    # the recorded KL is the measured KL of the returned set
    sums, _ = measure_plan(model, refs, refined)
    assert sums.total_kl_mean() == pytest.approx(refined.fit["refined_kl"], rel=1e-4)
    # and refinement reaches the exhaustive optimum on this small search space
    oracle = oracle_static(model, refs, SkipPlan(mode="static"), [1.0, 0.5])
    assert refined.fit["refined_kl"] <= oracle.kl * 1.15


def test_swap_descent_never_increases_kl():
    model = tiny_model("llama", num_layers=6)
    evaluate = SetEvaluator(model, _references(model), SkipPlan(mode="static"))
    from skipprofiler.fit.search import swap_descent

    start = canonical([(1, 1.0), (4, 1.0)])
    best, _ = swap_descent(evaluate, start, middle_layers(6), max_rounds=10)
    assert evaluate(best) <= evaluate(start)
    assert evaluate.evaluations >= 1 + 2 * 2  # every swap of the first round was measured


def test_refine_rejects_adaptive_plans_and_out_of_range_layers():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(RefineError, match="static"):
        refine_static(model, None, SkipPlan(mode="adaptive", tau=[0.9] * 4, max_skip=1), references=[])
    with pytest.raises(RefineError, match="4 layers"):
        refine_static(model, None, SkipPlan(mode="static", skip_layers={7: 1.0}), references=[])
    with pytest.raises(RefineError, match="nothing to refine"):
        refine_static(model, None, SkipPlan(mode="static"), references=_references(model))


def test_refine_plan_file_refines_each_class_on_its_own_windows():
    from skipprofiler.plan.model import PlanFile
    from skipprofiler.fit.measure import references_of_class
    from skipprofiler.fit.refine import refine_plan_file

    model = _model_with_heavy_layer(heavy=2)
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(2, 96, (20,), generator=g).tolist() for _ in range(6)]
    classes = ["a"] * 3 + ["b"] * 3
    refs = []
    for cls in ("a", "b"):  # calibration batches are per class, as calibration_references builds them
        idx = [i for i, c in enumerate(classes) if c == cls]
        refs += dense_references(model, make_batches([tokens[i] for i in idx], [cls] * 3, 6, 0, 8))
    start = {2: 1.0, 3: 1.0}
    plan_file = PlanFile(model={"name": "tiny"}, global_plan=SkipPlan(mode="static", skip_layers=dict(start)),
                         classes={c: SkipPlan(mode="static", skip_layers=dict(start)) for c in ("a", "b", "c")})
    warnings = refine_plan_file(model, None, plan_file, references=refs)
    assert warnings == ["class 'c': no calibration windows of this class, its plan is not refined"]
    assert plan_file.classes["c"].skip_layers == start and "refined_kl" not in plan_file.classes["c"].fit
    for name, own in (("a", references_of_class(refs, "a")), ("b", references_of_class(refs, "b"))):
        plan = plan_file.classes[name]
        assert 2 not in plan.skip_layers and plan.fit["refine"]["data"]["class"] == name
        sums, _ = measure_plan(model, own, plan)  # the recorded KL is measured on this class's windows only
        assert sums.total_kl_mean() == pytest.approx(plan.fit["refined_kl"], rel=1e-4)
        assert "global_plan" in plan.fit["refine"]["starts"]  # the global set is one of the search's starts
        global_on_own, _ = measure_plan(model, own, plan_file.global_plan)
        assert plan.fit["refined_kl"] <= global_on_own.total_kl_mean() * (1 + 1e-5)  # recorded to 6 digits
    sums, _ = measure_plan(model, refs, plan_file.global_plan)
    assert sums.total_kl_mean() == pytest.approx(plan_file.global_plan.fit["refined_kl"], rel=1e-4)


def test_a_class_keeps_the_global_set_unless_its_own_set_is_clearly_better():
    from skipprofiler.plan.model import PlanFile
    from skipprofiler.fit.refine import refine_plan_file

    model = _model_with_heavy_layer(heavy=2)
    g = torch.Generator().manual_seed(4)
    tokens = [torch.randint(2, 96, (20,), generator=g).tolist() for _ in range(3)]
    refs = dense_references(model, make_batches(tokens, ["a"] * 3, 6, 0, 8))
    start = {2: 1.0, 3: 1.0}

    def refined(min_class_gain: float) -> PlanFile:
        plan_file = PlanFile(model={"name": "tiny"}, global_plan=SkipPlan(mode="static", skip_layers=dict(start)),
                             classes={"a": SkipPlan(mode="static", skip_layers=dict(start))})
        refine_plan_file(model, None, plan_file, references=refs, refine_global=False,
                         min_class_gain=min_class_gain)
        return plan_file

    own = refined(0.0).classes["a"]  # any gain counts: the class search leaves the heavy layer
    assert 2 not in own.skip_layers and "kept_global_set" not in own.fit["refine"]
    assert own.fit["refined_kl"] < own.fit["refine"]["global_plan_kl"]
    kept = refined(1.0).classes["a"]  # demand a gain no set can reach (zero KL): the global set stays
    assert kept.skip_layers == start and kept.fit["refine"]["kept_global_set"]
    assert kept.fit["refined_kl"] == kept.fit["refine"]["global_plan_kl"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_prefix_reuse_measures_exactly_what_a_full_forward_measures(model_type):
    model = tiny_model(model_type, num_layers=6)
    refs = _references(model)
    reuse = SetEvaluator(model, refs, SkipPlan(mode="static"))
    full = SetEvaluator(model, refs, SkipPlan(mode="static"), reuse_prefix=False)
    anchor = ((2, 1.0), (3, 0.5))
    sets = [((4, 1.0),), anchor, ((1, 1.0), (4, 1.0))]
    reuse.set_anchor(anchor)
    sets += [anchor + ((4, 1.0),), ((2, 1.0), (4, 0.5)), ((3, 0.5), (4, 1.0))]  # near the anchor: start late
    for slots in sets:
        assert reuse(slots) == full(slots), slots
        assert reuse.ppl_ratio[canonical(slots)] == full.ppl_ratio[canonical(slots)]
    assert reuse.layers_run < full.layers_run  # and it ran fewer decoder layers
    from skipprofiler.arch.registry import resolve

    assert not any("forward" in layer.__dict__ for layer in resolve(model).layers)  # the hand-off patches are gone


def test_lazy_greedy_finds_the_same_set_as_plain_greedy_and_measures_fewer():
    from skipprofiler.fit.search import greedy_add

    model = _model_with_heavy_layer(heavy=3, num_layers=8)
    refs = _references(model)
    lazy = SetEvaluator(model, refs, SkipPlan(mode="static"))
    plain = SetEvaluator(model, refs, SkipPlan(mode="static"))
    fractions = [1.0, 1.0, 1.0, 0.5]
    lazy_set = greedy_add(lazy, fractions, middle_layers(8), lazy=True)
    plain_set = greedy_add(plain, fractions, middle_layers(8), lazy=False)
    assert 3 not in {layer for layer, _ in lazy_set}
    assert lazy(lazy_set) <= plain(plain_set) * 1.05
    assert lazy.evaluations < plain.evaluations


def test_budget_fit_takes_the_largest_greedy_prefix_within_the_budget():
    from skipprofiler.fit.refine import Budget, fit_budget_plan

    model = _model_with_heavy_layer(heavy=2, num_layers=8)
    refs = _references(model)
    template = SkipPlan(mode="static")
    heavy_kl = SetEvaluator(model, refs, template)(((2, 1.0),))
    plan = fit_budget_plan(model, None, template, Budget(max_kl=heavy_kl / 2), references=refs, gen_len=64)
    record = plan.fit["budget_fit"]
    assert record["kl"] <= heavy_kl / 2 and record["budget"] == {"max_kl": heavy_kl / 2}
    assert plan.skip_layers.get(2, 0.0) < 1.0 and len(plan.skip_layers) >= 2 and plan.fit["gen_len"] == 64
    whole = [step for step in record["path"] if all(isinstance(l, int) for l in step["layers"])]
    assert [len(step["layers"]) for step in whole] == list(range(1, len(whole) + 1))  # one layer per greedy step
    assert whole[-1]["kl"] > heavy_kl / 2  # the walk stopped at the first set over the budget
    # the recorded cost is what measuring the plan gives
    sums, _ = measure_plan(model, refs, plan)
    assert sums.total_kl_mean() == pytest.approx(record["kl"], rel=1e-5)
    assert plan.expected_skip_ratio == pytest.approx(sum(plan.skip_layers.values()) / 8, abs=1e-6)
    with pytest.raises(RefineError, match="within the budget"):
        fit_budget_plan(model, None, template, Budget(max_kl=1e-12), references=refs)


def test_calibration_references_read_chat_files_by_the_given_columns(tmp_path):
    """`export-plan --refine --data chats.jsonl --class-column topic` measures on the chats as `profile` reads them."""
    import json

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"topic": topic, "messages": [{"role": "user", "content": f"{topic} " * 30}]})
                             + "\n" for topic in ("rivers", "mills", "rivers")))
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    references = calibration_references(tiny_model("llama", num_layers=4, vocab_size=128), tokenizer, str(chats),
                                        prompt_len=8, window=64, class_column="topic")
    assert sorted(c for ref in references for c in ref.batch.classes) == ["mills", "rivers", "rivers"]
    assert all(int(ref.mask.sum()) > 0 for ref in references)
