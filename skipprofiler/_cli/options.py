"""The option vocabulary every `skipprof` command shares (docs/cli.md): one name, short flag, metavar and help
wording per thing. Commands declare these as parameter types; tests/test_cli_vocabulary.py checks every command
against VOCABULARY."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

DTYPE_VALUES = "float32, bfloat16 or float16"

# long option -> (short flag or None, metavar or None for flags); the table in docs/cli.md
VOCABULARY: dict[str, tuple[str | None, str | None]] = {
    "--model": ("-m", "MODEL"),
    "--data": ("-d", "SPEC"),
    "--out": ("-o", "PATH"),
    "--dtype": (None, "DTYPE"),
    "--device": (None, "DEVICE"),
    "--batch-size": ("-b", "N"),
    "--target-skip": ("-r", "RATIO"),
    "--gen-len": (None, "N"),
    "--prompt-len": (None, "N"),
    "--new-tokens": (None, "N"),
    "--greedy-new-tokens": (None, "N"),
    "--speed-new-tokens": (None, "N"),
    "--max-tokens": (None, "N"),
    "--seq-len": (None, "N"),
    "--seed": (None, "N"),
    "--threads": (None, "N"),
    "--profile": (None, "PROFILE"),
    "--text-column": (None, "COLUMN"),
    "--class-column": (None, "COLUMN"),
    "--class": (None, "CLASS"),
    "--batch-decision": (None, "DECISION"),
    "--json": (None, None),
}

# Spellings retired for the vocabulary's; still accepted where cheap (hidden), never shown.
RETIRED = {"--batch": "--batch-size", "--generate": "--new-tokens", "--greedy-tokens": "--greedy-new-tokens",
           "--speed-tokens": "--speed-new-tokens"}

MODEL_HELP = "Checkpoint folder, .gguf file or hub id (default: the bundled demo model)."

Model = Annotated[Optional[str], typer.Option("--model", "-m", metavar="MODEL", help=MODEL_HELP,
                                              show_default=False)]
Dtype = Annotated[str, typer.Option("--dtype", metavar="DTYPE", help=f"Weights dtype: {DTYPE_VALUES}.")]
Device = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps.")]
Threads = Annotated[int, typer.Option("--threads", metavar="N", min=0,
                                      help="Torch CPU threads (0: torch's default).")]
Seed = Annotated[int, typer.Option("--seed", metavar="N", help="Random seed.")]
TextColumn = Annotated[Optional[str], typer.Option(
    "--text-column", metavar="COLUMN", show_default=False,
    help="Text column (default: `text`, else chat `messages` rendered with the chat template).")]
ClassColumn = Annotated[Optional[str], typer.Option(
    "--class-column", metavar="COLUMN", show_default=False,
    help="Column with class labels (default: `class` when present, else class `default`).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of the table.")]

