"""`skipprof merge`: combine profiles of disjoint corpus parts (array jobs, several machines) into one, exactly."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import load_profile
from .errors import CLIError

HELP = (
    "Combine profiles made separately on disjoint parts of a corpus (array-job shards, runs on several machines, "
    "calibration sets profiled one by one) into one profile of the whole.\n\n"
    "The merge is exact: histograms, token counts and per-neuron FFN sums add, moments combine exactly (to "
    "float64 rounding), and each per-token sample keeps the K largest priority keys of the union, so it is a uniform "
    "sample of all tokens. Classes are matched by name. Profiles of different models (fingerprint), with different "
    "binning, a different document-pooling layer or pooling mode, or with and without per-neuron statistics are "
    "refused; so is the same profile given twice (its tokens would count double). If any input is partial (an "
    "interrupted run), the result is marked partial.\n\n"
    "Examples:\n\n"
    "  skipprof merge shard-0.prof shard-1.prof shard-2.prof --out all.prof\n\n"
    "  skipprof merge runs/*.prof --out all.prof --force\n"
)

_INDEX_MESSAGE = re.compile(r"^profile (\d+) ")


def _check_out(out: Path, inputs: list[Path], force: bool) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; give a file name such as {out / 'merged.prof'}")
    if not folder.is_dir():
        raise CLIError(f"cannot write {out}: folder {folder} does not exist")
    if out.exists() and not force:
        raise CLIError(f"{out} exists; pass --force to overwrite it")
    if any(out.resolve() == p.resolve() for p in inputs if p.exists()):
        raise CLIError(f"--out {out} is one of the inputs; write the merge to a new file")


def _content_id(profile) -> str:
    """Header, counts and sample keys: two copies of one run agree on all of them, two shards practically never."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(profile.header, sort_keys=True, default=str).encode())
    for array in (profile.count, profile.token_count, profile.reservoir_keys):
        digest.update(array.tobytes())
    return digest.hexdigest()


def _refuse_duplicates(paths: list[Path], profiles: list) -> None:
    """The same file twice, or two copies of one run, would count its tokens twice."""
    seen: dict[object, Path] = {}
    for path, profile in zip(paths, profiles):
        for key in (("path", path.resolve()), ("content", _content_id(profile))):
            if key in seen:
                raise CLIError(f"{path} and {seen[key]} are the same profile; merging it twice would count its "
                               "tokens twice")
            seen[key] = path


def _explain(message: str, paths: list[Path]) -> str:
    """merge_profiles names inputs by position ("profile 2 ..."); name the files instead."""
    match = _INDEX_MESSAGE.match(message)
    if match and int(match.group(1)) < len(paths):
        return f"cannot merge {paths[int(match.group(1))]} with {paths[0]}: it" + message[match.end() - 1:]
    return message


def merge(profiles: Annotated[list[Path], typer.Argument(
              help="Profile files to combine (two or more), e.g. from `skipprof profile --out`.",
              show_default=False, metavar="PROFILE...")],
          out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", show_default=False,
                                            help="File to write the merged profile to.")],
          force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
          ) -> None:
    """Combine separately made profiles into one profile of the whole corpus."""
    from ..profile import ProfileError, merge_profiles

    if len(profiles) < 2:
        raise CLIError(f"give at least two profiles to merge (got {len(profiles)})")
    _check_out(out, profiles, force)
    loaded = [load_profile(p) for p in profiles]
    _refuse_duplicates(profiles, loaded)
    try:
        merged = merge_profiles(loaded)
    except ProfileError as e:
        raise CLIError(_explain(str(e), profiles))
    merged.header["merged_files"] = [str(p) for p in profiles]
    for path, profile in zip(profiles, loaded):
        if profile.partial:
            print(f"warning: {path} is partial (its run stopped early); the merged profile is marked partial",
                  file=sys.stderr)
    try:
        merged.save(out)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e}")
    tokens = merged.header.get("tokens") or {}
    print(f"wrote {out}: {len(profiles)} profiles, {merged.num_layers} layers, classes "
          f"{', '.join(merged.classes) or 'none'}; {tokens.get('prompt', 0)} prompt and {tokens.get('decode', 0)} "
          f"decode tokens{' (partial)' if merged.partial else ''}")


def register(app: typer.Typer) -> None:
    app.command("merge", help=HELP)(merge)
