"""Runtime: apply a skip plan to a loaded model so that planned FFN blocks really do no work at decode time.

Deployment code imports only this package (torch, yaml via the plan stage, and the standard library)::

    handle = skipprofiler.apply_plan(model, "plans/demo-static-25.yaml")
    model.generate(...)          # prompt dense, generated tokens skip as planned
    handle.stats()               # decided skips and FFN rows really not computed
    handle.remove()              # bit-exact restore

Read it top to bottom, one part per module. A static plan loads: `handle` (apply_plan, SkipHandle: where decode
positions start, which path each forward takes, counts, restore), `schedule` (the plan of one forward: a decode step
is a dictionary lookup), `ffn` (what a patched FFN computes), `patcher` (reversible changes), `checks` (does the plan
fit the model). Imported only when needed: `positionwise` (other forwards, position by position), `families` (Bloom,
OPT), the plug-ins (`plugins.Plugin`) `adaptive` (FFN-SkipLLM's trigger) and `routing` (``prompt_class="auto"``), and
the compensation fills `compensation`. Rule semantics: the docstring of `skipprofiler.plan.model`.
"""

from ..plan.model import PlanError
from ..arch.registry import UnsupportedArchitecture
from .handle import SkipHandle, apply_plan, load_plan

__all__ = ["apply_plan", "load_plan", "SkipHandle", "PlanError", "UnsupportedArchitecture"]
