"""The pipeline's stages as library calls, one settings object each; `skipprof` commands parse options into these
settings, call one function and print (the way torchtune's recipes sit over its components)::

    import skipprofiler
    from skipprofiler.profile import ProfileSettings
    from skipprofiler.fit import FitSettings

    profile = skipprofiler.profile_corpus(model, tokenizer, ProfileSettings(generate=32))
    plan_file = skipprofiler.fit_plan(profile, FitSettings(target=0.25)).plan_file
    with skipprofiler.apply_plan(model, plan_file):
        model.generate(...)

`profile_corpus` reads a corpus and records a `Profile`; `fit_plan` fits a `PlanFile` from it (refined or fitted
to a quality budget on the model when the settings ask); `evaluate_plans` measures plans on held-out data and
returns the eval JSON (docs/eval-schema.md). Errors are the stage's own one-line exceptions (CorpusError,
ProfileError, FitError, EvalError, ...).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .progress import ProgressCallback, as_progress

DEMO_MODEL_NAME = "skipprofiler-demo"


# ---------------------------------------------------------------------------------------------------------------
# profile


def profile_corpus(model, tokenizer, settings=None, *, source: str | None = None, dist_ctx=None,
                   on_progress: Callable | None = None):
    """Profile FFN saturation of `model` on the corpus `settings` names (skipprofiler.profile.ProfileSettings;
    default: the bundled calibration split) and return the `Profile`, its header complete (model name and path,
    corpus provenance and settings, elapsed time).

    `source` is how the model was named when loaded (checkpoint folder, .gguf file or hub id; default: the config's
    `_name_or_path`); plans copy it. `on_progress(ProgressEvent)` is called after every batch. Under torchrun pass
    `dist_ctx` (skipprofiler.profile.distributed.init_from_env): ranks split the batches and rank 0 gets the merged profile,
    the other ranks None. A first Ctrl-C stops after the current batch: the profile comes back marked partial.
    """
    from .profile.corpus import Corpus, parse_spec
    from .profile.distributed import profile_distributed, shard_batches
    from .profile import ProfileError, ProfileSettings

    settings = settings or ProfileSettings()
    problems = settings.problems()
    if problems:
        raise ProfileError("; ".join(problems))
    if dist_ctx is not None and settings.shard is not None:
        raise ProfileError("under torchrun the ranks already split the corpus: leave ProfileSettings.shard unset")
    specs = list(settings.data or [_demo_corpus("calibration")])
    for spec in specs:
        parse_spec(spec)  # a missing data path fails before any work
    corpus = Corpus(specs, tokenizer, text_column=settings.text_column, class_column=settings.class_column,
                    max_tokens=settings.max_tokens, seq_len=settings.seq_len, batch_size=settings.batch_size).open()
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    batches = corpus.batches()
    first = next(batches, None)  # an empty corpus fails here (CorpusError), before any progress output
    if first is None:
        raise ProfileError("the corpus gave no batch to profile")
    started = time.perf_counter()
    profile = profile_distributed(model, shard_batches(_chain(first, batches), settings.shard), dist_ctx, settings,
                                  class_names=lambda: corpus.classes, on_batch=on_progress, eos_token_ids=eos_ids,
                                  pad_token_id=corpus.pad_token_id)
    if profile is None:
        return None  # not rank 0: rank 0 holds the merged profile
    if profile.tokens("prompt") == 0:
        raise ProfileError("no tokens were profiled (interrupted before the first batch)")
    profile.header["model"].update(_model_naming(model, source))
    profile.header["corpus"] = corpus.provenance()
    profile.header["corpus_settings"] = corpus.settings()
    profile.header["elapsed_s"] = round(time.perf_counter() - started, 3)
    if settings.shard is not None:
        profile.header["shard"] = {"index": settings.shard[0], "count": settings.shard[1]}
    return profile


def _chain(first, rest):
    yield first
    yield from rest


def _demo_corpus(split: str) -> str:
    from . import demo

    return demo.data_spec(split)


def _model_naming(model, source: str | None) -> dict[str, str]:
    """{name, path} for the profile header: a .gguf file is named by its file name (plans copy the name, and a
    site-packages path is this machine's only); the bundled demo model by DEMO_MODEL_NAME."""
    from .arch.models import ModelSourceError, model_source

    given = source or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    try:
        location = model_source(given).display
    except ModelSourceError:
        location = given
    if location.lower().endswith(".gguf"):
        return {"name": Path(location).name, "path": location}
    if _is_demo(location):
        return {"name": DEMO_MODEL_NAME, "path": location}
    return {"name": given, "path": location}


def _is_demo(location: str) -> bool:
    from . import demo

    try:
        return Path(location).resolve() == Path(demo.model_path()).resolve()
    except (FileNotFoundError, OSError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# fit


def fit_plan(profile, settings, *, model=None, tokenizer=None, profile_ref: dict[str, Any] | None = None):
    """Fit a plan file from `profile` as `settings` (skipprofiler.fit.FitSettings) ask and return a `FitResult`
    (plan_file, warnings, notes).

    At a target ratio the fit needs the profile only. `settings.refine` (choose by measured KL on calibration
    windows), a quality budget (`max_ppl_increase` / `max_kl`) and `compensation="mean_output"` measure plans on the
    model: pass the profiled `model` and its `tokenizer`. `profile_ref` ({path, sha256}) goes into provenance.
    """
    from .fit.from_profile import FitError, fit_plan_file

    problems = settings.problems()
    if problems:
        raise FitError("; ".join(problems))
    settings = settings.resolve()
    if settings.needs_model:
        if model is None or tokenizer is None:
            raise FitError("FitSettings.refine, quality budgets and mean-output compensation measure plans on the "
                           "model: pass model= and tokenizer=")
        _check_same_model(profile, model)
    if settings.budget_fit:
        result = _fit_to_budget(profile, settings, model, tokenizer, profile_ref)
    else:
        result = fit_plan_file(profile, settings, per_class=settings.per_class, classes=settings.classes,
                               profile_ref=profile_ref)
        if settings.refine:
            result.warnings += _refine(result.plan_file, profile, settings, model, tokenizer)
    if settings.compensation == "linear":
        _note_substitute_cost(result.plan_file, model)
    return result


def _note_substitute_cost(plan_file, model) -> None:
    """Each linear plan's substitute FLOPs per skipped call (share of one FFN call) and the expected share of FFN
    FLOPs it saves net of them, in `fit`."""
    from ._jsonable import rounded
    from .fit.refine import substitute_cost_share

    for plan in [plan_file.global_plan, *plan_file.classes.values()]:
        share = substitute_cost_share(model, plan)
        plan.fit["substitute_cost_share"] = rounded(share)
        if plan.expected_skip_ratio is not None:
            plan.fit["expected_ffn_flops_saved"] = rounded(plan.expected_skip_ratio * (1 - share))


def _check_same_model(profile, model) -> None:
    from .fit.from_profile import FitError
    from .plan.io import fingerprint_problems
    from .arch.registry import model_fingerprint

    mismatch = fingerprint_problems((profile.header.get("model") or {}).get("fingerprint"), model_fingerprint(model))
    if mismatch:
        raise FitError(f"the model is not the profile's model: {mismatch[0]}")


def _refine(plan_file, profile, settings, model, tokenizer) -> list[str]:
    """Choose by measured KL on calibration windows (skipprofiler.fit.refine), recorded in each plan's `fit`.

    static: refine the layer sets, the global plan on all windows and each class plan on its own class's windows;
    with compensation linear, class plans keep the global set and get maps fitted on their class's windows.
    adaptive (global plan): measure a grid of run lengths and dense-every, keep the cheapest at the target, and
    compare it with the refined static plan at the same ratio; a warning says so when static measures less KL."""
    from .fit.from_profile import FitError
    from .fit.refine import (RefineError, calibration_references, class_substitutes, compare_with_static,
                         fit_adaptive_by_cost, refine_plan_file)

    try:
        references = calibration_references(model, tokenizer, settings.data, text_column=settings.text_column,
                                            class_column=settings.class_column)
        if plan_file.global_plan.mode == "static" and settings.compensation == "linear" and plan_file.classes:
            classes, plan_file.classes = plan_file.classes, {}  # the global set first, then class maps on it
            refine_plan_file(model, tokenizer, plan_file, settings.data, references=references, rank=settings.rank,
                             error_aware=settings.error_aware)
            plan_file.classes = classes
            class_substitutes(model, tokenizer, plan_file, settings.data, text_column=settings.text_column,
                              class_column=settings.class_column)
            return []
        if plan_file.global_plan.mode == "static":
            return list(refine_plan_file(model, tokenizer, plan_file, settings.data, references=references,
                                         rank=settings.rank, error_aware=settings.error_aware))
        plan = fit_adaptive_by_cost(model, profile, settings, references)
        plan.fit["static_alternative"] = alt = compare_with_static(model, plan, references)
    except (RefineError, ValueError) as e:
        raise FitError(f"FitSettings.refine failed: {e}") from None
    plan_file.global_plan = plan
    if not alt["static_wins"]:
        return []
    return [f"on this model a static plan is better: at skip ratio {alt['skip_ratio']:.3f} the refined static set "
            f"{[l for l, _ in alt['layers']]} measures KL {alt['kl']:.4f} against the adaptive plan's "
            f"{alt['adaptive_kl']:.4f} on the same calibration windows; use FitSettings.mode=\"static\" with "
            "FitSettings.refine"]


def _fit_to_budget(profile, settings, model, tokenizer, profile_ref):
    from .fit.from_profile import FitError, FitResult, assemble_plan_file
    from .plan.model import SkipPlan
    from .evaluation.fidelity import FidelityError
    from .fit.refine import Budget, RefineError, calibration_references, fit_budget_plan
    from .fit.substitute import SubstituteError

    template = SkipPlan(mode="static", apply_to=settings.apply_to, warmup_tokens=settings.warmup_tokens,
                        dense_every=settings.dense_every, compensation=settings.compensation)
    budget = Budget(max_kl=settings.max_kl, max_ppl_increase=settings.max_ppl_increase)
    try:
        references = calibration_references(model, tokenizer, settings.data, text_column=settings.text_column,
                                            class_column=settings.class_column)
        plan = fit_budget_plan(model, tokenizer, template, budget, settings.data, references=references,
                               gen_len=settings.gen_len, rank=settings.rank)
    except (RefineError, FidelityError, SubstituteError) as e:
        raise FitError(str(e)) from None
    record = plan.fit["budget_fit"]
    note = (f"budget {record['budget']}: {len(plan.skip_layers)} layers, expected skip {plan.expected_skip_ratio:.3f}; "
            f"measured on calibration windows: KL {record['kl']:.4f}, perplexity {record['ppl_increase']:+.1%}")
    return FitResult(assemble_plan_file(profile, settings, plan, profile_ref=profile_ref), notes=[note])


# ---------------------------------------------------------------------------------------------------------------
# evaluate


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
    from .evaluation import EvalConfig, EvalError
    from .evaluation.run import run_eval, run_sweep

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
    from .evaluation import EvalError
    from .evaluation.run import SweepTarget
    from .fit.from_profile import FitError, FitSettings

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
    from .evaluation import EvalError
    from .plan.model import PlanError
    from .runtime import load_plan

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


__all__ = ["profile_corpus", "fit_plan", "evaluate_plans", "named_plans"]
