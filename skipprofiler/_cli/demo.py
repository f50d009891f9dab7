"""`skipprof demo`: the whole pipeline on the bundled demo model, offline — profile, fit two plans, evaluate them,
draw the figures, and say what was measured and how noisy its timing was."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from .errors import CLIError

HELP = (
    "Run the pipeline end to end on the bundled demo model and corpus (offline; about 3 minutes on 2 CPU cores)."
    "\n\n"
    "Steps: `skipprof profile` on the bundled calibration split (prompt tokens plus generated tokens), `skipprof "
    "export-plan` for a static and an adaptive plan at the target skip ratio, `skipprof eval` of both plans on the "
    "bundled held-out split, and `skipprof report` for the figures. Everything lands in --out; the last lines say "
    "what was measured and how much the timing varied."
    "\n\n"
    "Examples:\n\n"
    "  skipprof demo --out runs/demo\n\n"
    "  skipprof demo --target-skip 0.35 --max-tokens 40000 --out runs/demo35\n"
)


def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH",
                                      help="Folder for the profile, plans, eval JSON and figures.")] = Path("runs/demo"),
    target_skip: Annotated[float, typer.Option("--target-skip", "-r", metavar="RATIO",
                                               help="Fraction of decode-token FFN calls to skip, in (0, 1).")] = 0.25,
    max_tokens: Annotated[int, typer.Option("--max-tokens", metavar="N", min=1,
                                            help="Prompt-token budget of the profile.")] = 24_000,
    new_tokens: Annotated[int, typer.Option("--new-tokens", metavar="N", min=0,
                                            help="Greedy tokens generated (and profiled) per prompt.")] = 16,
    generate: Annotated[Optional[int], typer.Option("--generate", hidden=True)] = None,
) -> None:
    app = ctx.find_root().command  # the whole `skipprof` command: each step runs as a user would type it
    new_tokens = new_tokens if generate is None else generate  # retired spelling
    if not 0.0 < target_skip < 1.0:
        raise CLIError(f"--target-skip must be in (0, 1), got {target_skip}")
    console = Console(stderr=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output folder {out}: {e.strerror}") from e
    profile = out / "demo.prof"
    plans = [out / f"static-{round(target_skip * 100)}.yaml", out / f"adaptive-{round(target_skip * 100)}.yaml"]
    result_path, figures = out / "eval.json", out / "figures"
    steps = [
        ["profile", "--out", str(profile), "--max-tokens", str(max_tokens), "--new-tokens", str(new_tokens)],
        ["export-plan", str(profile), "--target-skip", str(target_skip), "--mode", "static", "--out", str(plans[0])],
        ["export-plan", str(profile), "--target-skip", str(target_skip), "--mode", "adaptive", "--out", str(plans[1])],
        ["eval", *map(str, plans), "--out", str(result_path)],
        ["report", str(profile), str(result_path), "--out", str(figures)],
    ]
    started = time.perf_counter()
    for argv in steps:
        console.rule(f"[bold]skipprof {' '.join(argv)}")
        rc = app.main(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc != 0:
            raise CLIError(f"`skipprof {argv[0]}` failed (exit {rc}); see its message above", exit_code=rc)
    console.rule("[bold]what the demo measured")
    for line in summary(json.loads(result_path.read_text())):
        console.print(line, highlight=False)
    console.print(f"[green]done[/] in {time.perf_counter() - started:.0f} s: profile, plans, eval.json and figures/ "
                  f"in {out}")


def summary(result: dict[str, Any]) -> list[str]:
    """Plain sentences on what an eval JSON measured: the data, each plan's cost and speed, and the timing noise."""
    data, dense = result["data"], result["dense"]
    positions = sum(data["tokens"].values())
    generated = data["window"] - data["prompt_len"]
    lines = [f"Quality: teacher-forced on the bundled held-out split, {data['documents']} documents, {positions:,} "
             f"decode positions ({data['prompt_len']}-token dense prompt, then {generated} positions each); dense "
             f"perplexity {dense['ppl']:.2f}. KL and perplexity are deterministic: a rerun gives the same figures."]
    timed = [r for r in result["plans"] if r.get("speedup") is not None]
    for r in result["plans"]:
        line = (f"  {r['name']}: skips {r['skip_ratio']:.1%} of decode FFNs, KL {r['kl_mean']:.4f}, perplexity "
                f"{r['ppl']:.2f} ({r['ppl_increase']:+.1%})")
        if r.get("speedup") is not None:
            spread = (f", per-round {r['speedup_min']:.2f}–{r['speedup_max']:.2f}×"
                      if r.get("speedup_min") is not None else "")
            line += f"; decode {r['speedup']:.2f}× dense (median{spread}; FLOP-ideal {r['ideal_speedup']:.2f}×)"
        lines.append(line)
    if timed:
        r = timed[0]
        lines.append(f"Speed: median of {r['speed_repeats']} interleaved dense/plan rounds of {r['speed_new_tokens']} "
                     "tokens at batch 1 on this machine. The per-round range is this run's timing noise: a difference "
                     "inside it is not a measured speedup (rerun `skipprof bench decode` on a quiet machine for one).")
    lines.append("docs/results.md and the README's demo table come from `scripts/make_results.sh` (a larger profile, "
                 "8 held-out documents per class, all baselines), so their figures differ from this run's.")
    return lines


def register(app: typer.Typer) -> None:
    app.command("demo", help=HELP)(demo)
