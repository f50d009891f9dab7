"""skipprofiler.bench: benchmark plans reach the skip ratio they are named for, on the run that is timed."""

from __future__ import annotations

import pytest

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from skipprofiler.bench import benchmark_prompt, calibrate_adaptive, measured_skip_ratio


@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_benchmark_plans_are_calibrated_on_the_timed_run(batch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256)).eval()
    prompt = benchmark_prompt(model, batch, prompt_tokens=8)
    for target in (0.1, 0.25):
        plan = calibrate_adaptive(model, target, prompt, new_tokens=24)
        realized = measured_skip_ratio(model, plan, prompt, new_tokens=24)
        assert realized == pytest.approx(plan.fit["calibration_skip_ratio"])  # the timed run is the calibration run
        assert realized == pytest.approx(target, abs=0.03)
