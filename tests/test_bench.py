"""skipprofiler.bench: benchmark plans reach the skip ratio they are named for, on the run that is timed."""

from __future__ import annotations

import pytest

from skipprofiler.bench import benchmark_prompt, calibrate_adaptive, measured_skip_ratio, synthetic_model


@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_benchmark_plans_are_calibrated_on_the_timed_run(batch):
    model = synthetic_model("llama-tiny")
    prompt = benchmark_prompt(model, batch, prompt_tokens=8)
    for target in (0.1, 0.25):
        plan = calibrate_adaptive(model, target, prompt, new_tokens=24)
        realized = measured_skip_ratio(model, plan, prompt, new_tokens=24)
        assert realized == pytest.approx(plan.fit["calibration_skip_ratio"])  # the timed run is the calibration run
        assert realized == pytest.approx(target, abs=0.03)
