"""`skipprof eval`: fidelity and speed of skip plans on held-out data, with baselines, oracle and sweeps."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import load_profile, parse_batch_decisions
from .errors import CLIError

HELP = (
    "Measure what skip plans cost and save on held-out data (default: the bundled held-out split).\n\n"
    "Every row is measured at a stated generation length (--prompt-len dense tokens, then --gen-len decode "
    "positions per document). Per plan, per class and overall: teacher-forced perplexity dense vs plan, mean per-token KL(dense || plan) and "
    "top-1 agreement on decode positions (prompt prefix dense, then the plan's decode-time rule with warm-up and "
    "dense-every); greedy continuations with and without the plan; the realized skip ratio; decode tokens/s dense vs "
    "plan (interleaved, median) against the FLOP-ideal speedup. JSON layout: docs/eval-schema.md.\n\n"
    "Examples:\n\n"
    "  skipprof eval plans/demo-static-25.yaml\n\n"
    "  skipprof eval plans/demo-static-25.yaml plans/demo-adaptive-25.yaml --baselines --profile demo.prof "
    "--json eval.json\n\n"
    "  skipprof eval path/to/model plan.yaml --data heldout.jsonl --no-speed\n\n"
    "  skipprof eval SmolLM2-135M-Instruct.Q4_1.gguf plans/smollm2-static-25.yaml --baselines --qa --gen-len 256\n\n"
    "  skipprof eval --profile demo.prof --sweep 0.05,0.1,0.15,0.25,0.35 --baselines --json sweep.json\n"
)


def _is_plan_path(arg: str) -> bool:
    return arg.lower().endswith((".yaml", ".yml"))


def split_model_and_plans(args: list[str]) -> tuple[str | None, list[str]]:
    """`[MODEL] PLAN...`: the first argument is the model when it is not a .yaml/.yml file."""
    if args and not _is_plan_path(args[0]):
        return args[0], args[1:]
    return None, list(args)


def load_model_and_tokenizer(model_arg: str | None, dtype: str):
    """The shared loader (one-line errors for missing paths, non-causal models, unknown architectures)."""
    from .common import load_model

    return load_model(model_arg, dtype=dtype, device="cpu")


def load_plans(paths: list[str]) -> list[tuple[str, Any]]:
    from ..plan import PlanError
    from ..runtime import load_plan

    plans = []
    for path in paths:
        if not Path(path).is_file():
            raise CLIError(f"plan file not found: {path}")
        try:
            plans.append((Path(path).stem, load_plan(path)))
        except PlanError as e:
            raise CLIError(f"{path}: invalid plan: {'; '.join(e.problems)}")
    names = [n for n, _ in plans]
    if len(set(names)) != len(names):  # same file name in two folders: keep the rows apart
        plans = [(str(Path(p).with_suffix("")), plan) for p, (_, plan) in zip(paths, plans)]
    return plans


def parse_sweep(text: str) -> list[float]:
    try:
        targets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--sweep takes comma-separated ratios like 0.05,0.1,0.25; got {text!r}")
    bad = [t for t in targets if not 0.0 < t < 1.0]
    if not targets or bad:
        raise CLIError(f"--sweep targets must be in (0, 1); got {text!r}")
    return targets


def write_json_atomic(data: dict, path: Path) -> None:
    write_text_atomic(json.dumps(data, indent=1, allow_nan=False) + "\n", path)


def write_text_atomic(text: str, path: Path) -> None:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"cannot write {path}: folder {folder} does not exist")
    from ..atomic import write_text_atomic as write  # the one atomic writer (mode 0666 & ~umask, not mkstemp's 0600)

    try:
        write(path, text)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror}")


COLUMNS = (
    ("skip", "realized skip ratio: skipped FFN calls / (decode positions after the warm-up x layers)"),
    ("saved", "skipped FFN calls / (every generated position x layers), warm-up included: what the generation saves"),
    ("KL", "mean per-token KL(dense || plan) on decode positions, teacher-forced"),
    ("ppl", "teacher-forced perplexity on decode positions; Δppl relative to dense"),
    ("top-1", "share of decode positions where plan and dense predict the same next token"),
    ("greedy", "share of greedy continuation tokens identical to dense; 1st div: mean position of the first difference"),
    ("speedup", "decode tokens/s plan / dense (interleaved, median); ideal: the FLOP-count speedup of 'saved'"),
    ("QA", "short-answer accuracy on the QA set; kept: QA accuracy / dense QA accuracy (with --qa)"),
)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    data = result["data"]
    dense_qa = result["dense"].get("qa")
    qa_title = f"; dense QA {dense_qa['accuracy']:.3f}" if dense_qa else ""
    table = Table(title=f"{result['model']['name']} on {data['spec']}  (dense ppl {result['dense']['ppl']}{qa_title}; "
                        f"{data['prompt_len']}-token prompts, {data['gen_len']} generated positions per document)")
    columns = ["plan", "decided", "saved", "KL", "ppl", "Δppl", "top-1", "greedy", "1st div", "speedup", "ideal"]
    columns += ["QA", "kept"] if dense_qa else []
    for col in columns:
        table.add_column(col, justify="left" if col == "plan" else "right")
    for row in result["plans"]:
        fmt = lambda v, f="{:.3f}": "–" if v is None else f.format(v)  # noqa: E731
        name = row["name"] + (" [!]" if row.get("warnings") else "")
        table.add_row(name, fmt(row["skip_ratio"]), fmt(row.get("saved_share")), fmt(row["kl_mean"], "{:.4f}"),
                      fmt(row["ppl"], "{:.2f}"), fmt(row["ppl_increase"], "{:+.1%}"), fmt(row["top1_agreement"]),
                      fmt(row.get("greedy_agreement")), fmt(row.get("first_divergence_mean"), "{:.1f}"),
                      fmt(row.get("speedup"), "{:.2f}×"), fmt(row.get("ideal_speedup"), "{:.2f}×"),
                      *((fmt(row.get("qa_accuracy")), fmt(row.get("qa_retention"), "{:.1%}")) if dense_qa else ()))
    console = Console(width=max(160, Console().width))
    console.print(table)
    for name, meaning in COLUMNS:
        if name == "QA" and not dense_qa:
            continue
        console.print(f"  [bold]{name}[/bold]: {meaning}", highlight=False)
    for row in result["plans"]:
        for warning in row.get("warnings") or []:
            print(f"warning: {row['name']}: {warning}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    def eval_cmd(
        args: Annotated[Optional[list[str]], typer.Argument(metavar="[MODEL] PLAN...",
                                                             help="model folder/name (default: bundled demo) "
                                                                  "then one or more plan YAML files")] = None,
        data: Annotated[Optional[str], typer.Option(help="held-out data file (.jsonl[.gz]/.parquet/.txt; "
                                                         "labels from a `class` column)")] = None,
        json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results here (JSON)")] = None,
        baselines: Annotated[bool, typer.Option(
            help="add random / contiguous-window / paper-default adaptive / LLM-Drop / ShortGPT rows at the first "
                 "plan's realized ratio")] = False,
        oracle: Annotated[Optional[bool], typer.Option(
            "--oracle/--no-oracle",
            help="exhaustive static reference (default: with --baselines when the model has <= 16 layers)")] = None,
        search_reference: Annotated[Optional[bool], typer.Option(
            "--search-reference/--no-search-reference",
            help="greedy + swap static reference searched by measured KL on held-out windows (default: with "
                 "--baselines when the exhaustive oracle is too large)")] = None,
        profile: Annotated[Optional[Path], typer.Option(
            help="profile file: LLM-Drop ranking and --sweep fitting")] = None,
        sweep: Annotated[Optional[str], typer.Option(help="fit static+adaptive plans at these target ratios from "
                                                          "--profile and evaluate each, e.g. 0.05,0.1,0.25")] = None,
        refine: Annotated[bool, typer.Option(help="with --sweep: refine the static sets by measured KL on the "
                                                  "calibration split")] = True,
        per_class: Annotated[bool, typer.Option(help="with --sweep: also fit class plans and evaluate them routed "
                                                     "by each document's label")] = False,
        docs_per_class: Annotated[int, typer.Option(min=1, help="held-out documents per class")] = 16,
        prompt_len: Annotated[int, typer.Option(min=1, help="dense prompt tokens per document")] = 64,
        gen_len: Annotated[int, typer.Option(min=2, help="decode positions per document after the prompt: the "
                                                         "generation length the plans are judged at")] = 256,
        greedy_prompts: Annotated[int, typer.Option(min=0, help="prompts for greedy agreement")] = 8,
        greedy_tokens: Annotated[int, typer.Option(min=1, help="greedy tokens per prompt")] = 32,
        speed: Annotated[bool, typer.Option(help="measure decode tokens/s dense vs plan")] = True,
        speed_repeats: Annotated[int, typer.Option(
            min=5, help="timed rounds (median of >= 5; a warm-up round is extra)")] = 5,
        speed_tokens: Annotated[int, typer.Option(min=2, help="decoded tokens per timed run")] = 64,
        seeds: Annotated[int, typer.Option(min=1, help="random-baseline seeds")] = 3,
        oracle_at: Annotated[Optional[str], typer.Option(help="with --sweep: run the oracle only at these targets "
                                                              "(default: every target needing <= 150 sets)")] = None,
        dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
        threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch default)")] = 0,
        batch_decision: Annotated[Optional[str], typer.Option(
            help="adaptive plans' fidelity: per_sequence (each document decides alone) or shared (the --batch-size "
                 "documents of a batch fire together, as rows decoding in one batch with apply_plan(batch_decision="
                 "'shared')); default: each plan's own")] = None,
        batch_size: Annotated[int, typer.Option(min=1, help="documents per teacher-forced batch")] = 16,
        qa: Annotated[bool, typer.Option(
            "--qa", help="knowledge retention: greedy short answers to factual questions with each plan and "
                         "baseline; accuracy and retention (plan accuracy / dense accuracy)")] = False,
        qa_file: Annotated[Optional[Path], typer.Option(
            help="QA questions (.jsonl: id, class, question, answers); default: the bundled set "
                 "(docs/qa-set.md)")] = None,
    ) -> None:
        from .. import evaluate as ev
        from ..fidelity import FidelityError
        from ..plan import PlanError
        from ..refine import RefineError

        parse_batch_decisions([batch_decision] if batch_decision else None)
        model_arg, plan_paths = split_model_and_plans(args or [])
        targets = parse_sweep(sweep) if sweep else []
        if not plan_paths and not targets:
            raise CLIError("give at least one PLAN file (or --sweep with --profile)")
        if targets and profile is None:
            raise CLIError("--sweep fits plans from a profile: add --profile PROFILE")
        if data is not None and not Path(data).exists():
            raise CLIError(f"data file not found: {data}")
        if qa_file is not None and not qa_file.is_file():
            raise CLIError(f"QA file not found: {qa_file}")
        plans = load_plans(plan_paths)
        prof = load_profile(profile, partial_note="fitting the sweep from the tokens it has") if profile else None
        if threads:
            import torch

            torch.set_num_threads(threads)
        model, tokenizer = load_model_and_tokenizer(model_arg, dtype)
        config = ev.EvalConfig(prompt_len=prompt_len, gen_len=gen_len, docs_per_class=docs_per_class,
                               greedy_prompts=greedy_prompts, greedy_new_tokens=greedy_tokens, speed=speed,
                               speed_repeats=speed_repeats, speed_new_tokens=speed_tokens, baselines=baselines,
                               random_seeds=seeds, oracle=oracle, search_reference=search_reference,
                               batch_size=batch_size, batch_decision=batch_decision, qa=qa or qa_file is not None,
                               qa_file=str(qa_file) if qa_file else None)
        log = lambda msg: print(f"[eval] {msg}", file=sys.stderr, flush=True)  # noqa: E731
        name = model_arg or "bundled demo model"
        try:
            if targets:
                result = ev.run_sweep(model, tokenizer, prof, targets, data, config, extra_plans=plans,
                                      refine=refine, per_class=per_class, model_name=name, log=log,
                                      oracle_targets=parse_sweep(oracle_at) if oracle_at else None)
            else:
                result = ev.run_eval(model, tokenizer, plans, data, config, profile=prof, model_name=name, log=log)
        except (ev.EvalError, PlanError, FidelityError, RefineError) as e:
            raise CLIError(str(e))
        print_table(result)
        if json_out is not None:
            write_json_atomic(result, json_out)
            print(f"wrote {json_out}", file=sys.stderr)
