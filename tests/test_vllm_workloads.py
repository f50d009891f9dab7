"""A mixed serving workload through vLLM with a skip plan (issue 28, item 3): every request's greedy tokens ==
transformers + skipprofiler.apply_plan, run there one request at a time.

One workload of 8 requests, served 3 times over by a dense engine and by two plan engines (each engine in its own
process: tests/vllm_run.py's step-API mode), tiny random Llama (tests/test_vllm_families.py's checkpoint), float32,
enforce_eager, no prefix caching:

* requests arrive while others decode: each is added (``LLMEngine.add_request``) once the front end has taken its
  step (``LLMEngine.step``); the runner records how many requests were decoding at each arrival (checked > 0);
* long prompts are prefilled in chunks beside decoding requests: a 32-token step budget (``max_num_batched_tokens``),
  prompts of 90 and 70 tokens arriving while four short requests decode (the plugin's ``mixed_forwards``: forwards
  with prompt and decode tokens both, checked > 0);
* preemption forced by a small KV cache: 6 blocks of 32 tokens (``num_gpu_blocks_override``; vLLM's CPU attention
  takes block sizes in multiples of 32), while the four short requests alone need 8 once past 32 tokens; preempted
  requests are recomputed from scratch. Checked in every pass by vLLM's own counter (``vllm:num_preemptions``) and by
  the plugin's token counts: more prompt + decode tokens ran than the workload has, generated tokens among them.

The plans: "static" skips layer 1 on every generated token and layer 2 on every other one, after a warm-up of 2;
"neuron" adds layers 0 and 3 narrowed to kept neurons with fill map (bias + a rank-2 map of the kept activations).
The dense engine's tokens must equal transformers dense, the plans' must differ from them on most requests (so the
test can fail). Each engine's throughput over the workload is printed (a smoke figure: tiny model, shared machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_vllm_families import ENGINE as FAMILY_ENGINE
from test_vllm_families import ENV, RUNNER, random_map_subsets, tiny_checkpoint, vllm_test, write_plan

from skipprofiler.plan.model import NeuronSubsets, SkipPlan

SKIPS = {1: 1.0, 2: 0.5}
NEURONS = {0: 60, 3: 40}  # kept neurons of 96
WARMUP = 2
BLOCK, BLOCKS, BUDGET = 32, 6, 32
PASSES = 3  # the workload is served 3 times by each engine: tokens checked in every pass, throughput's median
ENGINE = {"max_num_batched_tokens": BUDGET, "block_size": BLOCK, "num_gpu_blocks_override": BLOCKS,
          "disable_log_stats": False, "max_num_seqs": 8}


def workload() -> list[dict]:
    rng = np.random.default_rng(1)

    def prompt(n):
        return [int(t) for t in rng.integers(2, 96, n)]

    short = [[5, 17, 42, 8, 9], [33, 2, 71, 71, 40, 12, 3], [60, 61, 62], [7, 88, 19, 4, 25, 51, 36, 14, 77]]
    requests = [{"prompt": p, "max_tokens": 40, "arrive": 0} for p in short]
    requests += [{"prompt": prompt(90), "max_tokens": 16, "arrive": 3},   # chunked beside 4 decoding requests
                 {"prompt": prompt(70), "max_tokens": 24, "arrive": 8},
                 {"prompt": [90, 11], "max_tokens": 30, "arrive": 12},
                 {"prompt": [44, 45, 30, 29, 58, 66], "max_tokens": 30, "arrive": 20}]
    return requests


def run_workload(folder, plan, job_dir, name: str, requests: list[dict]) -> dict:
    """The workload served PASSES times by one engine in its own process (tests/vllm_run.py, step-API mode): one
    result per pass."""
    job = job_dir / f"{name}.json"
    job.write_text(json.dumps({"model": str(folder), "plan": str(plan) if plan else None,
                               "llm": {**FAMILY_ENGINE, **ENGINE}, "runs": [], "max_tokens": 0,
                               "workload": {"requests": requests, "passes": PASSES}}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(job)], check=False, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **ENV})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"vLLM run {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    (job_dir / f"{name}.result.json").write_text(lines[-1][len("RESULT "):])
    return json.loads(lines[-1][len("RESULT "):])["passes"]


def hf_tokens(model, plan, requests) -> list[list[int]]:
    """transformers greedy, one request at a time, with apply_plan when `plan` is given."""
    from skipprofiler.runtime import apply_plan

    handle = apply_plan(model, str(plan)) if plan else None
    try:
        out = []
        with torch.no_grad():
            for r in requests:
                ids = r["prompt"]
                gen = model.generate(torch.tensor([ids]), max_new_tokens=r["max_tokens"], do_sample=False,
                                     pad_token_id=0)
                out.append(gen[0, len(ids):].tolist())
        return out
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workload")
    folder = tmp / "llama"
    model = tiny_checkpoint("llama", folder)
    rng = np.random.default_rng(0)
    tensors = random_map_subsets(NEURONS, rng)
    plans = {"static": write_plan(model, tmp, "static", SkipPlan(mode="static", skip_layers=dict(SKIPS),
                                                                  warmup_tokens=WARMUP)),
             "neuron": write_plan(model, tmp, "neuron", SkipPlan(
                 mode="static", skip_layers=dict(SKIPS), warmup_tokens=WARMUP,
                 neurons=NeuronSubsets("map", tensors, intermediate_size=96, rank=2)))}
    requests = workload()
    out = {"requests": requests, "dense": run_workload(folder, None, tmp, "dense", requests),
           "want_dense": hf_tokens(model, None, requests)}
    for name, plan in plans.items():
        out[name] = run_workload(folder, plan, tmp, name, requests)
        out[f"want_{name}"] = hf_tokens(model, plan, requests)
    return out


@vllm_test
def test_dense_workload_tokens_equal_transformers(served):
    """The workload in vanilla vLLM (no plan) == transformers dense, request by request: what the plan engines are
    compared against is exact."""
    for run in served["dense"]:
        assert run["tokens"] == served["want_dense"]


@vllm_test
@pytest.mark.parametrize("name", ["static", "neuron"])
def test_workload_tokens_equal_apply_plan(served, name, capsys):
    """Every request of the mixed workload: plan engine == transformers + apply_plan, and the plan changed the tokens
    of most requests (so the comparison can fail). Prints both engines' throughput over the workload (smoke)."""
    requests, want = served["requests"], served[f"want_{name}"]
    changed = sum(a != b for a, b in zip(want, served["want_dense"]))
    assert changed >= len(requests) // 2, f"the plan changes {changed} requests only: the test could hardly fail"
    for p, run in enumerate(served[name]):
        assert [len(t) for t in run["tokens"]] == [r["max_tokens"] for r in requests]
        for i, (got, expected) in enumerate(zip(run["tokens"], want)):
            where = f"pass {p}, request {i} ({len(requests[i]['prompt'])}-token prompt)"
            assert got == expected, f"{where}: {got} != {expected}"
    with capsys.disabled():
        for arm in ("dense", name):
            rates = [run["generated"] / run["seconds"] for run in served[arm]]
            print(f"\n[workload] {arm}: {served[arm][0]['generated']} tokens per pass, "
                  f"{sorted(rates)[len(rates) // 2]:.1f} tok/s (median of {len(rates)} passes: "
                  f"{', '.join(f'{r:.1f}' for r in rates)}), preemptions per pass "
                  f"{[run['preemptions'] for run in served[arm]]}; load average {os.getloadavg()[0]:.2f}")


@vllm_test
@pytest.mark.parametrize("name", ["static", "neuron"])
def test_workload_was_mixed_chunked_and_preempted(served, name):
    """The workload did what it is for, in both engines: late requests arrived while others decoded, long prompts were
    prefilled in chunks in forwards with decode tokens, and the small KV cache forced preemptions whose recomputation
    the plugin saw (recomputed generated tokens count as decode tokens: they skip as when first computed)."""
    requests = served["requests"]
    late = [i for i, r in enumerate(requests) if r["arrive"] > 0]
    for arm in ("dense", name):
        for p, run in enumerate(served[arm]):
            assert all(run["decoding_at_arrival"][i] > 0 for i in late), (arm, p, run["decoding_at_arrival"])
            assert run["preemptions"] > 0, f"{arm}, pass {p}: no preemption: the KV cache is not small enough"
    assert max(len(r["prompt"]) for r in requests) > BUDGET
    for run in served[name]:
        check_counters(run, name, requests)


def check_counters(run: dict, name: str, requests: list[dict]) -> None:
    after, before = run["after"], run["before"]

    def delta(key):
        return after[key] - before[key]

    assert delta("mixed_forwards") > 0
    prompt_tokens = sum(len(r["prompt"]) for r in requests)
    fed_back = sum(r["max_tokens"] - 1 for r in requests)  # the last generated token is never fed back
    assert delta("prompt_tokens") >= prompt_tokens and delta("decode_tokens") >= fed_back
    assert delta("prompt_tokens") + delta("decode_tokens") > prompt_tokens + fed_back  # recomputed after preemption
    assert delta("decode_tokens") > fed_back  # ... generated tokens among them
    assert after["host_decisions"] and after["decided"]["skip"] > before["decided"]["skip"]
    assert after["decided"]["mixed"] > before["decided"]["mixed"]
    assert after["skipped_whole"]["1"] > before["skipped_whole"]["1"]  # steady decode: layer 1's FFN not called
    if name == "neuron":
        assert delta("narrowed_ffn_rows") > 0 and after["widths"] == {str(k): v for k, v in NEURONS.items()}
