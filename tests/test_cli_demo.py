"""`skipprof demo`'s closing summary: what was measured, and how noisy its timing was, from a real eval JSON."""

from __future__ import annotations

import json
from pathlib import Path

from skipprofiler._cli.demo import summary

RESULTS = Path(__file__).parents[1] / "docs" / "results"


def test_summary_names_the_data_every_plan_and_the_timing_spread():
    result = json.loads((RESULTS / "smollm2-eval-25.json").read_text())
    lines = summary(result)
    positions = sum(result["data"]["tokens"].values())
    assert f"{positions:,} decode positions" in lines[0] and f"{result['dense']['ppl']:.2f}" in lines[0]
    for row in result["plans"]:
        assert any(line.strip().startswith(row["name"] + ":") for line in lines), row["name"]
    assert not any(line.startswith("Speed:") for line in lines)  # measured without speed: no timing claim

    timed = dict(result, plans=[dict(result["plans"][0], speedup=1.04, speedup_min=0.97, speedup_max=1.11,
                                     speed_repeats=5, speed_new_tokens=64)])
    lines = summary(timed)
    assert "1.04× dense (median, per-round 0.97–1.11×" in lines[1]
    assert any(line.startswith("Speed: median of 5 interleaved") for line in lines)
