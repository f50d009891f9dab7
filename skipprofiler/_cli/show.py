"""`skipprof show`: pretty-print a plan file (and the summary table export-plan prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import CLIError

HELP = (
    "Pretty-print a YAML skip plan: model, provenance, defaults, each plan's rule and expected skip ratio, "
    "linear maps, neuron subsets (the kept width of each narrowed FFN), router.\n\n"
    "Examples:\n\n"
    "  skipprof show plans/demo-adaptive-25.yaml\n\n"
    "  skipprof show plans/demo-perclass-25.yaml --yaml     # the canonical YAML instead\n"
)


def describe_layers(plan) -> str:
    """One line saying which FFNs the plan skips."""
    if plan.mode == "static":
        if not plan.skip_layers:
            return "none" if plan.neurons is not None else "none (dense)"
        return ", ".join(str(l) if f >= 1.0 else f"{l} ({f:g})" for l, f in sorted(plan.skip_layers.items()))
    if plan.max_skip == 0:
        return "none (max_skip 0)"
    taus = sorted(set(plan.tau or []))
    tau = f"tau {taus[0]:.4g}" if len(taus) == 1 else f"tau {min(taus):.4g}..{max(taus):.4g}"
    L = len(plan.tau or [])
    return f"{tau}, k {plan.max_skip}, layers {plan.cold_start}..{L - plan.cold_end - 1}"


def plan_table(plan_file, title: str | None = None):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    numeric = ("gen len", "warm-up", "dense every", "expected skip")
    columns = ["plan", "mode", "skips", "batch", "gen len", "warm-up", "dense every", "compensation", "expected skip"]
    with_neurons = any(p.neurons is not None for _, p in plan_file.named_plans())
    if with_neurons:
        columns.insert(3, "neurons")
    for column in columns:
        table.add_column(column, justify="right" if column in numeric else "left")
    rows: list[tuple[str, Any]] = [("global", plan_file.global_plan)]
    rows += [(f"class {name}", plan_file.classes[name]) for name in sorted(plan_file.classes)]
    for name, plan in rows:
        ratio = "-" if plan.expected_skip_ratio is None else f"{plan.expected_skip_ratio:.3f}"
        if plan.fit.get("fallback"):
            ratio += " (global fallback)"
        cells = [name, plan.mode, describe_layers(plan), _batch(plan), str(plan.fit.get("gen_len") or "-"),
                 str(plan.warmup_tokens), str(plan.dense_every or "-"), _compensation(plan), ratio]
        if with_neurons:
            cells.insert(3, describe_neurons(plan))
        table.add_row(*cells)
    return table


def describe_neurons(plan) -> str:
    """One cell: how many FFNs run narrowed and the share of their neurons kept."""
    subsets = plan.neurons
    if subsets is None or not subsets.widths:
        return "-"
    widths, size = subsets.widths, subsets.intermediate_size
    text = f"{len(widths)} layer{'s' if len(widths) != 1 else ''}"
    if size:
        text += f", {sum(widths.values()) / (len(widths) * size):.0%} kept"
    return text


REFIT_NOTE = " (the kept down columns refitted: a d x k copy per layer in memory)"


def neuron_lines(plan_file) -> list[str]:
    """Per plan with neuron subsets: the file, the fill, per layer the kept width and its share of the FFN's neurons
    (an FFN's FLOPs scale with it), and the share of all FFN neurons not computed at an eligible decode position."""
    num_layers = (plan_file.model.get("fingerprint") or {}).get("num_layers")
    out = []
    for name, plan in plan_file.named_plans():
        subsets = plan.neurons
        if subsets is None:
            continue
        size, widths = subsets.intermediate_size, subsets.widths
        per_layer = ", ".join(f"{l}: {w}" + (f" ({w / size:.0%})" if size else "") for l, w in widths.items())
        line = (f"{name.replace('class.', 'class ')}: neuron subsets in {subsets.file} (sha256 "
                f"{str(subsets.sha256)[:12]}...), fill {subsets.fill}"
                f"{f' (rank-{subsets.rank} maps)' if subsets.rank else ''}"
                f"{REFIT_NOTE if subsets.fill == 'refit' else ''}"
                f"; neurons kept per layer at eligible decode "
                f"positions{f' (of {size})' if size else ''}: {per_layer}")
        if size and num_layers:
            dropped = sum(size - w for w in widths.values()) / (num_layers * size)
            line += f"; {dropped:.1%} of all FFN neurons not computed at positions that skip no whole FFN"
        net = plan.fit.get("expected_ffn_flops_saved")
        if net is not None and plan.compensation != "linear":  # the linear maps' line gives it otherwise
            line += f"; expected FFN FLOPs saved net {net:.3f}"
        out.append(line)
    return out


def _compensation(plan) -> str:
    if plan.compensation != "linear" or plan.linear is None:
        return plan.compensation
    share = plan.fit.get("substitute_cost_share")
    rank = "full rank" if plan.linear.rank is None else f"rank {plan.linear.rank}"
    return f"linear ({rank}" + ("" if share is None else f", +{share:.1%} of an FFN per skip") + ")"


def substitute_lines(plan_file) -> list[str]:
    """Per plan with linear maps: the file, rank, layers and the FLOPs a skipped call still costs."""
    hidden = (plan_file.model.get("fingerprint") or {}).get("hidden_size")
    out = []
    plans = [("global", plan_file.global_plan)] + [(f"class {n}", p) for n, p in sorted(plan_file.classes.items())]
    for name, plan in plans:
        linear = plan.linear
        if plan.compensation != "linear" or linear is None:
            continue
        flops = f"{linear.flops_per_call(hidden):,.0f} FLOPs per skipped call and position" if hidden else ""
        net = plan.fit.get("expected_ffn_flops_saved")
        out.append(f"{name}: linear maps in {linear.file} (sha256 {str(linear.sha256)[:12]}...), "
                   f"{'full rank' if linear.rank is None else f'rank {linear.rank}'}, layers {linear.layers}; "
                   f"{flops}" + ("" if net is None else f"; expected FFN FLOPs saved net of the maps {net:.3f}"))
    return out


def _batch(plan) -> str:
    """How the rows of a batch decide: alone, or together as fitted for a batch size (adaptive plans only)."""
    if plan.mode != "adaptive":
        return "-"
    if plan.batch_decision == "shared":
        size = plan.fit.get("batch_size")
        return f"shared (fitted for {size})" if size else "shared"
    return "per sequence"


def warmup_warnings(plan_file) -> list[str]:
    """Plans whose warm-up covers most of the generation they were fitted for (or, without a recorded generation
    length, a warm-up long enough to cover a typical short answer)."""
    from ..plan.model import WARMUP_WARN_SHARE

    out = []
    plans = [("global", plan_file.global_plan)] + [(f"class {n}", p) for n, p in sorted(plan_file.classes.items())]
    for name, plan in plans:
        gen_len = plan.fit.get("gen_len")
        if gen_len and plan.warmup_tokens >= WARMUP_WARN_SHARE * gen_len:
            out.append(f"{name}: warm-up of {plan.warmup_tokens} tokens covers most of the {gen_len}-token "
                       "generation it was fitted for; it skips little")
        elif not gen_len and plan.warmup_tokens >= 64:
            out.append(f"{name}: no generation length recorded and a {plan.warmup_tokens}-token warm-up: requests "
                       f"generating fewer tokens skip nothing (refit with export-plan --gen-len N)")
    return out


def print_plan(plan_file, console, source: str) -> None:
    fp = plan_file.model.get("fingerprint", {})
    console.print(f"[bold]{source}[/bold]: plan v{plan_file.version} for {plan_file.model.get('name')} "
                  f"({', '.join(f'{k} {v}' for k, v in fp.items())})")
    prov = plan_file.provenance
    if prov:
        tokens = prov.get("tokens") or {}
        parts = [f"{k} {prov[k]}" for k in ("tool_version", "created") if k in prov]
        if isinstance(tokens, dict):
            parts += [f"{k} tokens {v}" for k, v in tokens.items() if isinstance(v, int)]
        if prov.get("profile"):
            parts.insert(0, f"profile {prov['profile']}")
        console.print("provenance: " + "; ".join(parts))
    if plan_file.defaults:
        console.print("defaults: " + ", ".join(f"{k} {v}" for k, v in plan_file.defaults.items()))
    console.print(plan_table(plan_file))
    glob = plan_file.global_plan
    per_class = glob.fit.get("class_skip_ratio") if isinstance(glob.fit, dict) else None
    if isinstance(per_class, dict) and per_class:
        console.print("global plan's simulated skip ratio per class: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()))
    for line in substitute_lines(plan_file) + neuron_lines(plan_file):
        console.print(line, highlight=False)
    for warning in warmup_warnings(plan_file):
        console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
    router = plan_file.router
    if router is not None:
        acc = "-" if router.heldout_accuracy is None else f"{router.heldout_accuracy:.1%}"
        console.print(f"router: nearest centroid ({router.metric}) of the mean hidden state after layer "
                      f"{router.layer}; classes {', '.join(router.classes)}; held-out accuracy {acc}")


def show(plan: Annotated[Path, typer.Argument(help="YAML plan file.", show_default=False, metavar="PLAN")],
         as_yaml: Annotated[bool, typer.Option("--yaml", help="Print the canonical YAML instead.")] = False) -> None:
    """Pretty-print a plan file."""
    from rich.console import Console

    from ..plan.model import PlanError
    from ..plan import dump_plan, load_plan_tensors, plan_from_dict, read_plan_dict

    try:
        data, _ = read_plan_dict(plan)
    except PlanError as e:
        raise CLIError(str(e))
    try:
        plan_file = plan_from_dict(data)
        load_plan_tensors(plan_file, plan.parent)
    except PlanError as e:
        from .validate import print_problems

        print_problems(str(plan), e.problems)
        raise SystemExit(2)  # problems already printed; main() drops typer.Exit codes in non-standalone mode
    if as_yaml:
        print(dump_plan(plan_file), end="")
        return
    print_plan(plan_file, Console(width=140), str(plan))


def register(app: typer.Typer) -> None:
    app.command("show", help=HELP)(show)
