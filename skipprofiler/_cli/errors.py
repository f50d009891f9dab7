"""One error type for the CLI: a one-line, actionable message and a non-zero exit, never a traceback."""

from __future__ import annotations

import re

from .options import OPTION_OF_SETTING

# A settings field, optionally with a value: FitSettings.mode, FitSettings.mode="adaptive", FitSettings.dense_every=1
_SETTING = re.compile(r'\b([A-Z]\w*Settings\.\w+)(?:=("[^"]*"|[\w.+-]+))?')


class CLIError(Exception):
    """Raised by subcommands for bad input; `main` prints `error: <message>` and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def in_option_words(message: str) -> str:
    """`message` with each settings field written as the option that sets it (options.OPTION_OF_SETTING):
    `FitSettings.mode="adaptive"` -> `--mode adaptive`, `FitSettings.refine` -> `--refine`."""

    def option(match: re.Match) -> str:
        flag = OPTION_OF_SETTING.get(match.group(1))
        value = match.group(2)
        if flag is None:
            return match.group(0)
        return flag if value in (None, "True") else flag + " " + value.strip('"')

    return _SETTING.sub(option, message)
