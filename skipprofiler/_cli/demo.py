"""`skipprof demo`: the whole pipeline on the bundled demo model, offline — profile, fit two plans, evaluate them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import CLIError

HELP = """Run the pipeline end to end on the bundled demo model and corpus (offline, a few minutes on 2 CPU cores).

Steps: `skipprof profile` on the bundled calibration split (prompt tokens plus generated tokens), `skipprof
export-plan` for a static and an adaptive plan at the target skip ratio, then `skipprof eval` of both plans on the
bundled held-out split. Everything lands in --out.

Examples:

  skipprof demo --out runs/demo

  skipprof demo --target-skip 0.35 --max-tokens 40000 --out runs/demo35
"""


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the profile, plans and eval JSON.")] = Path(
        "runs/demo"),
    target_skip: Annotated[float, typer.Option(help="Fraction of decode-token FFN calls to skip.")] = 0.25,
    max_tokens: Annotated[int, typer.Option(help="Prompt-token budget of the profile.")] = 24_000,
    generate: Annotated[int, typer.Option(help="Greedy tokens generated (and profiled) per prompt.")] = 16,
) -> None:
    from .main import app

    console = Console(stderr=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output folder {out}: {e.strerror}") from e
    profile = out / "demo.prof"
    plans = [out / f"static-{round(target_skip * 100)}.yaml", out / f"adaptive-{round(target_skip * 100)}.yaml"]
    steps = [
        ["profile", "--out", str(profile), "--max-tokens", str(max_tokens), "--generate", str(generate)],
        ["export-plan", str(profile), "--target-skip", str(target_skip), "--mode", "static", "--out", str(plans[0])],
        ["export-plan", str(profile), "--target-skip", str(target_skip), "--mode", "adaptive", "--out", str(plans[1])],
        ["eval", *map(str, plans), "--json", str(out / "eval.json")],
    ]
    for argv in steps:
        console.rule(f"[bold]skipprof {' '.join(argv)}")
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc != 0:
            raise CLIError(f"`skipprof {argv[0]}` failed (exit {rc}); see its message above", exit_code=rc)
    console.print(f"[green]done[/]: profile, plans and eval results in {out}")


def register(app: typer.Typer) -> None:
    app.command("demo", help=HELP)(demo)
