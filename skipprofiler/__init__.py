"""skipprofiler: profile FFN saturation offline, fit YAML skip plans, skip saturated FFNs at decode time.

Deployment code needs only::

    import skipprofiler
    handle = skipprofiler.apply_plan(model, "plans/demo-static-25.yaml")

`apply_plan` and `load_plan` come from `skipprofiler.runtime`, which imports torch, yaml and the standard library
only. The pipeline's stages are library calls too, each stage's own `recipe` module over one settings object:
`profile_corpus(model, tokenizer, ProfileSettings)` -> `fit_plan(profile, FitSettings)` ->
`evaluate_plans(model, tokenizer, plans, EvalConfig)`. Everything besides the runtime is imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["apply_plan", "load_plan", "profile_corpus", "fit_plan", "evaluate_plans", "__version__"]

_RUNTIME = ("apply_plan", "load_plan", "SkipHandle")
_RECIPES = {"profile_corpus": "profile", "fit_plan": "fit", "evaluate_plans": "evaluation"}  # name -> its stage


def __getattr__(name):
    if name in _RUNTIME:
        from . import runtime

        return getattr(runtime, name)
    if name in _RECIPES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_RECIPES[name]}.recipe"), name)
    raise AttributeError(f"module 'skipprofiler' has no attribute {name!r}")
