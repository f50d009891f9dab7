"""Run the `skipprof` CLI in-process and capture its exit code and output (shared by the CLI tests)."""

from __future__ import annotations

from skipprofiler._cli.main import main


def run(argv: list, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
