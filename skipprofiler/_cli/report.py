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
    "`skipprof eval --out`); optionally the result tables as Markdown.\n\n"
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
        raise CLIError(f"{path} is not a `skipprof eval` results file (format must be 'skipprof-eval')")
    return data


def register(app: typer.Typer) -> None:
    @app.command("report", help=HELP)
    def report_cmd(
        profile: Annotated[Path, typer.Argument(metavar="PROFILE", show_default=False,
                                                help="Profile file written by `skipprof profile`.")],
        eval_json: Annotated[Optional[Path], typer.Argument(metavar="[EVAL_JSON]", show_default=False,
                                                            help="Results written by `skipprof eval --out`.")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH",
                                          help="Folder for the PNG files (created if missing).")] = Path("report"),
        title: Annotated[Optional[str], typer.Option(metavar="TEXT", show_default=False,
                                                     help="Figure title (default: model and corpus).")] = None,
        markdown: Annotated[Optional[Path], typer.Option(
            metavar="PATH", show_default=False,
            help="Also write the result tables and the comparisons at 25 % as Markdown here (needs EVAL_JSON and "
                 "--command).")] = None,
        command: Annotated[Optional[str], typer.Option(
            metavar="TEXT", show_default=False,
            help="The command that regenerates the results, quoted in the Markdown.")] = None,
    ) -> None:
        from ..evaluation.report import ReportError, make_report
        from .common import load_profile

        if markdown is not None and (eval_json is None or command is None):
            raise CLIError("--markdown needs EVAL_JSON and --command (the command that regenerates the results)")
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
            import os

            from ..evaluation.report import results_markdown
            from .common import write_output

            figures = [os.path.relpath(p, markdown.parent.resolve()) for p in (Path(x).resolve() for x in paths)]
            write_output(markdown, results_markdown(result, figures, command))
            print(markdown)
