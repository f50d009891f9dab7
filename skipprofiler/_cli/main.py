"""`skipprof` entry point: a typer app; each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import os
import sys

import typer

from .errors import CLIError

app = typer.Typer(
    name="skipprof",
    help="Profile FFN saturation in a causal LM, fit YAML skip plans, and measure what they cost and save.\n\n"
    "With no model or data given, every command uses the bundled demo model and corpus (offline).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Subcommand modules: each defines `register(app)`. Listed here so `skipprof --help` shows the pipeline in order.
_SUBCOMMANDS = ("demo", "profile", "inspect", "merge", "export_plan", "validate", "show", "eval", "report", "bench")


def _register_all() -> None:
    import importlib

    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"skipprofiler._cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"skipprofiler._cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_all()
    try:
        # standalone_mode=False: typer returns (not raises) the code of a `typer.Exit`
        rc = app(args=argv, standalone_mode=False)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
