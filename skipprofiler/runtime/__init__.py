"""Runtime: apply a skip plan to a loaded model so that planned FFN blocks really do no work at decode time.

Deployment code imports only this package (torch, yaml via planio, and the standard library)::

    handle = skipprofiler.apply_plan(model, "plans/demo-static-25.yaml")
    model.generate(...)          # prompt dense, generated tokens skip as planned
    handle.stats()               # decided skips and FFN rows really not computed
    handle.remove()              # bit-exact restore

Read it one part at a time: `handle` (apply_plan, SkipHandle: which positions decode, counting, restore),
`schedule` (pure: decode index and static decisions per position), `step` (one forward's state and the typed
Decision), `strategies` (what a patched FFN computes, per family), `patcher` (reversible changes), `checks` (does the
plan fit the model); for adaptive plans `adaptive`, for compensation `compensation`, for ``prompt_class="auto"``
`routing` -- each imported only when a plan needs it. Rule semantics: the docstring of `skipprofiler.plan`.
"""

from ..plan import PlanError
from ..registry import UnsupportedArchitecture
from .handle import SkipHandle, apply_plan, load_plan

__all__ = ["apply_plan", "load_plan", "SkipHandle", "PlanError", "UnsupportedArchitecture"]
