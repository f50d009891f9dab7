"""Deployment code imports only torch, yaml and the standard library through skipprofiler.runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("transformers", "datasets", "scipy", "typer", "rich", "matplotlib", "safetensors")


def imported_modules(statement: str) -> set[str]:
    """Top-level package names `python -X importtime -c statement` imported in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                            check=True)
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("statement", [
    "import skipprofiler.runtime",
    "import skipprofiler; skipprofiler.apply_plan; skipprofiler.load_plan",
])
@pytest.mark.slow
def test_runtime_import_stays_light(statement):
    names = imported_modules(statement)
    assert "torch" in names  # the parser really saw the import tree
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.slow
def test_loading_a_plan_stays_light():
    """load_plan (YAML) pulls the plan stage and yaml only."""
    pytest.importorskip("skipprofiler.plan.io")
    names = imported_modules("import skipprofiler.runtime as r\n"
                             "try:\n    r.load_plan('not: [a plan')\nexcept Exception:\n    pass")
    assert "yaml" in names
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
