"""`skipprof export-plan`: fit a YAML skip plan from a profile at a target skip ratio."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options
from .common import load_profile
from .errors import CLIError, in_option_words

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
    "  skipprof export-plan smollm2.prof --max-ppl-increase 0.10 --out plans/smollm2-budget-10.yaml\n\n"
    "  skipprof export-plan smollm2.prof --granularity neurons --target-skip 0.22 --out plans/smollm2-neurons-22.yaml\n"
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
    from ..arch.models import ModelSourceError, model_source

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


def export_plan(
    profile: Annotated[Path, typer.Argument(help="Profile file written by `skipprof profile`.", show_default=False,
                                            metavar="PROFILE")],
    target_skip: Annotated[Optional[float], typer.Option(
        "--target-skip", "-r", metavar="RATIO", show_default=False,
        help="Fraction of decode-token FFN calls to skip, in (0, 1).")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(
        metavar="SHARE", show_default=False,
        help="Quality budget instead of a ratio (static): skip as many FFNs as keep the measured perplexity increase "
             "on calibration windows within this share, e.g. 0.10 for +10 %. Loads the model.")] = None,
    max_kl: Annotated[Optional[float], typer.Option(
        metavar="KL", show_default=False,
        help="Quality budget instead of a ratio (static): keep the measured mean KL(dense || plan) on calibration "
             "windows within this value. Combines with --max-ppl-increase. Loads the model.")] = None,
    mode: Annotated[str, typer.Option(metavar="MODE", help="static (fixed layers) or adaptive (FFN-SkipLLM threshold "
                                                           "rule).")] = "static",
    per_class: Annotated[bool, typer.Option("--per-class", help="Add a plan per corpus class and a prompt router.")
                         ] = False,
    classes: Annotated[Optional[list[str]], typer.Option(
        "--class", metavar="CLASS", show_default=False,
        help="Fit plans for these classes only (repeatable; no router).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH",
                                      help="Where to write the YAML plan ('-' for stdout).")] = Path("plan.yaml"),
    gen_len: Annotated[int, typer.Option(min=1, metavar="N", help="Generated tokens per request the plan is for: the "
                                                                  "warm-up default and the skip ratio are counted "
                                                                  "over them.")] = 256,
    warmup_tokens: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False,
        help="Generated tokens decoded densely first. Default: adaptive --gen-len // 64 (the paper's rule), "
             "static 0.")] = None,
    dense_every: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False,
        help="Every n-th generated token fully dense (0: never). Default: adaptive 6, static 0.")] = None,
    apply_to: Annotated[str, typer.Option(metavar="WHERE", help="decode (prompt stays dense) or all.")] = "decode",
    compensation: Annotated[str, typer.Option(
        metavar="KIND", help="none; norm_ratio (scale the skipped FFN's input by the calibrated mean norm gain, as "
                             "AdaSkip); mean_output (add the FFN's mean output on calibration decode tokens); or "
                             "linear (a ridge least-squares linear map of the FFN's input in its place, fitted in "
                             "closed form on calibration decode tokens, layers chosen with the maps in place; "
                             "written to a .safetensors file beside the plan). mean_output and linear are measured, "
                             "so they need --refine or a quality budget. With --granularity neurons: none "
                             "(narrowing only) or linear (the width search may also skip a whole FFN, with a full-rank "
                             "linear map, where that measured cheaper than narrowing).")] = "none",
    rank: Annotated[Optional[int], typer.Option(
        metavar="R", show_default=False,
        help="With --compensation linear: maps of rank R (2·d·R FLOPs per skipped call instead of d²). With "
             "--neuron-fill map: the rank of each narrowed FFN's map (2·R·(k+d) FLOPs per row; default 32).")] = None,
    error_aware: Annotated[bool, typer.Option(
        "--error-aware", help="With --compensation linear --refine: refit the chosen layers' maps in layer order, each "
                              "on the inputs the earlier substitutes produce, and keep the refit if it lowers the "
                              "measured KL by >= 1 % (one statistics pass per layer; on SmolLM2 it changed the "
                              "calibration KL by -1.2 % at 10 % and +1.8 % at 25 %: docs/results.md).")] = False,
    max_skip: Annotated[Optional[int], typer.Option(
        metavar="K", show_default=False,
        help="Adaptive run length k. Default: searched (the k whose skipped calls have the highest mean "
             "cosine).")] = None,
    tau: Annotated[str, typer.Option(metavar="KIND", help="Adaptive thresholds: global (one tau) or per-layer (one "
                                                          "quantile level of each layer's cosine).")] = "global",
    cold_floor: Annotated[float, typer.Option(metavar="SHARE", help="Edge layers saturated on fewer than this share "
                                                                    "of tokens are cold (never skipped).")] = 0.05,
    min_class_tokens: Annotated[int, typer.Option(metavar="N", help="Classes with fewer profiled tokens fall back "
                                                                    "to the global plan.")] = 256,
    refine: Annotated[bool, typer.Option("--refine", help="Choose by measured KL on calibration data (loads the "
                                                          "model): static, the layer set; adaptive, the run length "
                                                          "and dense-every, compared with the refined static "
                                                          "plan.")] = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="MODEL", show_default=False,
        help="Checkpoint folder, .gguf file or hub id to measure on with --refine or a budget (default: the model "
             "the profile was recorded on).")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", "-d", metavar="SPEC", show_default=False,
        help="Calibration data for --refine and budgets (default: the bundled calibration split).")] = None,
    text_column: options.TextColumn = None,
    class_column: options.ClassColumn = None,
    batch_decision: Annotated[str, typer.Option(
        metavar="DECISION", help="Adaptive: per_sequence (each row decides alone) or shared (the rows of a batch "
                                 "fire together; fitted for --batch-size rows).")] = "per_sequence",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1, metavar="N",
        help="With --batch-decision shared: the serving batch size the thresholds are fitted for.")] = 8,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the router's 70/30 document split and the "
                                                        "shared-batch resampling.")] = 0,
    granularity: Annotated[str, typer.Option(
        metavar="GRANULARITY",
        help="What a plan leaves out at decode positions: ffn (whole FFN calls) or neurons (part of every FFN: each "
             "layer keeps its most important intermediate neurons, widths per layer chosen by measured KL on "
             "calibration windows; --target-skip is then the share of FFN FLOPs saved, net of the mean bias; loads "
             "the model).")] = "ffn",
    neuron_fill: Annotated[Optional[str], typer.Option(
        metavar="FILL", show_default=False,
        help="With --granularity neurons: what replaces the dropped neurons' output, mean (their mean output from the "
             "profile's statistics, --neuron-statistics, added as a bias; the default), map (a rank --rank "
             "least-squares map from the kept neurons' activations, fitted on calibration decode positions, plus its "
             "bias: costs 2·R·(k+d) FLOPs per row, measured to lower KL by a sixth at rank 32 on SmolLM2), refit "
             "(that map at full rank folded into a copy of the kept neurons' down columns: no extra FLOPs, but the "
             "plan holds a d x k matrix per layer, +15 % of SmolLM2's weights at 22 %), auto "
             "(mean or map, whichever measures the lower KL at the uniform start, each at the same FLOPs saved net "
             "of its fill: on SmolLM2 the map wins at 22 %, the mean at 10 %) or none.")] = None,
    neuron_importance: Annotated[Optional[str], typer.Option(
        metavar="KIND", show_default=False,
        help="With --granularity neurons: how an FFN's neurons are ranked, energy (E[a^2] times the down column's "
             "squared norm; the default), fluctuation (Var[a] times it, as FLAP) or wanda (input weights |W| times "
             "the input's RMS, gate and up).")] = None,
    neuron_statistics: Annotated[Optional[str], typer.Option(
        metavar="REGIME", show_default=False,
        help="With --granularity neurons: whose profile statistics rank the neurons and give the mean bias, decode "
             "(the generated tokens), prompt (the teacher-forced corpus tokens) or auto (each measured at one uniform "
             "width on the calibration windows, the lower KL kept; the default).")] = None,
    neuron_rounds: Annotated[int, typer.Option(
        metavar="N", min=0,
        help="With --granularity neurons: exchange rounds of the width search (each measures narrowing every layer "
             "once; more rounds, lower KL, a longer fit).")] = 2,
) -> None:
    """Fit a skip plan from a profile at a target skip ratio or within a quality budget."""
    from ..fit.from_profile import FitError, FitSettings
    from ..fit.recipe import fit_plan
    from .common import check_writable, load_model_and_tokenizer

    settings = FitSettings(target=target_skip, mode=mode, apply_to=apply_to, warmup_tokens=warmup_tokens,
                           dense_every=dense_every, compensation=compensation, rank=rank, error_aware=error_aware,
                           max_skip=max_skip,
                           tau_mode=tau,
                           cold_floor=cold_floor, min_class_tokens=min_class_tokens, seed=seed,
                           batch_decision=batch_decision, batch_size=batch_size, gen_len=gen_len,
                           per_class=per_class, classes=classes, max_ppl_increase=max_ppl_increase, max_kl=max_kl,
                           refine=refine, data=data, text_column=text_column, class_column=class_column,
                           granularity=granularity, neuron_fill=neuron_fill, neuron_importance=neuron_importance,
                           neuron_statistics=neuron_statistics, neuron_rounds=neuron_rounds)
    problems = settings.problems()
    if compensation == "linear" and str(out) == "-":
        problems.append("--compensation linear writes its maps to a .safetensors file beside the plan: give "
                        "--out PATH, not '-'")
    if granularity == "neurons" and str(out) == "-":
        problems.append("--granularity neurons writes the kept neurons to a .safetensors file beside the plan: give "
                        "--out PATH, not '-'")
    if problems:
        raise CLIError("; ".join(problems))
    if str(out) != "-":
        check_writable(out)
    prof = load_profile(profile, partial_note="fitting from the tokens it has")
    loaded, tokenizer = (None, None)
    if settings.needs_model:
        loaded, tokenizer = load_model_and_tokenizer(_measuring_model(prof, model), dtype="float32", device="cpu")
    try:
        result = fit_plan(prof, settings, model=loaded, tokenizer=tokenizer,
                          profile_ref={"path": str(profile), "sha256": _sha256(profile)})
    except FitError as e:
        raise CLIError(str(e)) from None
    for warning in result.warnings:
        print(f"warning: {in_option_words(warning)}", file=sys.stderr)
    _write(result.plan_file, out)
    for note in result.notes:
        print(in_option_words(note), file=sys.stderr)


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
    from ..plan.model import PlanError
    from ..plan import dump_plan, save_plan

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
