"""skipprofiler: profile FFN saturation offline, fit YAML skip plans, skip saturated FFNs at decode time.

Deployment code needs only::

    import skipprofiler
    handle = skipprofiler.apply_plan(model, "plans/demo-static-25.yaml")

`apply_plan` and `load_plan` come from `skipprofiler.runtime`, which imports torch, yaml and the standard library
only; everything else (profiling, fitting, eval) is imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["apply_plan", "load_plan", "__version__"]


def __getattr__(name):
    if name in ("apply_plan", "load_plan", "SkipHandle"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'skipprofiler' has no attribute {name!r}")
