"""`evaluation.run.run_eval` on a tiny Llama with the real runtime: rows, baselines, oracle, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import char_tokenizer, write_corpus
from tiny_models import tiny_model

from skipprofiler.arch.flops import FlopModel
from skipprofiler.evaluation.blocks import DroppedLayers
from skipprofiler.evaluation import EvalConfig, EvalError
from skipprofiler.evaluation.baselines import (
    budget_slots,
    contiguous_window,
    paper_adaptive,
)
from skipprofiler.evaluation.run import run_eval
from skipprofiler.plan.model import PlanFile, SkipPlan
from skipprofiler.arch.registry import model_fingerprint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=6, vocab_size=128)
    data = write_corpus(tmp_path_factory.mktemp("data") / "heldout.jsonl.gz")
    return model, char_tokenizer(), str(data)


def _config(**kw) -> EvalConfig:
    base = dict(prompt_len=8, gen_len=32, docs_per_class=3, greedy_prompts=2, greedy_new_tokens=6, speed=False)
    base.update(kw)
    return EvalConfig(**base)


def test_plan_rows_have_the_documented_keys_and_exact_realized_ratio(setup):
    model, tok, data = setup
    plans = [("static", SkipPlan(mode="static", skip_layers={2: 1.0, 3: 0.5})),
             ("empty", SkipPlan(mode="static"))]
    result = run_eval(model, tok, plans, data, _config(speed=True, speed_repeats=5, speed_new_tokens=4))
    static, empty = result["plans"]
    for key in ("skip_ratio", "ppl", "ppl_dense", "kl_mean", "top1_agreement", "greedy_agreement", "speedup",
                "ideal_speedup", "per_class", "first_divergence_mean"):
        assert key in static, key
    assert static["skip_ratio"] == pytest.approx(1.5 / 6, abs=1e-9)  # fraction 0.5 alternates even-length runs
    assert static["kl_mean"] > 0 and static["ideal_speedup"] > 1
    assert empty["kl_mean"] == 0 and empty["skip_ratio"] == 0 and empty["greedy_agreement"] == 1.0
    assert static["ppl_dense"] == empty["ppl_dense"] == result["dense"]["ppl"]
    assert set(static["per_class"]) == {"prose", "code"}
    json.dumps(result, allow_nan=False)


def test_batch_decision_reaches_the_teacher_forced_measurement(setup):
    model, tok, data = setup
    # a threshold inside this model's cos range (0.98-1.0), passed by some rows and not others at a position: a
    # shared run starts only where every row of the batch passes, so shared decisions skip strictly less
    plan = SkipPlan(mode="adaptive", tau=[0.997] * 6, cold_start=1, cold_end=1, max_skip=2)
    results = {d: run_eval(model, tok, [("a", plan)], data, _config(greedy_prompts=0, batch_decision=d))
               for d in ("per_sequence", "shared")}
    per_seq, shared = (results[d]["plans"][0] for d in ("per_sequence", "shared"))
    assert results["shared"]["config"]["batch_decision"] == "shared"
    assert 0 < shared["skip_ratio"] < per_seq["skip_ratio"]


def test_class_plans_are_routed_by_label(setup):
    model, tok, data = setup
    fp = model_fingerprint(model)
    plan = PlanFile(model={"name": "tiny", "fingerprint": fp}, global_plan=SkipPlan(mode="static", skip_layers={2: 1.0}),
                    classes={"prose": SkipPlan(mode="static"), "code": SkipPlan(mode="static", skip_layers={2: 1.0})})
    result = run_eval(model, tok, [("pc", plan)], data, _config())
    glob, routed = result["plans"]
    assert routed["name"].startswith("pc [class plans")
    assert routed["per_class"]["prose"]["kl_mean"] == 0.0  # the prose plan skips nothing
    assert routed["per_class"]["code"]["kl_mean"] == pytest.approx(glob["per_class"]["code"]["kl_mean"])


def test_baselines_and_oracle_at_the_same_ratio(setup):
    model, tok, data = setup
    plans = [("static", SkipPlan(mode="static", skip_layers={2: 1.0, 3: 1.0}))]
    result = run_eval(model, tok, plans, data, _config(baselines=True, random_seeds=2, calibration_data=data))
    json.dumps(result, allow_nan=False)  # every row is finite JSON
    rows = {r["family"]: r for r in result["plans"]}
    assert {"random FFN", "contiguous window", "FFN-SkipLLM paper defaults", "ShortGPT layer drop",
            "oracle static", "ReplaceMe-style linear blocks"} <= set(rows)
    replaced = rows["ReplaceMe-style linear blocks"]  # whole blocks at about the static plan's decode FLOPs
    flops = FlopModel.of(model)
    block = flops.flops["attn_proj"] + flops.flops["ffn"] + flops.flops["attn_per_position"] * (8 + 16)
    per_token = flops.per_token(6, 8 + 16)
    gap = abs(replaced["decode_flops_saved_share"] - rows["static"]["decode_flops_saved_share"]) * per_token
    assert replaced["mode"] == "block_replacement" and gap <= block / 2 + 1e-6
    assert len(replaced["layers"]) == replaced["fit"]["count"] >= 1 and replaced["fit"]["tokens"] > 0
    for family in ("random FFN", "contiguous window", "oracle static"):
        assert rows[family]["skip_ratio"] == pytest.approx(2 / 6, abs=1e-6), family
    assert rows["oracle static"]["kl_mean"] <= rows["static"]["kl_mean"] + 1e-9
    assert rows["oracle static"]["kl_mean"] <= rows["contiguous window"]["kl_mean"] + 1e-9
    assert len(rows["random FFN"]["seeds"]) == 2
    assert "attention" in rows["ShortGPT layer drop"]["note"]


def test_dropped_layers_pass_input_through_and_restore(setup):
    model = setup[0]
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        with DroppedLayers(model, range(6)):  # every layer dropped: logits come from the embeddings alone
            all_dropped = model(ids).logits
        after = model(ids).logits
        direct = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    assert torch.equal(before, after)
    assert torch.allclose(all_dropped, direct, atol=1e-5)


def test_mismatched_plan_empty_data_and_nan_are_errors(setup, tmp_path):
    model, tok, data = setup
    with pytest.raises(EvalError, match="6 layers"):
        run_eval(model, tok, [("p", SkipPlan(mode="static", skip_layers={9: 1.0}))], data, _config())
    other = PlanFile(model={"name": "x", "fingerprint": dict(model_fingerprint(model), hidden_size=4096)},
                     global_plan=SkipPlan(mode="static", skip_layers={1: 1.0}))
    with pytest.raises(EvalError, match="another model"):
        run_eval(model, tok, [("p", other)], data, _config())
    short = write_corpus(tmp_path / "short.jsonl.gz", words=1)
    with pytest.raises(EvalError, match="held-out data") as info:
        run_eval(model, tok, [("p", SkipPlan(mode="static", skip_layers={1: 1.0}))], str(short), _config())
    assert "lower EvalConfig.gen_len" in str(info.value) and "--" not in str(info.value)  # the CLI: --gen-len
    broken = tiny_model("llama", num_layers=6, vocab_size=128)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(EvalError, match="non-finite"):
        run_eval(broken, tok, [("p", SkipPlan(mode="static", skip_layers={2: 1.0}))], data, _config())


def test_budget_window_and_flop_helpers():
    assert budget_slots(2.5, [4, 1, 7]) == ((1, 1.0), (4, 1.0), (7, 0.5))
    assert budget_slots(3.0, [4, 1, 7, 2]) == ((1, 1.0), (4, 1.0), (7, 1.0))
    assert contiguous_window(12, 3.0)[:3] == [4, 5, 6]
    plan = paper_adaptive(32, 4, 4096)
    assert (plan.cold_start, plan.cold_end, plan.warmup_tokens, plan.dense_every) == (5, 5, 64, 6)
    flops = FlopModel.of(tiny_model("llama", num_layers=4))
    assert flops.ideal_speedup(0.0, 16) == 1.0
    assert 1.0 < flops.ideal_speedup(0.25, 16) < flops.ideal_speedup(0.5, 16)
    assert not math.isnan(flops.ideal_speedup(1.0, 16))


def test_search_reference_searches_held_out_windows_and_is_measured_like_a_plan(setup):
    model, tok, data = setup
    plan = SkipPlan(mode="static", skip_layers={1: 1.0, 4: 1.0})
    result = run_eval(model, tok, [("static", plan)], data,
                      _config(greedy_prompts=0, oracle=False, search_reference=True, search_docs_per_class=2,
                              search_gen_len=16))
    static, reference = result["plans"]
    assert reference["family"] == "search reference" and reference["kind"] == "reference"
    assert reference["skip_ratio"] == pytest.approx(static["skip_ratio"])  # same slots, other layers
    assert reference["search"]["evaluations"] > 0 and "held-out windows" in reference["note"]
    assert len(reference["layers"]) == 2 and all(1 <= l <= 4 for l, _ in reference["layers"])


def test_router_row_reports_how_often_the_runtime_router_picks_the_true_class():
    """The "routed by router" row runs the plan as `prompt_class="auto"` does; its router accuracy must equal the
    runtime's own routing of each held-out prompt, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skipprofiler import demo
    from skipprofiler.evaluation.data import prepare_data
    from skipprofiler.plan import load_plan
    from skipprofiler.runtime import apply_plan

    model = AutoModelForCausalLM.from_pretrained(demo.model_path(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo.model_path())
    plan = load_plan(Path(__file__).parents[1] / "plans" / "demo-perclass-25.yaml")
    config = EvalConfig(prompt_len=16, gen_len=16, docs_per_class=2, greedy_prompts=0, speed=False)
    result = run_eval(model, tokenizer, [("pc", plan)], None, config)
    rows = {r["name"]: r for r in result["plans"]}
    routed = rows["pc [class plans, routed by router]"]
    assert "router_accuracy" not in rows["pc [class plans, routed by label]"]

    data = prepare_data(model, tokenizer, None, config)
    right = {}
    with apply_plan(model, plan, prompt_class="auto") as handle, torch.inference_mode():
        for cls in data.classes:
            hits = total = 0
            for ref in data.of_class(cls):
                for row in range(ref.batch.input_ids.shape[0]):
                    model(input_ids=ref.batch.input_ids[row:row + 1, :ref.batch.prompt_len])
                    hits += handle.chosen_classes == [cls]
                    total += 1
            right[cls] = hits / total
    assert routed["router_accuracy_per_class"] == pytest.approx(right, abs=1e-6)
    assert set(right) == set(plan.classes)


def test_evaluate_plans_reports_every_stage_until_done(setup):
    """The library's progress: the dense pass, each plan and every baseline / oracle stage, each counted to its total."""
    from skipprofiler import evaluate_plans

    model, tok, data = setup
    events = []
    plans = [("static", SkipPlan(mode="static", skip_layers={2: 1.0, 3: 1.0}))]
    result = evaluate_plans(model, tok, plans, _config(data=data, baselines=True, random_seeds=1),
                            on_progress=events.append)
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages[:3] == ["dense pass", "dense greedy", "static"]
    assert {"random seed 0", "contiguous window", "ShortGPT block influence", "oracle search"} <= set(stages)
    assert {r["name"] for r in result["plans"]} - {"random FFN (mean of 1 seeds)"} <= set(stages)
    for stage in stages:
        mine = [e for e in events if e.stage == stage]
        assert [e.done for e in mine] == sorted(e.done for e in mine), stage
        assert mine[-1].finished and mine[-1].done == mine[-1].total, stage
    plan_steps = [e for e in events if e.stage == "static"][-1].total
    assert plan_steps == 2 + 2  # two classes, two greedy prompts (speed off)


def test_sweep_fits_and_evaluates_static_and_adaptive_plans_at_each_target(setup):
    from skipprofiler import evaluate_plans, profile_corpus
    from skipprofiler.evaluation import families
    from skipprofiler.profile import ProfileSettings
    from skipprofiler.evaluation.report import comparisons, results_markdown

    model, tok, data = setup
    profile = profile_corpus(model, tok, ProfileSettings(data=[data], max_tokens=600, seq_len=64, generate=8))
    config = _config(data=data, sweep=[0.2, 0.3], sweep_refine=False, oracle=True, oracle_targets=[0.2])
    result = evaluate_plans(model, tok, [], config, profile=profile)
    assert result["sweep"]["targets"] == [0.2, 0.3] and result["sweep"]["refine"] is False
    rows = {(r["family"], r["target"]): r for r in result["plans"]}
    fitted = (families.FITTED_STATIC, families.FITTED_ADAPTIVE)
    assert set(rows) == {(family, target) for family in fitted for target in (0.2, 0.3)} | {(families.ORACLE, 0.2)}
    for target in (0.2, 0.3):  # static plans skip the same layers at every position: their fitted ratio, measured
        assert rows[("fitted static", target)]["skip_ratio"] == pytest.approx(target, abs=0.02)

    # sweep -> report: without refining, the static plan is not called refined anywhere
    lines = comparisons(json.loads(json.dumps(result)), target=0.2)
    static = rows[(families.FITTED_STATIC, 0.2)]
    assert lines[0].startswith(f"- fitted static KL {static['kl_mean']:.4f} = ") and "the oracle's" in lines[0]
    assert lines[-1].startswith("- held-out perplexity increase of the fitted static plan: ")
    assert "refined" not in results_markdown(result, [], "skipprof eval --sweep 0.2,0.3 --no-refine")
