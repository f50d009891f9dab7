"""The eval stage as one library call: `evaluate_plans(model, tokenizer, plans, EvalConfig)` measures named plans
(or plans `fit_plan` fits per sweep target) on held-out data with baselines and references and returns the eval JSON
(docs/eval-schema.md). `skipprof eval` parses its options into `EvalConfig` and calls it; exported as
`skipprofiler.evaluate_plans`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..progress import ProgressCallback, as_progress


def evaluate_plans(model, tokenizer, plans: Sequence[Any] = (), config=None, *, profile=None, model_name: str = "",
                   on_progress: ProgressCallback | None = None, log: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """Measure skip plans on held-out data (skipprofiler.evaluation.EvalConfig; default: the bundled held-out split)
    and return the eval result (docs/eval-schema.md).

    `plans`: plan file paths, or (name, PlanFile | SkipPlan) pairs. With `config.sweep` static and adaptive plans
    are fitted from `profile` at each target (`fit_plan`) and evaluated too; `profile` also ranks layers for the
    LLM-Drop baseline. `on_progress(StageProgress)` hears every stage (dense pass, each plan, baselines, oracle,
    ...); `log` gets one-line notes.
    """
    from . import EvalConfig, EvalError
    from .run import run_eval, run_sweep

    config = config or EvalConfig()
    named = named_plans(plans)
    if not named and not config.sweep:
        raise EvalError("give at least one plan (or sweep targets and a profile)")
    if config.sweep and profile is None:
        raise EvalError("a sweep fits plans from a profile: pass profile=")
    if config.sweep and config.lm_eval:
        raise EvalError("lm-eval tasks run for named plans; they do not run with a sweep")
    if config.qa_file is not None and not Path(config.qa_file).is_file():
        raise EvalError(f"QA file not found: {config.qa_file}")
    progress = as_progress(on_progress)
    if config.sweep:
        fitted = [_fit_sweep_target(profile, target, config) for target in config.sweep]
        return run_sweep(model, tokenizer, profile, config, fitted, extra_plans=named, model_name=model_name,
                         log=log, progress=progress)
    return run_eval(model, tokenizer, named, config.data, config, profile=profile, model_name=model_name, log=log,
                    progress=progress)


def _fit_sweep_target(profile, target: float, config):
    """`fit_plan`'s static and adaptive plans at one sweep target, with its defaults (class plans with
    `config.sweep_per_class`)."""
    from . import EvalError
    from .run import SweepTarget
    from ..fit.from_profile import FitError, FitSettings
    from ..fit.recipe import fit_plan

    plans = {}
    for mode in ("static", "adaptive"):
        settings = FitSettings(target=target, mode=mode, gen_len=config.gen_len, per_class=config.sweep_per_class)
        try:
            plans[mode] = fit_plan(profile, settings).plan_file
        except FitError as e:
            raise EvalError(f"fitting {mode} at {target}: {e}") from None
    return SweepTarget(target, **plans)


def named_plans(plans: Sequence[Any]) -> list[tuple[str, Any]]:
    """(name, plan) pairs: a path is loaded and named by its file stem (by its path without suffix when two share a
    stem); pairs pass through. EvalError for a missing or invalid file."""
    from . import EvalError
    from ..plan.model import PlanError
    from ..runtime import load_plan

    out, paths = [], []
    for item in plans:
        if isinstance(item, tuple):
            out.append(item)
            paths.append(None)
            continue
        path = Path(item)
        if not path.is_file():
            raise EvalError(f"plan file not found: {path}")
        try:
            out.append((path.stem, load_plan(path)))
        except PlanError as e:
            raise EvalError(f"{path}: invalid plan: {'; '.join(e.problems)}") from None
        paths.append(path)
    names = [name for name, _ in out]
    if len(set(names)) != len(names):  # same file name in two folders: keep the rows apart
        out = [(str(p.with_suffix("")) if p is not None else name, plan) for p, (name, plan) in zip(paths, out)]
    return out


__all__ = ["evaluate_plans", "named_plans"]
