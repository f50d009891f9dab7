"""The package's import graph: no circles, and no upward imports (the layout corpus -> profile -> fit -> plan ->
runtime / eval must hold in the code). Imports inside functions count: a lazy import still ties two modules."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import skipprofiler

PACKAGE = Path(skipprofiler.__file__).parent
NAME = "skipprofiler"

# Who may import whom, by module prefix: a module under the key may import only these package modules. The runtime is
# what deployment code loads: the plan data model, the architecture registry and small shared helpers, nothing else.
ALLOWED = {
    f"{NAME}.runtime": (f"{NAME}.runtime", f"{NAME}.plan", f"{NAME}.arch.registry", f"{NAME}.arch.compat",
                        f"{NAME}.arch.pooling", f"{NAME}.arch.flops", f"{NAME}.atomic", f"{NAME}._jsonable"),
    # the plan stage: its data model and files; nothing of the pipeline around it
    f"{NAME}.plan": (f"{NAME}.plan", f"{NAME}.atomic"),
    f"{NAME}.plan.model": (),
    # the model side every stage shares: it imports no stage
    f"{NAME}.arch": (f"{NAME}.arch", f"{NAME}.demo", f"{NAME}.atomic", f"{NAME}._jsonable", f"{NAME}.progress"),
    f"{NAME}.arch.pooling": (),
    f"{NAME}.arch.compat": (),
    # what the figures and `skipprof eval`'s option parsing import: names and settings, no torch
    f"{NAME}.evaluation.families": (),
    f"{NAME}.evaluation.config": (),
}
# Modules that import nothing but the standard library and these package modules (no torch, numpy, yaml): the set
# searches run on any cost of a set and are tested on synthetic ones.
STDLIB_ONLY = {
    f"{NAME}.fit.search": (f"{NAME}._jsonable",),
    f"{NAME}.plan.model": (),
    f"{NAME}._jsonable": (),
}
# Nothing outside these may be imported by the profiler (it records statistics; it does not apply or fit plans).
PROFILER_FORBIDDEN = (f"{NAME}.runtime", f"{NAME}.fit", f"{NAME}.evaluation", f"{NAME}._cli", f"{NAME}.integrations")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules `name` imports anywhere in its body (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[:len(base) - node.level + 1])
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" for a in node.names] + [module]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def outside_imports(path: Path) -> set[str]:
    """Top-level names of the non-package modules `path` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {NAME, "__future__"}


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    # A package's __init__ is a facade that re-exports its modules; the facade's own edges are not dependencies of
    # the modules below it, so they are left out (a module importing its package facade is still an edge).
    return {name: {t for t in imports_of(name, path, modules) if not t.startswith(name + ".") or path.name != "__init__.py"}
            for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles():
    edges = graph()
    assert len(edges) > 40  # the walk really saw the package
    assert cycles(edges) == []


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_imports():
    edges = graph()
    problems = []
    for name, targets in sorted(edges.items()):
        for prefix, allowed in ALLOWED.items():
            if name == prefix or name.startswith(prefix + "."):
                problems += [f"{name} -> {t}" for t in sorted(targets) if not t.startswith(allowed or ("\0",))]
        if name.startswith(f"{NAME}.profile"):
            problems += [f"{name} -> {t}" for t in sorted(targets) if t.startswith(PROFILER_FORBIDDEN)]
        if not name.startswith((f"{NAME}._cli", f"{NAME}.__main__")):
            problems += [f"{name} -> {t}" for t in sorted(targets) if t.startswith(f"{NAME}._cli")]
    assert problems == []


def test_pure_modules_import_only_the_standard_library():
    modules = package_modules()
    problems = []
    for name, allowed in sorted(STDLIB_ONLY.items()):
        problems += [f"{name} -> {t}" for t in sorted(outside_imports(modules[name]))
                     if t not in sys.stdlib_module_names]
        problems += [f"{name} -> {t}" for t in sorted(imports_of(name, modules[name], modules)) if t not in allowed]
    assert problems == []


def test_outside_imports_sees_torch():
    assert "torch" in outside_imports(PACKAGE / "fit" / "measure.py")


def test_every_import_is_visible():
    """Imports by string (`importlib.import_module(...)`, `__import__`) hide edges from the walk above."""
    hidden = []
    for name, path in sorted(package_modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if called in ("import_module", "__import__"):
                    hidden.append(f"{name}:{node.lineno}")
    assert hidden == []

