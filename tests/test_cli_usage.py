"""Usage mistakes get click's short usage message and exit 2, never a traceback; run through the installed
`skipprof` console script, the way users meet them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import run

# The console script `pip install` made; `python -m skipprofiler` runs the same main() where none is on PATH.
SKIPPROF = [shutil.which("skipprof")] if shutil.which("skipprof") else [sys.executable, "-m", "skipprofiler"]


def skipprof(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([*SKIPPROF, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args, hint, message", [
    (["export-plan", "x.prof", "--target-skp", "0.25"], "skipprof export-plan",
     "Error: No such option: --target-skp (Possible options: --max-skip, --target-skip)"),
    (["exprot-plan"], "skipprof", "Error: No such command 'exprot-plan'. Did you mean 'export-plan'?"),
    (["export-plan", "x.prof", "-r", "abc"], "skipprof export-plan", "Error: Invalid value for '--target-skip' / '-r'"),
    (["inspect"], "skipprof inspect", "Error: Missing argument 'PROFILE'."),
    (["eval", "--batch-size", "0"], "skipprof eval", "Error: Invalid value for '--batch-size'"),
    (["show", "--yml"], "skipprof show", "Error: No such option: --yml (Possible options: --yaml)"),
])
def test_usage_mistake_is_a_short_message_and_exit_2(args, hint, message):
    result = skipprof(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"Try '{hint} --help' for help." in result.stderr and message in result.stderr
    assert result.stdout == ""


def test_version():
    from importlib.metadata import version

    result = skipprof("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"skipprof {version('skipprofiler')}\n"


def test_cli_error_is_one_line_exit_2(tmp_path):
    result = skipprof("inspect", str(tmp_path / "missing.prof"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    import skipprofiler._cli.inspect as inspect_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cli, "load_profile", interrupted)
    code, out, err = run(["inspect", "x.prof"], capsys)
    assert (code, out, err) == (130, "", "error: interrupted\n")
