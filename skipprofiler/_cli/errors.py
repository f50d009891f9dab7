"""One error type for the CLI: a one-line, actionable message and a non-zero exit, never a traceback."""

from __future__ import annotations


class CLIError(Exception):
    """Raised by subcommands for bad input; `main` prints `error: <message>` and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
