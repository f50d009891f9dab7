"""Per-class exhaustive oracle: for each class of the bundled held-out split, the 3-layer static skip set (25 % of
12 FFNs) with the lowest measured KL on that class's own windows, and where the global plan's set [2, 3, 5] ranks.

    python scripts/perclass_oracle.py        # ~8 minutes on 2 CPU cores

Used to explain why per-class static plans cannot beat the global one on the demo model (docs/plan-format.md).
"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skipprofiler import demo
from skipprofiler.plan import SkipPlan
from skipprofiler.refine import (
    calibration_references,
    oracle_static,
    references_of_class,
)

torch.set_num_threads(2)
m = AutoModelForCausalLM.from_pretrained(demo.model_path(), dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(demo.model_path())
held = calibration_references(m, tok, demo.data_spec("heldout"), docs_per_class=32)
tmpl = SkipPlan(mode="static")
for c in demo.CLASSES:
    r = oracle_static(m, references_of_class(held, c), tmpl, [1.0, 1.0, 1.0])
    g = dict(r.ranking)[((2, 1.0), (3, 1.0), (5, 1.0))]
    print(c, "best", [l for l, _ in r.slots], "%.4f" % r.kl, "| [2,3,5] %.4f" % g, "rank", [s for s, _ in r.ranking].index(((2, 1.0), (3, 1.0), (5, 1.0))) + 1,
          "| top3", [([l for l, _ in s], round(k, 4)) for s, k in r.ranking[:3]], flush=True)
