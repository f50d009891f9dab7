"""`skipprof` entry point: a typer app; each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .errors import CLIError, in_option_words

try:
    # typer >= 0.2x runs on its own vendored copy of click, whose exceptions are not the installed `click`'s (which
    # need not even be installed): usage errors must be matched against the copy that raises them.
    from typer._click.exceptions import ClickException
except ImportError:  # older typer runs on the installed click
    from click.exceptions import ClickException


class _Group(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Turned into a CLIError before typer/click see it: they would exit 130 silently or 1 with "Aborted!".
            raise CLIError("interrupted", exit_code=130) from None


app = typer.Typer(
    name="skipprof",
    cls=_Group,
    help="Profile FFN saturation in a causal LM, fit YAML skip plans, and measure what they cost and save.\n\n"
    "With no model or data given, every command uses the bundled demo model and corpus (offline).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("skipprofiler")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from skipprofiler import __version__ as v
        typer.echo(f"skipprof {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


@functools.cache  # once per process: main() runs many times in one process (tests, notebooks)
def _register_all() -> None:
    """Each subcommand module defines `register(app)`; listed in pipeline order, which `skipprof --help` shows."""
    from . import bench, demo, export_plan, inspect, merge, profile, report, show, validate
    from . import eval as eval_command

    for module in (demo, profile, inspect, merge, export_plan, validate, show, eval_command, report, bench):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _register_all()
        # standalone_mode=False: errors come back here, so every one gets the same short form and exit code
        # (typer's standalone mode would draw usage errors as rich panels); `typer.Exit` codes are returned.
        rc = app(args=argv, standalone_mode=False)
    except CLIError as e:
        print(f"error: {in_option_words(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except ClickException as e:  # usage errors: click's "Usage: ... Try '... --help' ... Error: ...", exit 2
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C outside a command, or at a prompt
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
