"""How much runtime code a static plan really runs: distinct lines of skipprofiler/runtime (and skipprofiler/plan)
executed by apply_plan, by one prefill and by each decode step, on a tiny Llama, per file; then the runtime files a
decode step runs through. A reading aid for the runtime's size.

    python scripts/runtime_lines.py
"""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import tiny_model
from transformers import DynamicCache
from skipprofiler.plan.model import SkipPlan
from skipprofiler.runtime import apply_plan
from skipprofiler.arch.compat import cache_kwargs

model = tiny_model("llama", num_layers=6)
ids = torch.randint(2, 90, (1, 5))
seen = set()
def tracer(frame, event, arg):
    f = frame.f_code.co_filename
    if "skipprofiler/runtime" in f or "skipprofiler/plan" in f:
        if event == "line":
            seen.add((f.split("skipprofiler/")[1], frame.f_lineno))
        return tracer
    return None
def traced(fn):
    seen.clear(); sys.settrace(tracer)
    try: return fn()
    finally: sys.settrace(None)
plan = SkipPlan(mode="static", skip_layers={2: 1.0, 3: 1.0})
cache = DynamicCache()
for name in ("apply", "prefill", "decode step", "decode step 2"):
    if name == "apply":
        handle = traced(lambda: apply_plan(model, plan))
    elif name == "prefill":
        out = traced(lambda: model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True))
    else:
        nxt = out.logits[:, -1:].argmax(-1)
        out = traced(lambda: model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True))
    by_file = {}
    for f, l in seen: by_file[f] = by_file.get(f, 0) + 1
    print(f"{name:14s} {len(seen):4d} distinct lines", dict(sorted(by_file.items())))
    if name == "decode step 2":
        runtime = sorted(f for f in by_file if f.startswith("runtime/"))
        print(f"a decode step runs through {len(runtime)} runtime files ({', '.join(runtime)}), "
              f"{sum(by_file[f] for f in runtime)} distinct lines there")
