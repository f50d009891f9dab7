"""Usage mistakes get click's short usage message and exit 2, never a traceback; run through the installed
`skipprof` console script, the way users meet them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run

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


# Bad input beyond parsing: each is one `error:` line (validate lists every problem under it), exit 2, no traceback,
# and nothing written where it was run.
def _bad_input_cases(tmp_path):
    from helpers import BASE_CURVE, synthetic_profile

    from skipprofiler import demo

    profile = synthetic_profile({"a": BASE_CURVE}).save(tmp_path / "ok.prof")
    truncated = tmp_path / "truncated.prof"
    truncated.write_bytes(profile.read_bytes()[: profile.stat().st_size // 2])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    smollm2_plan = str(Path(__file__).parents[1] / "plans" / "smollm2-static-10.yaml")
    return {
        "empty data": (["profile", "--data", str(empty), "-o", str(tmp_path / "out.prof")], "empty"),
        "truncated profile": (["inspect", str(truncated)], "is truncated"),
        "profile given as a plan": (["show", str(profile)], "a profile?"),
        "plan for another model": (["validate", smollm2_plan, "--model", str(demo.model_path())],
                                   "this plan is for another model"),
        "unwritable output": (["export-plan", str(profile), "-r", "0.25", "-o", str(a_file / "plan.yaml")], "a-file"),
        "target out of range": (["export-plan", str(profile), "-r", "1.5", "-o", str(tmp_path / "p.yaml")], "target"),
    }


@pytest.mark.parametrize("case", ["empty data", "truncated profile", "profile given as a plan", "plan for another model",
                                  "unwritable output", "target out of range"])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(case, tmp_path):
    args, says = _bad_input_cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = skipprof(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and says in result.stderr.lower(), result.stderr
    assert len(lines) == 1 or all(line.startswith("  ") for line in lines[1:])  # the listed problems, indented
    assert sorted(p.name for p in tmp_path.iterdir()) == before
