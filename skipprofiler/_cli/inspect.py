"""`skipprof inspect`: the per-layer table (and a JSON summary) of an existing profile."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import options
from .common import load_profile
from .errors import CLIError

HELP = (
    "Print a profile's provenance and its per-layer table of the `residual` cosine cos(h, h + FFN) -- mean, p10, "
    "p50, p90 and the share of tokens above 0.95 -- for all classes pooled and for each class.\n\n"
    "Examples:\n\n"
    "  skipprof inspect demo.prof\n\n"
    "  skipprof inspect demo.prof --regime prompt --class code\n\n"
    "  skipprof inspect demo.prof --json > demo-profile.json\n"
)
SATURATION = 0.95


def default_regime(profile) -> str:
    return "decode" if profile.tokens("decode") > 0 else "prompt"


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def summary(profile, regime: str, path: str | None = None, classes: list[str] | None = None) -> dict[str, Any]:
    """Machine-readable summary: provenance, token counts and per-layer statistics per class."""
    header = profile.header
    groups: list[str | None] = [None] + list(classes if classes is not None else profile.classes)
    layers: dict[str, list[dict[str, Any]]] = {}
    for cls in groups:
        stats = profile.layer_stats("residual", regime, cls)
        rows = []
        for layer in range(profile.num_layers):
            row = {"layer": layer, "tokens": int(stats["count"][layer])}
            row.update({k: _num(stats[k][layer]) for k in ("mean", "std", "p10", "p50", "p90")})
            row["p_above_0.95"] = _num(profile.prob_above(SATURATION, "residual", regime, layer, cls))
            rows.append(row)
        layers["all" if cls is None else cls] = rows
    out = {
        "model": header.get("model"), "dtype": header.get("dtype"), "device": header.get("device"),
        "partial": bool(header.get("partial")), "created": header.get("created"), "regime": regime,
        "classes": list(profile.classes), "corpus": header.get("corpus"),
        "tokens": {"prompt": profile.tokens("prompt"), "decode": profile.tokens("decode"),
                   "by_class": {c: {"prompt": profile.tokens("prompt", c), "decode": profile.tokens("decode", c)}
                                for c in profile.classes}},
        "metric": "residual", "layers": layers,
        "neurons": ({"intermediate_size": profile.num_neurons, "layers": profile.num_layers,
                     "tokens": {r: profile.neuron_tokens(r, 0) for r in ("prompt", "decode")}}
                    if profile.has_neurons else None),
    }
    if not profile.has_neurons and header.get("neurons_skipped"):
        out["neurons_skipped"] = header["neurons_skipped"]
    if path is not None:
        out["profile"] = path
    return out


def _cell(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(console, data: dict[str, Any]) -> None:
    from rich.table import Table

    model = data.get("model") or {}
    fp = model.get("fingerprint") or {}
    tokens = data["tokens"]
    console.print(f"[bold]{model.get('name', '?')}[/bold] ({fp.get('model_type')}, {fp.get('num_layers')} layers, "
                  f"hidden {fp.get('hidden_size')}) {data.get('dtype')} on {data.get('device')}: "
                  f"{tokens['prompt']:,} prompt + {tokens['decode']:,} decode tokens"
                  + ("  [yellow]PARTIAL[/yellow]" if data.get("partial") else ""))
    table = Table(title=f"residual cos(h, h + FFN) per layer, {data['regime']} tokens", title_justify="left")
    for name, justify in (("class", "left"), ("layer", "right"), ("tokens", "right"), ("mean", "right"),
                          ("p10", "right"), ("p50", "right"), ("p90", "right"), ("P>0.95", "right")):
        table.add_column(name, justify=justify)
    for group, rows in data["layers"].items():
        for row in rows:
            table.add_row(group if row["layer"] == 0 else "", str(row["layer"]), f"{row['tokens']:,}",
                          _cell(row["mean"]), _cell(row["p10"]), _cell(row["p50"]), _cell(row["p90"]),
                          _cell(row["p_above_0.95"], 3), end_section=row["layer"] == len(rows) - 1)
    console.print(table)
    neurons = data.get("neurons")
    if neurons:
        console.print(f"neuron statistics: {neurons['intermediate_size']:,} neurons per layer x {neurons['layers']} "
                      f"layers ({neurons['tokens']['prompt']:,} prompt + {neurons['tokens']['decode']:,} decode "
                      "tokens)", highlight=False)
    elif data.get("neurons_skipped"):
        console.print(f"no neuron statistics: {data['neurons_skipped']}", highlight=False)


def inspect(
    profile: Annotated[Path, typer.Argument(help="Profile file written by `skipprof profile`.", metavar="PROFILE",
                                            show_default=False)],
    regime: Annotated[Optional[str], typer.Option(
        metavar="REGIME", show_default=False,
        help="prompt or decode (default: decode when the profile has generated tokens, else prompt).")] = None,
    classes: Annotated[Optional[list[str]], typer.Option(
        "--class", metavar="CLASS", show_default=False,
        help="Show only these classes (repeatable; 'all' is always shown).")] = None,
    as_json: options.JsonFlag = False,
) -> None:
    """Print the per-layer table of an existing profile."""
    prof = load_profile(profile)
    regime = regime or default_regime(prof)
    if regime not in ("prompt", "decode"):
        raise CLIError(f"--regime must be prompt or decode, got {regime!r}")
    for name in classes or []:
        if name not in prof.classes:
            raise CLIError(f"unknown class {name!r}; the profile's classes: {', '.join(prof.classes) or 'none'}")
    data = summary(prof, regime, str(profile), classes)
    if as_json:
        from .common import print_json

        print_json(data)
        return
    from rich.console import Console

    print_table(Console(), data)


def register(app: typer.Typer) -> None:
    app.command("inspect", help=HELP)(inspect)
