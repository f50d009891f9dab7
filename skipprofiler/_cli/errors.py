"""One error type for the CLI: a one-line, actionable message and a non-zero exit, never a traceback."""

from __future__ import annotations

import re

from .options import OPTION_OF_PARAMETER, OPTION_OF_SETTING

# A settings field, optionally with a value: FitSettings.mode, FitSettings.mode="adaptive", FitSettings.dense_every=1,
# EvalConfig.gen_len=256
_SETTING = re.compile(r'\b([A-Z]\w*(?:Settings|Config)\.\w+)(?:=("[^"]*"|[\w.+-]+))?')
# A library function's parameter in backticks, optionally with a value: `text_column`, `device="cuda"`
_PARAMETER = re.compile(r'`(\w+)(?:=("[^"]*"|[^`]*))?`')


class CLIError(Exception):
    """Raised by subcommands for bad input; `main` prints `error: <message>` and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def in_option_words(message: str) -> str:
    """`message` with each settings field written as the option that sets it (options.OPTION_OF_SETTING):
    `FitSettings.mode="adaptive"` -> `--mode adaptive`, `FitSettings.refine` -> `--refine`; and each backticked
    parameter of options.OPTION_OF_PARAMETER likewise: `` `device="cuda"` `` -> `--device cuda`."""

    def in_words(table: dict[str, str]):
        def option(match: re.Match) -> str:
            flag = table.get(match.group(1))
            value = match.group(2)
            if flag is None:
                return match.group(0)
            return flag if value in (None, "True") else flag + " " + value.strip('"')

        return option

    return _PARAMETER.sub(in_words(OPTION_OF_PARAMETER), _SETTING.sub(in_words(OPTION_OF_SETTING), message))
