"""skipprofiler.evaluation.bench: benchmark plans reach the skip ratio they are named for, on the run that is timed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from skipprofiler.evaluation.bench import (
    Arm,
    benchmark_decode,
    benchmark_prompt,
    calibrate_adaptive,
    default_arms,
)


def small_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=256)).eval()


@pytest.mark.parametrize("batch, decision", [(1, "per_sequence"), (3, "per_sequence"), (3, "shared")])
def test_adaptive_benchmark_plans_reach_their_target_on_the_timed_run(batch, decision):
    """Calibrated on the benchmark's prompt, measured by the runtime inside `benchmark_decode`'s timed runs."""
    model = small_llama()
    prompt = benchmark_prompt(model, batch, prompt_tokens=8)
    for target in (0.1, 0.25):
        plan = calibrate_adaptive(model, target, prompt, new_tokens=24, batch_decision=decision)
        timed = benchmark_decode(model, [Arm("dense", None), Arm("plan", plan, batch_decision=decision)],
                                 batch=batch, prompt_tokens=8, new_tokens=24, repeats=5)
        assert timed.results[1].stats["decided_skip_ratio"] == pytest.approx(target, abs=0.03)
        assert timed.results[0].stats == {}  # dense runs without the runtime: nothing counted


def test_default_arms_add_shared_adaptive_arms_only_above_batch_one():
    model = small_llama()
    decisions = ("per_sequence", "shared")
    names = [a.name for a in default_arms(model, None, [0.25], batch=1, new_tokens=8, batch_decisions=decisions)]
    assert names == ["dense", "empty plan", "adaptive 25%"]
    arms = default_arms(model, None, [0.25], batch=2, new_tokens=8, batch_decisions=decisions)
    assert [(a.name, a.batch_decision) for a in arms[2:]] == [("adaptive 25%", "per_sequence"),
                                                               ("adaptive 25% shared", "shared")]
