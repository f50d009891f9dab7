"""Compare the plans two folders hold: every .yaml byte for byte except the provenance `created:` timestamp line(s),
every .safetensors byte for byte. One line per file; exit 1 if any file differs or is missing from either folder.

    python scripts/compare_plans.py runs-before/plans runs-after/plans [--ignore-key seconds]

--ignore-key KEY (repeatable) also skips lines `KEY: ...` at any depth: e.g. `seconds`, the wall time of the linear
substitutes' fit that refine.py records under fit.substitutes (it varies from run to run).
"""
import argparse
import re
import sys
from pathlib import Path

# plan/io.py writes the timestamp as the provenance key `created`, e.g. "  created: '2026-12-02T04:16:05+00:00'"
IGNORED = ["created"]


def _ignored_pattern(keys) -> re.Pattern:
    return re.compile(rb"^\s*(?:" + b"|".join(re.escape(k.encode()) for k in keys) + rb"):\s")


SKIPPED_LINE = _ignored_pattern(IGNORED)


def _yaml_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines(keepends=True) if not SKIPPED_LINE.match(line)]


def _first_difference(a: Path, b: Path) -> str:
    la, lb = (p.read_bytes().splitlines(keepends=True) for p in (a, b))
    for n, (x, y) in enumerate(zip(la, lb), 1):
        if x != y and not (SKIPPED_LINE.match(x) and SKIPPED_LINE.match(y)):
            return f"line {n}: {x.rstrip()!r} != {y.rstrip()!r}"
    return f"length: {len(la)} != {len(lb)} lines"


def compare(a: Path, b: Path) -> str | None:
    """None if the two files match, else a description of the first difference."""
    if a.suffix == ".yaml":
        return None if _yaml_lines(a) == _yaml_lines(b) else _first_difference(a, b)
    da, db = a.read_bytes(), b.read_bytes()
    if da == db:
        return None
    n = next((i for i, (x, y) in enumerate(zip(da, db)) if x != y), min(len(da), len(db)))
    return f"byte {n} (sizes {len(da)} / {len(db)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                        help="also ignore lines holding this YAML key (repeatable), e.g. seconds")
    args = parser.parse_args(argv)
    global SKIPPED_LINE
    SKIPPED_LINE = _ignored_pattern(IGNORED + args.ignore_key)
    names = sorted({p.name for d in (args.a, args.b) for p in d.iterdir() if p.suffix in (".yaml", ".safetensors")})
    if not names:
        print("no .yaml or .safetensors files", file=sys.stderr)
        return 1
    bad = 0
    for name in names:
        a, b = args.a / name, args.b / name
        if not (a.is_file() and b.is_file()):
            print(f"{name}: missing in {args.a if not a.is_file() else args.b}")
            bad += 1
            continue
        diff = compare(a, b)
        print(f"{name}: identical" if diff is None else f"{name}: differs, {diff}")
        bad += diff is not None
    print(f"{len(names) - bad}/{len(names)} identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
