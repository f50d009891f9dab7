"""Package layout and how much of it a static plan loads: a before/after check for refactors that move modules.

    python scripts/layout_lines.py            # the skipprofiler that `import skipprofiler` finds (mind PYTHONPATH)

(a) Package tree: per folder of skipprofiler/ (the top level is its own row), the number of .py modules and their
    total lines (lines as str.splitlines counts them).
(b) Lines a static plan loads: in a fresh interpreter, import skipprofiler.runtime, apply
    SkipPlan(mode="static", skip_layers={2: 1.0}) to a tiny random Llama (4 layers, hidden 64), generate a few tokens,
    then sum the lines of every loaded module under the runtime package's folder, listing them, and list the
    skipprofiler modules outside it that got loaded. Modules are found by file path under the package folders that
    `import skipprofiler` / `skipprofiler.runtime` resolve to, never by a fixed list, so moved modules are followed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def package_root() -> Path:
    spec = importlib.util.find_spec("skipprofiler")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("skipprofiler not importable")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def tree(root: Path) -> None:
    rows: dict[Path, list[int]] = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        row = rows.setdefault(path.parent, [0, 0])
        row[0] += 1
        row[1] += _lines(path)
    print(f"(a) package tree of {root}")
    print(f"    {'folder':42s} {'modules':>7s} {'lines':>7s}")
    for folder, (n, lines) in sorted(rows.items(), key=lambda kv: kv[0].relative_to(root).parts):
        rel = folder.relative_to(root.parent).as_posix() + "/"
        print(f"    {rel:42s} {n:7d} {lines:7d}")
    print(f"    {'total':42s} {sum(r[0] for r in rows.values()):7d} {sum(r[1] for r in rows.values()):7d}")


def _probe() -> None:
    """Run in the fresh interpreter: apply a static plan, generate, print the loaded skipprofiler module files."""
    import torch

    torch.set_num_threads(1)
    import skipprofiler
    import skipprofiler.runtime as runtime
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    # SkipPlan from the module apply_plan lives in (it imports it), wherever the refactor put either of them
    SkipPlan = runtime.apply_plan.__globals__["SkipPlan"]
    handle = runtime.apply_plan(model, SkipPlan(mode="static", skip_layers={2: 1.0}))
    ids = torch.randint(2, 120, (1, 6))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    stats = handle.stats() if hasattr(handle, "stats") else None
    handle.remove()
    files = sorted({str(Path(m.__file__).resolve()) for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) and m.__name__.split(".")[0] == "skipprofiler"})
    print(json.dumps({"package": str(Path(skipprofiler.__file__).resolve().parent),
                      "runtime": str(Path(runtime.__file__).resolve().parent),
                      "generated": out.shape[1] - ids.shape[1], "stats": stats, "files": files}, default=str))


def loaded(root: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--probe"], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"probe failed:\n{proc.stderr}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    package, runtime = Path(info["package"]), Path(info["runtime"])
    if package != root:
        sys.exit(f"probe imported {package}, not {root}")
    inside, outside = [], []
    for f in map(Path, info["files"]):
        (inside if f.is_relative_to(runtime) else outside).append((f.relative_to(package.parent).as_posix(), _lines(f)))
    print(f"(b) lines a static plan loads (apply SkipPlan(static, {{2: 1.0}}) on a 4-layer hidden-64 Llama, "
          f"generate {info['generated']} tokens; handle stats {info['stats']})")
    print(f"    modules under {runtime.relative_to(package.parent).as_posix()}/: {len(inside)}, "
          f"{sum(n for _, n in inside)} lines")
    for name, n in inside:
        print(f"      {name:40s} {n:6d}")
    print(f"    skipprofiler modules outside it: {len(outside)}, {sum(n for _, n in outside)} lines")
    for name, n in outside:
        print(f"      {name:40s} {n:6d}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        _probe()
    else:
        root = package_root()
        tree(root)
        print()
        loaded(root)
