"""`skipprof validate`: check a plan file (and optionally its fit to a model), reporting every problem at once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import CLIError

HELP = (
    "Check a YAML skip plan and report every problem at once, one per line with its path (exit 2 if any).\n\n"
    "Checks: YAML syntax, unknown keys, types, ranges (tau in [-1, 1], fractions in (0, 1], ...), layer "
    "indices against the plan's model, the router against its class plans, the plan version, the linear maps and "
    "neuron subsets in the safetensors file beside the plan (present, unaltered, shapes, dtypes, widths). With "
    "--model, also the layer count, the model fingerprint (a plan fitted for another model is rejected) and the "
    "FFN width neuron subsets were chosen for. The model is built on the meta device from its config: no weights "
    "are loaded.\n\n"
    "Examples:\n\n"
    "  skipprof validate plans/demo-static-25.yaml\n\n"
    "  skipprof validate my-plan.yaml --model path/to/model\n"
)


def model_fingerprint_of(model_arg: str | None) -> dict:
    """Fingerprint of a model folder or .gguf file (default: the bundled demo model), from its config alone."""
    return model_facts_of(model_arg)[0]


def model_facts_of(model_arg: str | None) -> tuple[dict, int | None]:
    """(fingerprint, FFN intermediate width or None) of a model, from its config alone: the width is no fingerprint
    key (old plans would stop matching); only neuron subsets are checked against it."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..arch.models import load_config
    from ..arch.registry import model_fingerprint
    from .common import model_source

    source = model_source(model_arg)
    try:
        config = load_config(source)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read a model config from {source.display}: {str(e).splitlines()[0]}")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise CLIError(f"{source.display} is not a causal LM transformers can build: {str(e).splitlines()[0]}")
    return model_fingerprint(model), ffn_width_of(config)


def ffn_width_of(config) -> int | None:
    """The FFN's intermediate width from a transformers config, or None when the config does not say it plainly."""
    for key in ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def print_problems(source: str, problems: list[str]) -> None:
    noun = "problem" if len(problems) == 1 else "problems"
    print(f"error: {source}: {len(problems)} {noun}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def validate(plan: Annotated[Path, typer.Argument(help="YAML plan file to check.", show_default=False, metavar="PLAN")],
             model: Annotated[Optional[str], typer.Option(
                 "--model", "-m", metavar="MODEL", show_default=False,
                 help="Checkpoint folder, .gguf file or hub id the plan must fit (layer count and fingerprint).")
                              ] = None,
             ) -> None:
    """Check a plan file, reporting every problem at once."""
    from ..plan.model import PlanError
    from ..plan import load_plan_tensors, neuron_problems, plan_from_dict, read_plan_dict

    try:
        data, source = read_plan_dict(plan)
    except PlanError as e:
        raise CLIError(str(e))
    fingerprint, ffn_width = model_facts_of(model) if model is not None else (None, None)
    num_layers = fingerprint.get("num_layers") if fingerprint else None
    try:
        parsed = plan_from_dict(data, num_layers=num_layers, fingerprint=fingerprint)
        load_plan_tensors(parsed, plan.parent)  # present, unaltered (sha256), shapes, dtypes, widths
        if fingerprint is not None:  # neuron subsets against the model's FFN width
            against_model = [p for name, sub in parsed.named_plans()
                             for p in neuron_problems(sub, ffn_width,
                                                      fingerprint.get("hidden_size"), label=name)]
            if against_model:
                raise PlanError(against_model)
    except PlanError as e:
        print_problems(source, e.problems)
        raise SystemExit(2)  # problems already printed; main() drops typer.Exit codes in non-standalone mode
    kinds = f"global {parsed.global_plan.mode}"
    if parsed.classes:
        kinds += f", {len(parsed.classes)} class plans ({', '.join(sorted(parsed.classes))})"
    if parsed.router is not None:
        kinds += ", router"
    if parsed.global_plan.linear is not None:
        linear = parsed.global_plan.linear
        kinds += (f", linear maps {linear.file} ({'full rank' if linear.rank is None else f'rank {linear.rank}'}, "
                  f"{len(linear.layers)} layers, sha256 ok)")
    for name, sub in parsed.named_plans():
        if sub.neurons is not None:
            n = sub.neurons
            kinds += (f", {'' if name == 'global' else name + ' '}neuron subsets {n.file} (fill {n.fill}, "
                      f"{len(n.widths)} layers narrowed, sha256 ok)")
    against = f" and fits {model}" if model is not None else ""
    print(f"ok: {source} is a valid plan v{parsed.version} for {parsed.model['name']}{against} ({kinds})")


def register(app: typer.Typer) -> None:
    app.command("validate", help=HELP)(validate)
