"""The suite's own asserts: none may be unable to fail. `assert a == b if c else d` parses as
`assert (a == b) if c else d` and, when c is false, asserts a truthy d; `assert (x, "message")` asserts a non-empty
tuple. Both pass whatever the code does."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _suspicious(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        if isinstance(node.test, ast.IfExp):
            found.append((node.lineno, "conditional expression: one branch is asserted only for its truth"))
        elif isinstance(node.test, ast.Tuple) and node.test.elts:
            found.append((node.lineno, "non-empty tuple: always true"))
        elif isinstance(node.test, ast.Constant) and node.test.value:
            found.append((node.lineno, "a true constant"))
    return found


def test_no_assert_is_always_true():
    problems = [f"{path.name}:{line}: {why}" for path in sorted(TESTS.rglob("*.py"))
                for line, why in _suspicious(ast.parse(path.read_text(), str(path)))]
    assert problems == []


def test_the_scan_sees_each_pattern():
    code = "assert 1 == 2 if x else (3, 4)\nassert (x, 'message')\nassert 'text'\nassert a == b\n"
    assert [line for line, _ in _suspicious(ast.parse(code))] == [1, 2, 3]
