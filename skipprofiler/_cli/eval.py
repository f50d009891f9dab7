"""`skipprof eval`: fidelity and speed of skip plans on held-out data, with baselines, oracle and sweeps."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options
from .common import check_writable, load_profile, parse_batch_decisions
from .errors import CLIError, in_option_words

HELP = (
    "Measure what skip plans cost and save on held-out data (default: the bundled held-out split).\n\n"
    "Every row is measured at a stated generation length (--prompt-len dense tokens, then --gen-len decode "
    "positions per document). Per plan, per class and overall: teacher-forced perplexity dense vs plan, mean "
    "per-token KL(dense || plan) and "
    "top-1 agreement on decode positions (prompt prefix dense, then the plan's decode-time rule with warm-up and "
    "dense-every); greedy continuations with and without the plan; the realized skip ratio; decode tokens/s dense vs "
    "plan (interleaved, median) against the FLOP-ideal speedup. JSON layout: docs/eval-schema.md.\n\n"
    "Examples:\n\n"
    "  skipprof eval plans/demo-static-25.yaml\n\n"
    "  skipprof eval plans/demo-static-25.yaml plans/demo-adaptive-25.yaml --baselines --profile demo.prof "
    "-o eval.json\n\n"
    "  skipprof eval -m path/to/model plan.yaml --data heldout.jsonl --no-speed\n\n"
    "  skipprof eval -m chats/model plan.yaml --data chats.jsonl --text-column messages --class-column topic\n\n"
    "  skipprof eval -m SmolLM2-135M-Instruct.Q4_1.gguf plans/smollm2-static-25.yaml --baselines --qa --gen-len 256\n\n"
    "  skipprof eval --profile demo.prof --sweep 0.05,0.1,0.15,0.25,0.35 --baselines -o sweep.json\n\n"
    "A progress bar per stage (loading, dense pass, each plan, baselines, oracle or search reference, QA) shows "
    "steps done and an ETA on stderr; the table's columns are explained below it.\n"
)


def _is_plan_path(arg: str) -> bool:
    return arg.lower().endswith((".yaml", ".yml"))


def split_model_and_plans(args: list[str]) -> tuple[str | None, list[str]]:
    """`[MODEL] PLAN...`: the first argument is the model when it is not a .yaml/.yml file (the older form; the
    vocabulary's is --model)."""
    if args and not _is_plan_path(args[0]):
        return args[0], args[1:]
    return None, list(args)


def parse_ratios(text: str, option: str) -> list[float]:
    try:
        targets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{option} takes comma-separated ratios like 0.05,0.1,0.25; got {text!r}") from None
    if not targets or any(not 0.0 < t < 1.0 for t in targets):
        raise CLIError(f"{option} targets must be in (0, 1); got {text!r}")
    return targets


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise CLIError(f"--lm-eval takes comma-separated harness task names like skipprof_qa,hellaswag; got {text!r}")
    return tasks


COLUMNS = (
    ("decided", "realized skip ratio: FFN calls the plan's rule skipped / (decode positions after the warm-up x layers)"),
    ("saved", "share of the generation's FFN FLOPs not spent (every generated position x layers, warm-up "
              "included): skipped FFN calls and the dropped neurons of narrowed ones, less what linear maps and mean "
              "biases computed in their place"),
    ("KL", "mean per-token KL(dense || plan) on decode positions, teacher-forced"),
    ("ppl", "teacher-forced perplexity on decode positions; Δppl relative to dense"),
    ("top-1", "share of decode positions where plan and dense predict the same next token"),
    ("greedy", "share of greedy continuation tokens identical to dense"),
    ("1st div", "mean position of the first greedy token that differs from dense (= --greedy-new-tokens when none does)"),
    ("speedup", "decode tokens/s plan / dense (interleaved, median of --speed-repeats runs)"),
    ("ideal", "the FLOP-count speedup of 'saved' (attention, cache, FFN and LM-head FLOPs per decode token): what "
              "not computing those FFN FLOPs could give at best"),
    ("QA", "short-answer accuracy on the QA set (with --qa)"),
    ("kept", "QA accuracy / dense QA accuracy (with --qa)"),
    ("memory", "what the applied plan holds beside the model's weights (linear maps, neuron biases and maps, refitted "
               "down columns), as a share of them"),
)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    data = result["data"]
    dense_qa = result["dense"].get("qa")
    qa_title = f"; dense QA {dense_qa['accuracy']:.3f}" if dense_qa else ""
    table = Table(title=f"{result['model']['name']} on {data['spec']}  (dense ppl {result['dense']['ppl']}{qa_title}; "
                        f"{data['prompt_len']}-token prompts, {data['gen_len']} generated positions per document)")
    columns = ["plan", "decided", "saved", "KL", "ppl", "Δppl", "top-1", "greedy", "1st div", "speedup", "ideal"]
    columns += ["QA", "kept"] if dense_qa else []
    columns += ["memory"]
    for col in columns:
        table.add_column(col, justify="left" if col == "plan" else "right")
    for row in result["plans"]:
        fmt = lambda v, f="{:.3f}": "–" if v is None else f.format(v)  # noqa: E731
        name = row["name"] + (" [!]" if row.get("warnings") else "")
        table.add_row(escape(name), fmt(row["skip_ratio"]),
                      fmt(row.get("ffn_flops_saved_share", row.get("saved_share"))), fmt(row["kl_mean"], "{:.4f}"),
                      fmt(row["ppl"], "{:.2f}"), fmt(row["ppl_increase"], "{:+.1%}"), fmt(row["top1_agreement"]),
                      fmt(row.get("greedy_agreement")), fmt(row.get("first_divergence_mean"), "{:.1f}"),
                      fmt(row.get("speedup"), "{:.2f}×"), fmt(row.get("ideal_speedup"), "{:.2f}×"),
                      *((fmt(row.get("qa_accuracy")), fmt(row.get("qa_retention"), "{:.1%}")) if dense_qa else ()),
                      fmt(row.get("plan_memory_share"), "+{:.1%}"))
    console = Console(width=max(160, Console().width))
    console.print(table)
    for name, meaning in COLUMNS:
        if name in ("QA", "kept") and not dense_qa:
            continue
        console.print(f"  [bold]{name}[/bold]: {meaning}", highlight=False)
    for row in result["plans"]:
        if row.get("router_accuracy") is not None:
            per_class = ", ".join(f"{c} {a:.0%}" for c, a in row["router_accuracy_per_class"].items())
            console.print(f"  router: {escape(row['name'])} sent {row['router_accuracy']:.1%} of the held-out prompts "
                          f"to their labelled class's plan ({per_class})", highlight=False)
    print_lm_eval(result, console)
    for row in result["plans"]:
        for warning in row.get("warnings") or []:
            print(f"warning: {row['name']}: {in_option_words(warning)}", file=sys.stderr)


def print_lm_eval(result: dict, console) -> None:
    """The harness's numbers (--lm-eval): one row per task and metric, one column per run (dense, then each plan)."""
    from rich.markup import escape
    from rich.table import Table

    dense = result["dense"].get("lm_eval")
    if not dense:
        return
    runs = [("dense", dense)] + [(row["name"], row["lm_eval"]) for row in result["plans"] if row.get("lm_eval")]
    table = Table(title="lm-evaluation-harness (value ± stderr; decode-only: docs/lm-eval.md)")
    table.add_column("task")
    table.add_column("metric")
    for name, _ in runs:
        table.add_column(escape(name), justify="right")
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in dense["results"]))
    for task, metric in keys:
        cells = []
        for _, section in runs:
            hit = next((r for r in section["results"] if (r["task"], r["metric"]) == (task, metric)), None)
            if hit is None or hit["value"] is None:
                cells.append("–")
            else:
                cells.append(f"{hit['value']:.4g}" + (f" ± {hit['stderr']:.2g}" if hit.get("stderr") else ""))
        table.add_row(escape(task), escape(metric), *cells)
    table.add_row("", "FFN skip ratio", *["–" if s.get("decided_skip_ratio") is None else
                                          f"{s['decided_skip_ratio']:.3f}" for _, s in runs])
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    def eval_cmd(
        args: Annotated[Optional[list[str]], typer.Argument(metavar="PLAN...", show_default=False,
                                                             help="Plan YAML files to evaluate.")] = None,
        model: options.Model = None,
        data: Annotated[Optional[str], typer.Option(
            "--data", "-d", metavar="SPEC", show_default=False,
            help="Held-out data: [CLASS=]file|glob|folder|hub-name (default: the bundled held-out split).")] = None,
        text_column: options.TextColumn = None,
        class_column: options.ClassColumn = None,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", show_default=False,
                                                    help="Write the results here as JSON (docs/eval-schema.md).")
                       ] = None,
        json_path: Annotated[Optional[Path], typer.Option("--json", hidden=True, show_default=False)] = None,
        baselines: Annotated[bool, typer.Option(
            help="Add random / contiguous-window / paper-default adaptive / LLM-Drop / ShortGPT rows at the first "
                 "plan's realized ratio.")] = False,
        oracle: Annotated[Optional[bool], typer.Option(
            "--oracle/--no-oracle", show_default=False,
            help="Exhaustive static reference (default: with --baselines when the model has <= 16 layers).")] = None,
        search_reference: Annotated[Optional[bool], typer.Option(
            "--search-reference/--no-search-reference", show_default=False,
            help="Greedy + swap static reference searched by measured KL on held-out windows (default: with "
                 "--baselines when the exhaustive oracle is too large).")] = None,
        profile: Annotated[Optional[Path], typer.Option(
            metavar="PROFILE", show_default=False, help="Profile file: LLM-Drop ranking and --sweep fitting.")] = None,
        sweep: Annotated[Optional[str], typer.Option(
            metavar="RATIOS", show_default=False,
            help="Fit static + adaptive plans at these target ratios from --profile and evaluate each, e.g. "
                 "0.05,0.1,0.25.")] = None,
        refine: Annotated[bool, typer.Option(help="With --sweep: refine the static sets by measured KL on the "
                                                  "calibration split.")] = True,
        per_class: Annotated[bool, typer.Option(help="With --sweep: also fit class plans and evaluate them routed "
                                                     "by each document's label.")] = False,
        docs_per_class: Annotated[int, typer.Option(min=1, metavar="N", help="Held-out documents per class.")] = 16,
        prompt_len: Annotated[int, typer.Option(min=1, metavar="N", help="Dense prompt tokens per document.")] = 64,
        gen_len: Annotated[int, typer.Option(min=2, metavar="N", help="Decode positions per document after the "
                                                                      "prompt: the generation length the plans are "
                                                                      "judged at.")] = 256,
        greedy_prompts: Annotated[int, typer.Option(min=0, metavar="N", help="Prompts for greedy agreement.")] = 8,
        greedy_new_tokens: Annotated[int, typer.Option(min=1, metavar="N", help="Greedy tokens generated per "
                                                                                "prompt.")] = 32,
        greedy_tokens: Annotated[Optional[int], typer.Option("--greedy-tokens", min=1, hidden=True,
                                                             show_default=False)] = None,
        speed: Annotated[bool, typer.Option(help="Measure decode tokens/s dense vs plan.")] = True,
        speed_repeats: Annotated[int, typer.Option(
            min=5, metavar="N", help="Timed rounds (median of >= 5; a warm-up round is extra).")] = 5,
        speed_new_tokens: Annotated[int, typer.Option(min=2, metavar="N", help="Tokens generated per timed run.")
                                    ] = 64,
        speed_tokens: Annotated[Optional[int], typer.Option("--speed-tokens", min=2, hidden=True,
                                                            show_default=False)] = None,
        seeds: Annotated[int, typer.Option(min=1, metavar="N", help="Random-baseline seeds.")] = 3,
        oracle_at: Annotated[Optional[str], typer.Option(
            metavar="RATIOS", show_default=False,
            help="With --sweep: run the oracle only at these targets (default: every target needing <= 150 sets).")
                             ] = None,
        dtype: options.Dtype = "float32",
        threads: options.Threads = 0,
        batch_decision: Annotated[Optional[str], typer.Option(
            metavar="DECISION", show_default=False,
            help="Adaptive plans' fidelity: per_sequence (each document decides alone) or shared (the --batch-size "
                 "documents of a batch fire together, as rows decoding in one batch with apply_plan(batch_decision="
                 "'shared')); default: each plan's own.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, metavar="N",
                                                help="Documents per teacher-forced batch.")] = 16,
        qa: Annotated[bool, typer.Option(
            "--qa", help="Knowledge retention: greedy short answers to factual questions with each plan and "
                         "baseline; accuracy and retention (plan accuracy / dense accuracy).")] = False,
        qa_file: Annotated[Optional[Path], typer.Option(
            metavar="PATH", show_default=False,
            help="QA questions (.jsonl: id, class, question, answers); default: the bundled set "
                 "(docs/qa-set.md).")] = None,
        lm_eval: Annotated[Optional[str], typer.Option(
            "--lm-eval", metavar="TASKS", show_default=False,
            help="Run lm-evaluation-harness tasks (comma-separated; bundled: skipprof_qa, skipprof_qa_chat, "
                 "skipprof_heldout_ppl) for dense and each plan (the lm-eval extra; "
                 "docs/lm-eval.md).")] = None,
        lm_eval_include: Annotated[Optional[list[Path]], typer.Option(
            "--lm-eval-include", metavar="PATH", show_default=False,
            help="A folder of harness task YAML files to add (repeatable).")] = None,
        lm_eval_limit: Annotated[Optional[int], typer.Option(
            "--lm-eval-limit", min=1, metavar="N", show_default=False,
            help="Documents per harness task (default: all).")] = None,
        lm_eval_chat: Annotated[bool, typer.Option(
            "--lm-eval-chat", help="Harness prompts through the model's chat template, few-shot examples as turns "
                                   "(the skipprof_qa_chat task needs it).")] = False,
    ) -> None:
        from .. import evaluation as ev
        from ..evaluation.fidelity import FidelityError
        from ..plan.model import PlanError
        from ..evaluation.recipe import evaluate_plans
        from ..fit.refine import RefineError
        from .common import load_model_and_tokenizer, one_model, write_output
        from .progress import stage_bars

        parse_batch_decisions([batch_decision] if batch_decision else None)
        positional_model, plan_paths = split_model_and_plans(args or [])
        model = one_model(positional_model, model)
        if out is not None and json_path is not None and out != json_path:
            raise CLIError("give the JSON path once, with --out")
        out = out or json_path
        config = ev.EvalConfig(
            data=data, text_column=text_column, class_column=class_column, prompt_len=prompt_len, gen_len=gen_len,
            docs_per_class=docs_per_class, greedy_prompts=greedy_prompts,
            greedy_new_tokens=greedy_tokens or greedy_new_tokens, speed=speed, speed_repeats=speed_repeats,
            speed_new_tokens=speed_tokens or speed_new_tokens, baselines=baselines, random_seeds=seeds,
            oracle=oracle, search_reference=search_reference, batch_size=batch_size, batch_decision=batch_decision,
            qa=qa or qa_file is not None, qa_file=str(qa_file) if qa_file else None,
            sweep=parse_ratios(sweep, "--sweep") if sweep else None, sweep_refine=refine, sweep_per_class=per_class,
            oracle_targets=parse_ratios(oracle_at, "--oracle-at") if oracle_at else None,
            lm_eval=parse_tasks(lm_eval) if lm_eval is not None else None,
            lm_eval_include=[str(p) for p in lm_eval_include] if lm_eval_include else None,
            lm_eval_limit=lm_eval_limit, lm_eval_chat=lm_eval_chat)
        if (lm_eval_include or lm_eval_limit or lm_eval_chat) and not config.lm_eval:
            raise CLIError("--lm-eval-include, --lm-eval-limit and --lm-eval-chat go with --lm-eval TASKS")
        if config.lm_eval:
            if "skipprof_qa_chat" in config.lm_eval and not lm_eval_chat:
                raise CLIError("skipprof_qa_chat is prompted through the chat template: add --lm-eval-chat "
                               "(skipprof_qa is the plain-text form)")
            for folder in lm_eval_include or []:
                if not folder.is_dir():
                    raise CLIError(f"--lm-eval-include: not a folder: {folder}")
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise CLIError('--lm-eval needs lm-evaluation-harness: pip install "skipprofiler[lm-eval]"')
        if not plan_paths and not config.sweep:
            raise CLIError("give at least one PLAN file (or --sweep with --profile)")
        if config.sweep and profile is None:
            raise CLIError("--sweep fits plans from a profile: add --profile PROFILE")
        if out is not None:
            check_writable(out)
        try:
            from ..profile.corpus import CorpusError, parse_spec
            from ..evaluation.recipe import named_plans

            if data is not None:
                parse_spec(data)  # a missing data path fails before the model is loaded
            plans = named_plans(plan_paths)
        except (CorpusError, ev.EvalError) as e:
            raise CLIError(str(e)) from None
        prof = load_profile(profile, partial_note="fitting the sweep from the tokens it has") if profile else None
        if threads:
            import torch

            torch.set_num_threads(threads)
        with stage_bars() as bars:
            with bars.spinner(f"loading {model or 'the bundled demo model'}"):
                loaded, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device="cpu")
            try:
                result = evaluate_plans(loaded, tokenizer, plans, config, profile=prof,
                                        model_name=model or "bundled demo model", on_progress=bars, log=bars.log)
            except (ev.EvalError, PlanError, FidelityError, RefineError) as e:
                raise CLIError(str(e)) from None
        print_table(result)
        if out is not None:
            write_output(out, json.dumps(result, indent=1, allow_nan=False) + "\n")
            print(f"wrote {out}", file=sys.stderr)
