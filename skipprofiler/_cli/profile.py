"""`skipprof profile`: run a model over a calibration corpus and write a profile file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options
from .errors import CLIError

HELP = (
    "Profile FFN saturation: run a model over a calibration corpus and record, per layer, token and class, the "
    "cosine cos(h, h + FFN) (FFN-SkipLLM's metric), cos(FFN in, FFN out) and norm ratios as fine histograms, "
    "moments and a per-token sample. Prints a per-layer table at the end. Format: docs/profile-format.md.\n\n"
    "--model is a local checkpoint folder, a .gguf file or a hub id (where a hub is reachable); default: the "
    "bundled demo model. "
    "--data is a file, glob or folder (jsonl/json/txt/parquet/csv, .gz ok) or a hub dataset name[:config][@split], "
    "repeatable, optionally prefixed CLASS= to label it; default: the bundled calibration split (labels from its "
    "`class` column). Ctrl-C stops early and writes a profile marked partial.\n\n"
    "Examples:\n\n"
    "  skipprof profile                                         # demo model, bundled corpus -> profile.prof\n\n"
    "  skipprof profile --new-tokens 32 --out demo.prof         # also profile 32 greedy decode tokens per prompt\n\n"
    "  skipprof profile -m ./my-llama --data fiction=books/*.txt --data code=src.jsonl.gz --max-tokens 500000\n\n"
    "  skipprof profile -m ./my-llama --data chats.jsonl --text-column messages --class-column topic --json\n\n"
    "  torchrun --nproc-per-node 4 -m skipprofiler profile -m ./my-llama --out big.prof   # data parallel\n\n"
    "  skipprof profile -m ./my-70b --device-map auto --dtype bfloat16   # one model over all GPUs\n\n"
    "  skipprof profile -m ./my-llama --shard 3/8 --out part-3.prof      # array job; then `skipprof merge`\n\n"
    "Scaling out (several GPUs, nodes, array jobs): docs/scaling.md.\n"
)


def _progress_bar(console, max_tokens: int, generate: int):
    """The profiling bar: prompt tokens against the --max-tokens budget, decode tokens and throughput beside."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("[bold]profiling[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("prompt tokens"),
                   TextColumn("{task.fields[decode]}"), TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=True)
    task = bar.add_task("profile", total=max_tokens, decode="", rate="")
    start = time.perf_counter()

    def on_batch(event) -> None:
        rate = (event.prompt_tokens + event.decode_tokens) / max(time.perf_counter() - start, 1e-9)
        decode = f"+ {event.decode_tokens:,} decode" if generate else ""
        bar.update(task, completed=event.prompt_tokens, decode=decode, rate=f"{rate:,.0f} tok/s")

    return bar, on_batch


def profile(
    model_arg: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", hidden=True, show_default=False)] = None,
    model: options.Model = None,
    data: Annotated[Optional[list[str]], typer.Option(
        "--data", "-d", metavar="SPEC", show_default=False,
        help="[CLASS=]file|glob|folder|hub-name[:config][@split]; repeatable (default: the bundled calibration "
             "split).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="Profile file to write.")
                   ] = Path("profile.prof"),
    device: options.Device = "auto",
    dtype: options.Dtype = "float32",
    text_column: options.TextColumn = None,
    class_column: options.ClassColumn = None,
    max_tokens: Annotated[int, typer.Option(metavar="N", help="Prompt-token budget over the whole corpus.")
                          ] = 60_000,
    seq_len: Annotated[int, typer.Option(metavar="N", help="Tokens per document (longer ones are truncated).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", metavar="N",
                                            help="Documents per forward (length-sorted batching).")] = 8,
    new_tokens: Annotated[int, typer.Option(
        "--new-tokens", metavar="N", help="Also profile N greedy tokens generated from each prompt (the decode "
                                          "regime, which plans are fitted on).")] = 0,
    generate: Annotated[Optional[int], typer.Option("--generate", hidden=True, show_default=False)] = None,
    reservoir: Annotated[int, typer.Option(metavar="N", help="Per-token samples kept per class and regime (for the "
                                                             "adaptive fit).")] = 4096,
    doc_samples: Annotated[int, typer.Option(metavar="N", help="Per-document hidden-state samples kept per class "
                                                               "(for the prompt router).")] = 256,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the sampling keys.")] = 0,
    neurons: Annotated[Optional[bool], typer.Option(
        "--neurons/--no-neurons", show_default=False,
        help="Per-neuron FFN statistics (sums of each FFN's intermediate activation and its square, and of its "
             "input's squares; what neuron plans are fitted from). Default: recorded for dense FFNs, left out for "
             "sparse-MoE models; --neurons requires them (a MoE model is refused), --no-neurons leaves them out.")
                       ] = None,
    as_json: options.JsonFlag = False,
    device_map: Annotated[Optional[str], typer.Option(
        metavar="MAP", show_default=False,
        help="Spread the model over several devices with accelerate: auto, balanced, balanced_low_0, sequential, "
             "a JSON object {module: device} or a .json file. Overrides --device.")] = None,
    offload_folder: Annotated[Optional[Path], typer.Option(
        metavar="PATH", help="Folder for weights a --device-map puts on \"disk\".", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option(
        metavar="I/N", show_default=False,
        help="Profile only batch j with j % N == I (array jobs; combine the N files with `skipprof merge`).")
                     ] = None,
) -> None:
    """Profile FFN saturation of a model on a corpus."""
    from rich.console import Console

    from ..profile.corpus import CorpusError, parse_spec
    from ..profile.distributed import DistributedError, init_from_env, parse_device_map, parse_shard, rank_device
    from ..profile import ProfileError, ProfileSettings
    from ..profile.recipe import profile_corpus
    from .common import check_writable, load_model_and_tokenizer, one_model, parse_device, parse_dtype, print_json
    from .inspect import default_regime, print_table, summary

    model = one_model(model_arg, model)
    try:
        settings = ProfileSettings(data=data, text_column=text_column, class_column=class_column,
                                   max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                                   shard=parse_shard(shard) if shard is not None else None,
                                   generate=new_tokens if generate is None else generate, reservoir_size=reservoir,
                                   doc_reservoir_size=doc_samples, seed=seed, neurons=neurons)
        parsed_map = parse_device_map(device_map)
    except ValueError as e:
        raise CLIError(str(e)) from None
    problems = settings.problems()
    if problems:
        raise CLIError("; ".join(problems))
    parse_dtype(dtype)
    parse_device(device)
    check_writable(out)
    try:
        for spec in settings.data or []:
            parse_spec(spec)  # a missing data path fails before the model is loaded
        ctx = init_from_env(device)  # None unless launched by torchrun with several ranks
        this_device = rank_device(ctx, device)
    except (CorpusError, DistributedError) as e:
        raise CLIError(str(e)) from None
    loaded_model, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=str(this_device),
                                                       device_map=parsed_map, offload_folder=offload_folder,
                                                       dist_ctx=ctx)
    bar, on_batch = _progress_bar(Console(stderr=True, quiet=ctx is not None and not ctx.is_main), max_tokens,
                                  settings.generate)
    try:
        with bar:
            result = profile_corpus(loaded_model, tokenizer, settings, source=model, dist_ctx=ctx,
                                    on_progress=on_batch)
    except (CorpusError, ProfileError) as e:
        raise CLIError(f"{e}; nothing written") from None
    except DistributedError as e:
        raise CLIError(str(e), exit_code=1) from None
    if result is None:
        return  # not rank 0: rank 0 writes the merged profile
    try:
        result.save(out)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e}") from None
    elapsed = result.header["elapsed_s"]
    data_summary = summary(result, default_regime(result), str(out))
    data_summary["elapsed_s"] = elapsed
    data_summary["tokens_per_s"] = round((result.tokens("prompt") + result.tokens("decode")) / max(elapsed, 1e-9), 1)
    if as_json:
        print_json(data_summary)
    else:
        print_table(Console(), data_summary)
        print(f"wrote {out} ({result.tokens('prompt'):,} prompt + {result.tokens('decode'):,} decode tokens, "
              f"{len(result.classes)} classes, {elapsed:.1f} s)")
    if result.partial:
        raise CLIError(f"interrupted: wrote a partial profile to {out} with the {result.tokens('prompt'):,} prompt "
                       "tokens seen", exit_code=130)


def register(app: typer.Typer) -> None:
    app.command("profile", help=HELP)(profile)
