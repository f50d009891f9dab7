"""`skipprof export-plan`: fit a YAML skip plan from a profile at a target skip ratio."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import load_profile
from .errors import CLIError

HELP = (
    "Fit a skip plan from a profile so that R of decode-token FFN calls are skipped (or, with a quality budget, as "
    "many as the measured cost allows), and write it as YAML.\n\n"
    "static: the non-cold layers with the highest mean residual cosine (decode tokens when profiled), plus one "
    "layer skipped on a fraction of tokens, so the ratio hits R exactly. adaptive: FFN-SkipLLM's rule (skip "
    "the next k FFNs once the previous layer's cosine exceeds tau), tau and k fitted by simulating the rule on "
    "the profile's per-token samples. Cold layers come from the data. --per-class adds one plan per corpus "
    "class and a prompt router. The rule, the statistics and every key of the file: docs/plan-format.md.\n\n"
    "Examples:\n\n"
    "  skipprof export-plan demo.prof --target-skip 0.25 --out plans/demo-static-25.yaml\n\n"
    "  skipprof export-plan demo.prof --target-skip 0.25 --mode adaptive --out plans/demo-adaptive-25.yaml\n\n"
    "  skipprof export-plan demo.prof --target-skip 0.25 --per-class --out plans/demo-perclass-25.yaml\n\n"
    "  skipprof export-plan demo.prof --target-skip 0.25 --mode adaptive --batch-decision shared --batch-size 8 "
    "--out plans/demo-adaptive-25-batch8.yaml\n\n"
    "  skipprof export-plan demo.prof --target-skip 0.2 --refine --out plans/demo-static-20-refined.yaml\n\n"
    "  skipprof export-plan smollm2.prof --max-ppl-increase 0.10 --out plans/smollm2-budget-10.yaml\n"
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _profiled_model(profile) -> str | None:
    """The model the profile was recorded on, when it can still be found here (None: the bundled demo model)."""
    model = profile.header.get("model") or {}
    path = model.get("path")
    if not isinstance(path, str) or not path:
        return None
    from ..models import ModelSourceError, model_source

    try:
        from .. import demo

        if Path(path).resolve() == Path(demo.model_path()).resolve():
            return None
    except (FileNotFoundError, OSError):
        pass
    try:
        model_source(path)
    except ModelSourceError:
        raise CLIError(f"--refine needs the profiled model, recorded as {path}, which is not found here: "
                       "pass --model") from None
    return path


def _check_writable(out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a file name such as {out / 'plan.yaml'}")
    if not folder.is_dir():
        raise CLIError(f"cannot write {out}: folder {folder} does not exist")
    import os

    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CLIError(f"cannot write {out}: permission denied")


def _refine(plan_file, profile, settings, model_arg: str | None, data: str | None) -> None:
    """Choose by measured KL on calibration windows (skipprofiler.refine), recorded in each plan's `fit`.

    static: refine the layer sets, the global plan on all windows and each class plan on its own class's windows.
    adaptive (global plan): measure a grid of run lengths and dense-every, keep the cheapest at the target, and
    compare it with the refined static plan at the same ratio; when static measures less KL, say so."""
    from ..refine import RefineError, calibration_references, compare_with_static, fit_adaptive_by_cost, refine_plan_file
    from .common import load_model

    model, tokenizer = load_model(model_arg, dtype="float32", device="cpu")
    _check_fingerprint(profile, model)
    try:
        if plan_file.global_plan.mode == "static":
            warnings = refine_plan_file(model, tokenizer, plan_file, data)
        else:
            if plan_file.classes:
                raise CLIError("--refine with --mode adaptive fits the global plan only; drop --per-class/--class")
            references = calibration_references(model, tokenizer, data)
            plan = fit_adaptive_by_cost(model, profile, settings, references)
            plan.fit["static_alternative"] = compare_with_static(model, plan, references)
            plan_file.global_plan = plan
            warnings = []
            alt = plan.fit["static_alternative"]
            if alt["static_wins"]:
                warnings.append(
                    f"on this model a static plan is better: at skip ratio {alt['skip_ratio']:.3f} the refined static "
                    f"set {[l for l, _ in alt['layers']]} measures KL {alt['kl']:.4f} against the adaptive plan's "
                    f"{alt['adaptive_kl']:.4f} on the same calibration windows; use --mode static --refine")
    except (RefineError, ValueError) as e:
        raise CLIError(f"--refine failed: {e}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def export_plan(
    profile: Annotated[Path, typer.Argument(help="Profile file written by `skipprof profile`.", show_default=False, metavar="PROFILE")],
    target_skip: Annotated[Optional[float], typer.Option("--target-skip", "-r", help="Fraction of decode-token FFN "
                                                           "calls to skip, in (0, 1).", show_default=False)] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(
        help="Quality budget instead of a ratio (static): skip as many FFNs as keep the measured perplexity increase "
             "on calibration windows within this share, e.g. 0.10 for +10 %. Loads the model.",
        show_default=False)] = None,
    max_kl: Annotated[Optional[float], typer.Option(
        help="Quality budget instead of a ratio (static): keep the measured mean KL(dense || plan) on calibration "
             "windows within this value. Combines with --max-ppl-increase. Loads the model.",
        show_default=False)] = None,
    mode: Annotated[str, typer.Option(help="static (fixed layers) or adaptive (FFN-SkipLLM threshold rule).")] = "static",
    per_class: Annotated[bool, typer.Option("--per-class", help="Add a plan per corpus class and a prompt router.")] = False,
    classes: Annotated[Optional[list[str]], typer.Option("--class", help="Fit plans for these classes only "
                                                          "(repeatable; no router).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the YAML plan ('-' for stdout).")] = Path("plan.yaml"),
    gen_len: Annotated[int, typer.Option(min=1, help="Generated tokens per request the plan is for: the warm-up "
                                                     "default and the skip ratio are counted over them.")] = 256,
    warmup_tokens: Annotated[Optional[int], typer.Option(help="Generated tokens decoded densely first. Default: "
                                                           "adaptive --gen-len // 64 (the paper's rule), static 0.")] = None,
    dense_every: Annotated[Optional[int], typer.Option(help="Every n-th generated token fully dense (0: never). "
                                                         "Default: adaptive 6, static 0.")] = None,
    apply_to: Annotated[str, typer.Option(help="decode (prompt stays dense) or all.")] = "decode",
    compensation: Annotated[str, typer.Option(help="none; norm_ratio (scale the skipped FFN's input by the "
                                                   "calibrated mean norm gain, as AdaSkip); or mean_output (add the "
                                                   "FFN's mean output on calibration decode tokens; measured, so it "
                                                   "needs --refine or a quality budget).")] = "none",
    max_skip: Annotated[Optional[int], typer.Option(help="Adaptive run length k. Default: searched (the k whose "
                                                    "skipped calls have the highest mean cosine).")] = None,
    tau: Annotated[str, typer.Option(help="Adaptive thresholds: global (one tau) or per-layer (one quantile level "
                                          "of each layer's cosine).")] = "global",
    cold_floor: Annotated[float, typer.Option(help="Edge layers saturated on fewer than this share of tokens are "
                                                   "cold (never skipped).")] = 0.05,
    min_class_tokens: Annotated[int, typer.Option(help="Classes with fewer profiled tokens fall back to the "
                                                       "global plan.")] = 256,
    refine: Annotated[bool, typer.Option("--refine", help="Choose by measured KL on calibration data (loads the "
                                                          "model): static, the layer set; adaptive, the run length "
                                                          "and dense-every, compared with the refined static plan.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Model folder or .gguf file for --refine (default: the model "
                                                      "the profile was recorded on).")] = None,
    data: Annotated[Optional[str], typer.Option(help="--data spec for --refine (default: bundled calibration).")] = None,
    batch_decision: Annotated[str, typer.Option(help="Adaptive: per_sequence (each row decides alone) or shared (the "
                                                     "rows of a batch fire together; fitted for --batch-size rows).")]
    = "per_sequence",
    batch_size: Annotated[int, typer.Option(min=1, help="With --batch-decision shared: the serving batch size the "
                                                        "thresholds are fitted for.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the router's 70/30 document split and the shared-batch "
                                           "resampling.")] = 0,
) -> None:
    """Fit a skip plan from a profile at a target skip ratio or within a quality budget."""
    from ..fit import FitError, FitSettings, fit_plan_file

    budget = _budget(target_skip, max_ppl_increase, max_kl, mode, per_class, classes)
    _check_options(target_skip, mode, apply_to, compensation, tau, warmup_tokens,
                   dense_every, max_skip, cold_floor, batch_decision)
    if compensation == "mean_output" and not refine and budget is None:
        raise CLIError("--compensation mean_output averages the FFN outputs on calibration text with the model: add "
                       "--refine (or fit to a quality budget)")
    if str(out) != "-":
        _check_writable(out)
    prof = load_profile(profile, partial_note="fitting from the tokens it has")
    settings = FitSettings(target=target_skip, mode=mode, apply_to=apply_to, warmup_tokens=warmup_tokens,
                           dense_every=dense_every, compensation=compensation, max_skip=max_skip, tau_mode=tau,
                           cold_floor=cold_floor, min_class_tokens=min_class_tokens, seed=seed,
                           batch_decision=batch_decision, batch_size=batch_size, gen_len=gen_len)
    profile_ref = {"path": str(profile), "sha256": _sha256(profile)}
    if budget is not None:
        _fit_budget(prof, settings, budget, profile_ref, model, data, out)
        return
    try:
        result = fit_plan_file(prof, settings, per_class=per_class, classes=classes, profile_ref=profile_ref)
    except FitError as e:
        raise CLIError(str(e))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if refine:
        _refine(result.plan_file, prof, settings.resolve(), _measuring_model(prof, model), data)
    _write(result.plan_file, out)


def _log_measurements() -> None:
    """Searches by measured KL take minutes: one stderr line per measured set."""
    import logging

    logger = logging.getLogger("skipprofiler")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[export-plan] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _measuring_model(profile, model_arg: str | None) -> str | None:
    """--model, else the model the profile was recorded on (said on stderr)."""
    _log_measurements()
    if model_arg is not None:
        return model_arg
    model_arg = _profiled_model(profile)
    print(f"measuring on the profiled model: {model_arg or 'the bundled demo model'}", file=sys.stderr)
    return model_arg


def _write(plan_file, out: Path) -> None:
    from ..plan import PlanError
    from ..planio import dump_plan, save_plan

    try:
        if str(out) == "-":
            sys.stdout.write(dump_plan(plan_file))
            return
        save_plan(plan_file, out)
    except PlanError as e:
        raise CLIError(f"the fitted plan is invalid (a bug): {e}")
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e}")
    _print_summary(plan_file, out)


def _budget(target_skip: float | None, max_ppl_increase: float | None, max_kl: float | None, mode: str,
            per_class: bool, classes: list[str] | None):
    """The quality budget (None when a --target-skip ratio is asked for); exactly one of the two kinds."""
    from ..refine import Budget

    if max_ppl_increase is None and max_kl is None:
        if target_skip is None:
            raise CLIError("give --target-skip R, or a quality budget: --max-ppl-increase P and/or --max-kl X")
        return None
    if target_skip is not None:
        raise CLIError("--target-skip and a quality budget (--max-ppl-increase/--max-kl) exclude each other")
    for name, value in (("--max-ppl-increase", max_ppl_increase), ("--max-kl", max_kl)):
        if value is not None and not value > 0:
            raise CLIError(f"{name} must be > 0, got {value:g}")
    if mode != "static":
        raise CLIError("a quality budget fits static plans; drop --mode adaptive")
    if per_class or classes:
        raise CLIError("a quality budget fits the global plan only; drop --per-class/--class")
    return Budget(max_kl=max_kl, max_ppl_increase=max_ppl_increase)


def _fit_budget(profile, settings, budget, profile_ref: dict, model_arg: str | None, data: str | None,
                out: Path) -> None:
    from ..fit import FitError, assemble_plan_file
    from ..plan import SkipPlan
    from ..refine import RefineError, fit_budget_plan
    from .common import load_model

    try:
        settings = settings.resolve()
    except FitError as e:
        raise CLIError(str(e))
    model, tokenizer = load_model(_measuring_model(profile, model_arg), dtype="float32", device="cpu")
    _check_fingerprint(profile, model)
    template = SkipPlan(mode="static", apply_to=settings.apply_to, warmup_tokens=settings.warmup_tokens,
                        dense_every=settings.dense_every, compensation=settings.compensation)
    try:
        plan = fit_budget_plan(model, tokenizer, template, budget, data, gen_len=settings.gen_len)
    except RefineError as e:
        raise CLIError(str(e))
    _write(assemble_plan_file(profile, settings, plan, profile_ref=profile_ref), out)
    record = plan.fit["budget_fit"]
    print(f"budget {record['budget']}: {len(plan.skip_layers)} layers, expected skip {plan.expected_skip_ratio:.3f}; "
          f"measured on calibration windows: KL {record['kl']:.4f}, perplexity {record['ppl_increase']:+.1%}",
          file=sys.stderr)


def _check_fingerprint(profile, model) -> None:
    from ..planio import fingerprint_problems
    from ..registry import model_fingerprint

    mismatch = fingerprint_problems((profile.header.get("model") or {}).get("fingerprint"), model_fingerprint(model))
    if mismatch:
        raise CLIError(f"the model is not the profile's model: {mismatch[0]}")


def _check_options(target: float | None, mode: str, apply_to: str, compensation: str, tau: str, warmup: int | None,
                   dense_every: int | None, max_skip: int | None, cold_floor: float, batch_decision: str) -> None:
    from ..plan import BATCH_DECISIONS, COMPENSATIONS

    if target is not None and not 0.0 < target < 1.0:
        raise CLIError(f"--target-skip must be in (0, 1), got {target:g}")
    for name, value, options in (("--mode", mode, ("static", "adaptive")), ("--apply-to", apply_to, ("decode", "all")),
                                 ("--compensation", compensation, COMPENSATIONS),
                                 ("--tau", tau, ("global", "per-layer")),
                                 ("--batch-decision", batch_decision, BATCH_DECISIONS)):
        if value not in options:
            raise CLIError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    if batch_decision == "shared" and mode != "adaptive":
        raise CLIError("--batch-decision shared applies to --mode adaptive only (static plans skip the same layers "
                       "in every row already)")
    for name, value in (("--warmup-tokens", warmup), ("--dense-every", dense_every)):
        if value is not None and value < 0:
            raise CLIError(f"{name} must be >= 0, got {value}")
    if dense_every == 1:
        raise CLIError("--dense-every 1 makes every token dense; use 0 (never) or >= 2")
    if max_skip is not None and max_skip < 1:
        raise CLIError(f"--max-skip must be >= 1, got {max_skip}")
    if max_skip is not None and mode != "adaptive":
        raise CLIError("--max-skip applies to --mode adaptive only")
    if not 0.0 <= cold_floor < 1.0:
        raise CLIError(f"--cold-floor must be in [0, 1), got {cold_floor:g}")


def _print_summary(plan_file, out: Path) -> None:
    from rich.console import Console

    from .show import plan_table

    console = Console(width=140)
    console.print(plan_table(plan_file, title=f"wrote {out}"))
    per_class = plan_file.global_plan.fit.get("class_skip_ratio")
    if per_class:
        console.print("global plan's simulated skip ratio per class: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()))
    if plan_file.router is not None:
        acc = plan_file.router.heldout_accuracy
        console.print(f"router: layer {plan_file.router.layer}, held-out accuracy "
                      f"{'-' if acc is None else f'{acc:.1%}'} (70/30 document split)")


def register(app: typer.Typer) -> None:
    app.command("export-plan", help=HELP)(export_plan)
