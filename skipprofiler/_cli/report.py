"""`skipprof report`: PNG figures from a profile and an eval JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import CLIError

HELP = (
    "Draw PNG figures: per-layer cosine distributions per class (from PROFILE), quality (KL, perplexity) vs skip "
    "ratio for fitted plans and baselines, and speedup vs skip ratio (from EVAL_JSON, written by "
    "`skipprof eval --json`); optionally the result tables as Markdown.\n\n"
    "Examples:\n\n"
    "  skipprof report demo.prof sweep.json --out figures/\n\n"
    "  skipprof report demo.prof sweep.json --out docs/results --markdown docs/results.md\n"
)


def load_eval_json(path: Path) -> dict:
    if not path.is_file():
        raise CLIError(f"eval JSON not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{path} is not valid JSON: {e}")
    if not isinstance(data, dict) or data.get("format") != "skipprof-eval":
        raise CLIError(f"{path} is not a `skipprof eval --json` file (format must be 'skipprof-eval')")
    return data


def register(app: typer.Typer) -> None:
    @app.command("report", help=HELP)
    def report_cmd(
        profile: Annotated[Path, typer.Argument(help="profile written by `skipprof profile`")],
        eval_json: Annotated[Optional[Path], typer.Argument(help="results of `skipprof eval --json`")] = None,
        out: Annotated[Path, typer.Option(help="folder for the PNG files (created if missing)")] = Path("report"),
        title: Annotated[Optional[str], typer.Option(help="figure title (default: model and corpus)")] = None,
        markdown: Annotated[Optional[Path], typer.Option(help="also write the result tables and the comparisons "
                                                              "at 25 % as Markdown here (needs EVAL_JSON)")] = None,
        command: Annotated[str, typer.Option(help="the regenerating command quoted in the Markdown")] =
            "scripts/make_results.sh",
    ) -> None:
        from ..report import ReportError, make_report
        from .common import load_profile

        result = load_eval_json(eval_json) if eval_json is not None else None
        prof = load_profile(profile)
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} exists and is not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"cannot create {out}: {e.strerror}")
        try:
            paths = make_report(prof, result, out, title)
        except ReportError as e:
            raise CLIError(str(e))
        for path in paths:
            print(path)
        if markdown is not None:
            if result is None:
                raise CLIError("--markdown needs EVAL_JSON")
            import os

            from ..report import results_markdown
            from .common import write_output

            figures = [os.path.relpath(p, markdown.parent.resolve()) for p in (Path(x).resolve() for x in paths)]
            write_output(markdown, results_markdown(result, figures, command))
            print(markdown)
