"""Eval rows and decode benchmarks of neuron plans (issue 27 item 6): the FFN FLOPs saved net of substitutes are the
runtime's count, the decode FLOPs saved and the FLOP ideal come from arch.flops for whole-FFN skips and neuron subsets
alike (checked against hand counts), a mixed plan sums both, and `skipprof eval` runs a saved neuron plan file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import char_tokenizer, write_corpus
from tiny_models import tiny_model

from skipprofiler.arch.flops import FlopModel, token_flops
from skipprofiler.arch.greedy import greedy_decode
from skipprofiler.arch.registry import model_fingerprint
from skipprofiler.evaluation import EvalConfig
from skipprofiler.evaluation.bench import Arm, benchmark_decode
from skipprofiler.evaluation.run import run_eval
from skipprofiler.plan import save_plan
from skipprofiler.plan.model import LinearMaps, NeuronSubsets, PlanFile, SkipPlan
from skipprofiler.runtime import apply_plan

SKIPPROF = Path(sys.executable).parent / "skipprof"
L, HIDDEN, WIDTH = 6, 32, 48  # tiny llama: 6 layers, hidden 32, FFN width 48 (gate, up, down; no biases)
KEEP = int(round(0.7 * WIDTH))


def neuron_plan(fill: str = "mean", keep: int = KEEP, layers=range(L), **kw) -> SkipPlan:
    """Keep the first `keep` neurons of every (listed) layer's FFN (a zero mean bias with fill mean)."""
    tensors = {}
    for layer in layers:
        tensors[f"{layer}.kept"] = np.arange(keep, dtype=np.int64)
        if fill == "mean":
            tensors[f"{layer}.bias"] = np.zeros(HIDDEN, np.float32)
    return SkipPlan(mode="static", neurons=NeuronSubsets(fill=fill, tensors=tensors, intermediate_size=WIDTH), **kw)


def narrowed_flops_saved(fill: str, keep: int = KEEP) -> float:
    """By hand: a dropped neuron is one row of gate and of up and one column of down (2 x HIDDEN multiply-adds each);
    the mean bias costs HIDDEN adds per narrowed row."""
    return (WIDTH - keep) * 3 * 2 * HIDDEN - (HIDDEN if fill == "mean" else 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama", num_layers=L, vocab_size=128)
    data = write_corpus(tmp_path_factory.mktemp("data") / "heldout.jsonl.gz")
    return model, char_tokenizer(), str(data)


def _config(**kw) -> EvalConfig:
    base = dict(prompt_len=8, gen_len=32, docs_per_class=3, greedy_prompts=1, greedy_new_tokens=4, speed=False)
    base.update(kw)
    return EvalConfig(**base)


def _runtime_share(model, plan: SkipPlan) -> float:
    with apply_plan(model, plan) as handle:
        greedy_decode(model, torch.tensor([[5, 6, 7, 8]]), 9)  # 8 decode positions: fraction 0.5 exactly
        stats = handle.stats()
    assert stats["narrowed_rows"] > 0 or plan.neurons is None
    return stats["ffn_flops_saved_share"]


def test_hand_count_of_the_tiny_model_matches_arch_flops(setup):
    model, _, _ = setup
    f = token_flops(model)
    assert f["ffn"] == 3 * 2 * HIDDEN * WIDTH and f["layers"] == L


@pytest.mark.parametrize("fill", ["none", "mean"])
def test_neuron_row_counts_the_runtimes_ffn_flops_and_the_decode_flops_by_hand(setup, fill):
    model, tok, data = setup
    plan = neuron_plan(fill)
    config = _config()
    row = run_eval(model, tok, [("neurons", plan)], data, config)["plans"][0]
    ffn = token_flops(model)["ffn"]
    share = narrowed_flops_saved(fill) / ffn
    assert row["ffn_flops_saved_share"] == pytest.approx(share, rel=1e-5)
    assert row["ffn_flops_saved_share"] == pytest.approx(_runtime_share(model, plan), rel=1e-5)
    # decode FLOPs: every layer's attention projections, attention over the cache at the eval's context, FFN; LM head
    f = token_flops(model)
    dense = L * (f["attn_proj"] + f["attn_per_position"] * config.flop_context + f["ffn"]) + f["lm_head"]
    expected = L * narrowed_flops_saved(fill) / dense
    assert row["decode_flops_saved_share"] == pytest.approx(expected, rel=1e-5)
    assert row["ideal_speedup"] == pytest.approx(dense / (dense - L * narrowed_flops_saved(fill)), rel=1e-5)
    # whole-FFN skips keep their meaning: none decided, none saved; every decode row of every layer narrowed
    assert row["skip_ratio"] == row["saved_share"] == 0.0
    assert row["narrowed_share"] == 1.0
    assert row["substitute_cost_share"] == 0.0
    assert row["neurons"] == {"fill": fill, "intermediate_size": WIDTH, "widths": [[l, KEEP] for l in range(L)]}
    assert not any("skipped nothing" in w for w in row["warnings"])
    assert row["kl_mean"] > 0
    json.dumps(row, allow_nan=False)


def test_mixed_plan_sums_whole_skips_and_narrowed_layers(setup):
    model, tok, data = setup
    # layer 2 skipped whole, layer 3 on every other decode position (narrowed on the rest), the other four narrowed
    whole = {2: 1.0, 3: 0.5}
    plan = neuron_plan("mean", layers=[0, 1, 3, 4, 5], skip_layers=whole)
    skip_row, neuron_row, mixed_row = run_eval(
        model, tok, [("skips", SkipPlan(mode="static", skip_layers=whole)), ("neurons", neuron_plan("mean")),
                     ("mixed", plan)], data, _config())["plans"]
    ffn = token_flops(model)["ffn"]
    expected = (1.5 * ffn + 4.5 * narrowed_flops_saved("mean")) / (L * ffn)
    assert mixed_row["ffn_flops_saved_share"] == pytest.approx(expected, rel=1e-5)
    assert mixed_row["ffn_flops_saved_share"] == pytest.approx(
        skip_row["ffn_flops_saved_share"] + 0.75 * neuron_row["ffn_flops_saved_share"], rel=1e-5)
    assert skip_row["ffn_flops_saved_share"] == pytest.approx(1.5 / L, rel=1e-6)
    assert mixed_row["skip_ratio"] == mixed_row["saved_share"] == pytest.approx(1.5 / L, rel=1e-6)  # whole skips only
    assert mixed_row["narrowed_share"] == pytest.approx(4.5 / L, rel=1e-6)
    flops = FlopModel.of(model)
    context = _config().flop_context
    for row in (skip_row, neuron_row, mixed_row):  # one FLOP model for every kind
        saved = flops.decode_saved_share(row["ffn_flops_saved_share"], context)
        assert row["decode_flops_saved_share"] == pytest.approx(saved, rel=1e-5)
        assert row["ideal_speedup"] == pytest.approx(flops.ideal_speedup(row["ffn_flops_saved_share"], context),
                                                     rel=1e-5)
    assert skip_row["decode_flops_saved_share"] < mixed_row["decode_flops_saved_share"]
    assert neuron_row["decode_flops_saved_share"] < mixed_row["decode_flops_saved_share"]


def linear_maps(layers) -> LinearMaps:
    rng = np.random.default_rng(1)
    tensors = {}
    for layer in layers:
        tensors[f"{layer}.weight"] = (rng.standard_normal((HIDDEN, HIDDEN)) * 0.01).astype(np.float32)
        tensors[f"{layer}.bias"] = np.zeros(HIDDEN, np.float32)
    return LinearMaps(None, tensors)


def test_linear_maps_are_counted_net_alone_and_beside_neuron_subsets(setup):
    model, tok, data = setup
    whole = {2: 1.0, 3: 0.5}
    linear = SkipPlan(mode="static", compensation="linear", skip_layers=whole, linear=linear_maps([2, 3]))
    mixed = neuron_plan("mean", layers=[0, 1, 3, 4, 5], compensation="linear", skip_layers=whole,
                        linear=linear_maps([2, 3]))
    linear_row, mixed_row = run_eval(model, tok, [("linear", linear), ("mixed", mixed)], data, _config())["plans"]
    ffn, map_flops = token_flops(model)["ffn"], 2 * HIDDEN * HIDDEN + HIDDEN
    assert linear_row["substitute_cost_share"] == pytest.approx(map_flops / ffn, rel=1e-5)
    assert linear_row["ffn_flops_saved_share"] == pytest.approx(1.5 * (ffn - map_flops) / (L * ffn), rel=1e-5)
    assert linear_row["ffn_flops_saved_share"] == pytest.approx(
        linear_row["saved_share"] * (1 - linear_row["substitute_cost_share"]), rel=1e-5)
    expected = (1.5 * (ffn - map_flops) + 4.5 * narrowed_flops_saved("mean")) / (L * ffn)
    assert mixed_row["ffn_flops_saved_share"] == pytest.approx(expected, rel=1e-5)
    for plan, row in ((linear, linear_row), (mixed, mixed_row)):
        assert row["ffn_flops_saved_share"] == pytest.approx(_runtime_share(model, plan), rel=1e-5)


def test_baselines_of_a_neuron_plan_save_its_ffn_flops(setup):
    model, tok, data = setup
    rows = run_eval(model, tok, [("neurons", neuron_plan("mean", keep=24))], data,
                    _config(baselines=True, random_seeds=1, oracle=False, search_reference=False))["plans"]
    first = rows[0]
    contiguous = next(r for r in rows if r["family"] == "contiguous window")
    # whole-FFN baselines at the FFN FLOPs the neuron plan saves (0.497 x 6 layers = 2.98 FFNs: 2 whole and one
    # fraction, realized to one of the 32 decode positions)
    assert contiguous["ffn_flops_saved_share"] == pytest.approx(first["ffn_flops_saved_share"], abs=1 / (32 * L))
    assert "neurons" not in contiguous and contiguous["narrowed_share"] == 0.0
    # ReplaceMe-style: as many whole blocks as save the neuron plan's decode FLOPs (same accounting), to one block
    replaceme = next(r for r in rows if r["family"] == "ReplaceMe-style linear blocks")
    flops, context = FlopModel.of(model), _config().flop_context
    block_share = flops.block(context) / flops.per_token(L, context)
    assert abs(replaceme["decode_flops_saved_share"] - first["decode_flops_saved_share"]) <= block_share


def test_bench_ideal_of_a_neuron_plan_is_the_hand_count(setup):
    model, _, _ = setup
    plan = neuron_plan("mean")
    bench = benchmark_decode(model, [Arm("dense", None), Arm("neurons", plan)], batch=1, prompt_tokens=4,
                             new_tokens=5, repeats=5)
    dense, narrowed = bench.results
    positions = narrowed.stats["decode_positions"]
    assert positions == 4  # the forwards after the prompt's
    assert narrowed.dense_flops == dense.dense_flops == dense.plan_flops
    saved = positions * L * narrowed_flops_saved("mean")
    assert narrowed.dense_flops - narrowed.plan_flops == pytest.approx(saved, rel=1e-9)
    rows = bench.rows()
    assert rows[1]["ffn_flops_saved_share"] == pytest.approx(narrowed_flops_saved("mean") / token_flops(model)["ffn"])
    assert rows[1]["ideal_speedup"] == pytest.approx(dense.dense_flops / (dense.dense_flops - saved), rel=1e-9)
    assert rows[1]["narrowed_ratio"] == 1.0 and rows[1]["saved_ratio"] == 0.0
    assert rows[1]["measured_over_ideal"] == pytest.approx(rows[1]["speedup"] / rows[1]["ideal_speedup"])
    assert "FFN FLOPs saved" in bench.table()


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama", num_layers=L, vocab_size=128)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    plan = PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)}, global_plan=neuron_plan("mean"))
    path = save_plan(plan, root / "neurons.yaml")
    return root, path, write_corpus(root / "heldout.jsonl.gz"), model


def test_cli_evaluates_a_saved_neuron_plan_file(saved_plan, tmp_path):
    root, path, data, model = saved_plan
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [str(SKIPPROF), "eval", str(root / "model"), str(path), "--data", str(data), "--out", str(out), "--no-speed",
         "--prompt-len", "8", "--gen-len", "32", "--docs-per-class", "3", "--greedy-prompts", "1",
         "--greedy-new-tokens", "4"], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())["plans"][0]
    assert row["ffn_flops_saved_share"] == pytest.approx(narrowed_flops_saved("mean") / token_flops(model)["ffn"],
                                                         rel=1e-5)
    assert row["neurons"]["widths"] == [[l, KEEP] for l in range(L)]
    assert row["decode_flops_saved_share"] > 0 and row["ideal_speedup"] > 1


def test_eval_speed_run_of_a_neuron_plan_counts_its_narrowed_rows(setup):
    model, tok, data = setup
    row = run_eval(model, tok, [("neurons", neuron_plan("mean"))], data,
                   _config(speed=True, speed_repeats=5, speed_new_tokens=4))["plans"][0]
    assert row["speed_run_ffn_flops_saved_share"] == pytest.approx(row["ffn_flops_saved_share"], rel=1e-5)
    assert row["speed_run_saved_ratio"] == 0.0 and row["speed_run_ideal_speedup"] > 1
    assert row["speed_over_ideal"] == pytest.approx(row["speedup"] / row["speed_run_ideal_speedup"], rel=1e-4)
