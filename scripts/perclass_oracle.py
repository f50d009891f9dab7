"""Per-class exhaustive oracle: for each class of the bundled held-out split, the static skip set shaped like a
shipped plan's (same number of layers and fractions) with the lowest measured KL on that class's own windows, and
where the plan's own set ranks.

    python scripts/perclass_oracle.py                          # plans/demo-static-25.yaml, ~8 min on 2 CPU cores
    python scripts/perclass_oracle.py plans/demo-static-10.yaml

Used to explain why per-class static plans cannot beat the global one on the demo model (docs/plan-format.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skipprofiler import demo
from skipprofiler.plan.model import SkipPlan
from skipprofiler.plan import load_plan
from skipprofiler.fit.refine import calibration_references, canonical, oracle_static, references_of_class

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    plan_path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "plans" / "demo-static-25.yaml"
    plan = load_plan(plan_path).global_plan
    if plan.mode != "static":
        sys.exit(f"error: {plan_path} is not a static plan")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(demo.model_path(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo.model_path())
    held = calibration_references(model, tokenizer, demo.data_spec("heldout"), docs_per_class=32)
    plan_set = canonical(plan.skip_layers.items())
    fractions = [f for _, f in plan_set]
    print(f"{plan_path.name}: skip set {[layer for layer, _ in plan_set]}")
    for cls in demo.CLASSES:
        result = oracle_static(model, references_of_class(held, cls), SkipPlan(mode="static"), fractions)
        ranked = [s for s, _ in result.ranking]
        print(f"{cls}: best {[layer for layer, _ in result.slots]} KL {result.kl:.4f} | plan's set "
              f"KL {dict(result.ranking)[plan_set]:.4f}, rank {ranked.index(plan_set) + 1} of {len(ranked)} | top 3 "
              f"{[([layer for layer, _ in s], round(kl, 4)) for s, kl in result.ranking[:3]]}", flush=True)


if __name__ == "__main__":
    main()
