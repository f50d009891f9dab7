"""The README's library example (profile -> fit -> apply in Python, no CLI) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def library_example() -> str:
    section = README.read_text().split("## The pipeline as a library", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_library_example_profiles_fits_and_applies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_example(), "README.md", "exec"), namespace)
    assert namespace["profile"].tokens("prompt") == 4000 and namespace["profile"].tokens("decode") > 0
    plan = namespace["fitted"].plan_file.global_plan
    assert plan.mode == "static" and abs(plan.expected_skip_ratio - 0.25) < 0.01
    assert (tmp_path / "plan.yaml").is_file()
    printed_ratio = float(capsys.readouterr().out.split()[-1])
    assert printed_ratio == namespace["handle"].stats()["not_computed_ratio"] and printed_ratio > 0.2
