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


def __getattr__(name):  # lazy: `import skipprofiler` loads no stage until one is used
    if name in _RUNTIME:
        from . import runtime

        return getattr(runtime, name)
    if name == "profile_corpus":
        from .profile.recipe import profile_corpus

        return profile_corpus
    if name == "fit_plan":
        from .fit.recipe import fit_plan

        return fit_plan
    if name == "evaluate_plans":
        from .evaluation.recipe import evaluate_plans

        return evaluate_plans
    raise AttributeError(f"module 'skipprofiler' has no attribute {name!r}")
