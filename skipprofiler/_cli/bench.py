"""`skipprof bench decode`: decode tokens/s dense vs skip plans (whole-FFN skips, linear maps, neuron subsets),
interleaved, median, against the FLOP ideal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options
from .common import parse_batch_decisions, write_output
from .errors import CLIError

BENCH_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # skipprofiler.evaluation.bench's names

HELP = (
    "Time greedy decoding (KV cache, hand-written loop) dense vs skip plans.\n\n"
    "Arms run interleaved in rotating order; the first round is a warm-up and is dropped; each arm reports the "
    "median of --repeats (>= 5) runs: tokens/s, measured speedup over dense, the FLOP-ideal speedup for that plan on "
    "that model (attention, FFN and LM-head FLOPs; the FFN FLOPs saved net of substitutes as the runtime counts them: "
    "skipped FFN calls and the dropped neurons of neuron plans, less linear maps and mean biases) and their "
    "ratio.\n\n"
    "With plan files the arms are dense + each plan. Without, they are dense, the empty plan, a static plan at "
    "--static and adaptive plans calibrated on the model to each --adaptive target (speed only: those thresholds "
    "are not fitted for quality).\n\n"
    "At batch > 1, adaptive arms run once per --batch-decision: per_sequence (each row follows the rule alone) and "
    "shared (the rows of a step fire together, so whole FFN calls are saved); see apply_plan.\n\n"
    "Examples:\n\n"
    "  skipprof bench decode plans/demo-static-25.yaml plans/demo-adaptive-25.yaml\n\n"
    "  skipprof bench decode -m synthetic:llama-100m -b 1 -b 8 --dtype float32 --dtype bfloat16\n\n"
    "  skipprof bench decode -m synthetic:llama-tiny --new-tokens 16 -o bench.json"
)


def _parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--adaptive must be comma-separated skip ratios like 0.05,0.25; got {text!r}")
    if any(not 0 < t < 1 for t in targets):
        raise CLIError(f"--adaptive skip ratios must lie in (0, 1); got {text!r}")
    return targets


def _model_spec(model: str | None) -> str:
    """`synthetic:<name>` as is; anything else (None = the bundled demo) resolved like every other command's model."""
    if model is not None and model.startswith("synthetic:"):
        from ..evaluation.bench import SYNTHETIC_CONFIGS

        name = model.split(":", 1)[1]
        if name not in SYNTHETIC_CONFIGS:
            raise CLIError(f"unknown synthetic model {name!r}; known: {', '.join(SYNTHETIC_CONFIGS)}")
        return model
    from .common import model_location

    return model_location(model)


def _plan_arms(plans: list[Path], prompt_class: str | None, decisions: list[str]):
    """One arm per plan file (its own batch decision), or per given batch decision for plans with an adaptive part."""
    from ..evaluation.bench import Arm
    from ..plan.model import PlanError
    from ..runtime import load_plan

    arms = []
    for path in plans:
        if not path.is_file():
            raise CLIError(f"plan file not found: {path}")
        try:
            plan_file = load_plan(path)
        except PlanError as e:
            raise CLIError(f"{path}: {e}")
        adaptive = any(p.mode == "adaptive" for p in [plan_file.global_plan, *plan_file.classes.values()])
        if not (adaptive and decisions):
            arms.append(Arm(path.stem, plan_file, prompt_class))
            continue
        for decision in decisions:
            arms.append(Arm(f"{path.stem} {decision}", plan_file, prompt_class, batch_decision=decision))
    return arms


def _check_arms(model_spec: str, dtype: str, arms) -> None:
    """Apply each plan once before timing anything, so a plan for another model fails fast with one line."""
    from ..evaluation.bench import DTYPES, load_suite_model
    from ..plan.model import PlanError
    from ..arch.registry import UnsupportedArchitecture
    from ..runtime import apply_plan

    model, _ = load_suite_model(model_spec, DTYPES[dtype])
    for arm in arms:
        try:
            apply_plan(model, arm.plan, prompt_class=arm.prompt_class).remove()
        except (PlanError, UnsupportedArchitecture) as e:
            raise CLIError(f"plan {arm.name}: {e}")


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Benchmarks: decode speed of skip plans.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

    @bench_app.command("decode", help=HELP)
    def decode(
        plans: Annotated[Optional[list[Path]], typer.Argument(metavar="[PLAN]...", show_default=False,
                                                              help="Plan YAML files (default: synthetic arms).")
                         ] = None,
        model: Annotated[Optional[str], typer.Option(
            "--model", "-m", metavar="MODEL", show_default=False,
            help="Checkpoint folder, .gguf file or hub id, or synthetic:llama-100m / synthetic:llama-tiny (default: "
                 "the bundled demo model).")] = None,
        batch_size: Annotated[Optional[list[int]], typer.Option(
            "--batch-size", "-b", metavar="N", show_default=False,
            help="Rows decoded together; repeatable (default 1).")] = None,
        batch: Annotated[Optional[list[int]], typer.Option("--batch", hidden=True, show_default=False)] = None,
        dtype: Annotated[Optional[list[str]], typer.Option(
            metavar="DTYPE", show_default=False,
            help=f"Weights dtype: {options.DTYPE_VALUES}; repeatable (default float32).")] = None,
        static: Annotated[float, typer.Option(metavar="RATIO", help="Skip ratio of the synthetic static arm (0: "
                                                                    "none).")] = 0.29,
        adaptive: Annotated[str, typer.Option(metavar="RATIOS", help="Adaptive skip targets, comma-separated ('' for "
                                                                     "none).")] = "0.05,0.10,0.25,0.35",
        prompt_class: Annotated[Optional[str], typer.Option(
            "--class", metavar="CLASS", show_default=False,
            help="Prompt class for plan files (a class name or auto).")] = None,
        new_tokens: Annotated[int, typer.Option(metavar="N", help="Tokens generated per timed run.")] = 128,
        prompt_len: Annotated[int, typer.Option(metavar="N", help="Random prompt tokens per row.")] = 16,
        prompt_tokens: Annotated[Optional[int], typer.Option("--prompt-tokens", hidden=True, show_default=False)
                                 ] = None,
        repeats: Annotated[int, typer.Option(metavar="N", help="Timed runs per arm (>= 5), after one warm-up "
                                                               "round.")] = 5,
        batch_decision: Annotated[Optional[list[str]], typer.Option(
            metavar="DECISION", show_default=False,
            help="Adaptive arms at batch > 1: per_sequence and/or shared; repeatable (default: both for the "
                 "synthetic arms, each plan file's own).")] = None,
        threads: options.Threads = 0,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", show_default=False,
                                                    help="Write the result rows here as JSON.")] = None,
        json_path: Annotated[Optional[Path], typer.Option("--json", hidden=True, show_default=False)] = None,
    ) -> None:
        from .common import DTYPES, check_writable

        prompt_len = prompt_tokens if prompt_tokens is not None else prompt_len
        out = out or json_path
        if repeats < 5:
            raise CLIError(f"--repeats must be at least 5 (got {repeats}): medians of fewer runs are not reported")
        if new_tokens < 2 or prompt_len < 1:
            raise CLIError("--new-tokens must be >= 2 and --prompt-len >= 1")
        batches = (batch_size or []) + (batch or []) or [1]
        if any(b < 1 for b in batches):
            raise CLIError(f"--batch-size must be >= 1; got {batches}")
        canonical = [DTYPES.get(d.lower()) for d in dtype or ["float32"]]
        if None in canonical:
            raise CLIError(f"unknown --dtype {(dtype or [])[canonical.index(None)]!r}; use {options.DTYPE_VALUES}")
        dtypes = [BENCH_DTYPE[d] for d in canonical]
        if out is not None:
            check_writable(out)
        spec = _model_spec(model)
        decisions = parse_batch_decisions(batch_decision)
        plan_arms = _plan_arms(plans or [], prompt_class, decisions)
        targets = _parse_targets(adaptive) if not plan_arms else []
        import torch

        from ..evaluation.bench import run_suite

        if threads:
            torch.set_num_threads(threads)
        if plan_arms:
            _check_arms(spec, dtypes[0], plan_arms)
        suites = run_suite(spec, batches, dtypes, None if plan_arms else (static or None), targets,
                           plan_arms=plan_arms, new_tokens=new_tokens, prompt_tokens=prompt_len,
                           repeats=repeats, include_defaults=not plan_arms,
                           batch_decisions=tuple(decisions or ("per_sequence", "shared")),
                           log=lambda m: typer.echo(m, err=True))
        for suite in suites:
            typer.echo(suite.table())
        if out is not None:
            rows = [row for suite in suites for row in suite.rows()]
            write_output(out, json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
            typer.echo(f"wrote {out}", err=True)
