"""`skipprof profile`: run a model over a calibration corpus and write a profile file."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import CLIError

HELP = (
    "Profile FFN saturation: run MODEL over a calibration corpus and record, per layer, token and class, the "
    "cosine cos(h, h + FFN) (FFN-SkipLLM's metric), cos(FFN in, FFN out) and norm ratios as fine histograms, "
    "moments and a per-token sample. Prints a per-layer table at the end. Format: docs/profile-format.md.\n\n"
    "MODEL is a local checkpoint folder (or a hub id where a hub is reachable); default: the bundled demo model. "
    "--data is a file, glob or folder (jsonl/json/txt/parquet/csv, .gz ok) or a hub dataset name[:config][@split], "
    "repeatable, optionally prefixed CLASS= to label it; default: the bundled calibration split (labels from its "
    "`class` column). Ctrl-C stops early and writes a profile marked partial.\n\n"
    "Examples:\n\n"
    "  skipprof profile                                         # demo model, bundled corpus -> profile.prof\n\n"
    "  skipprof profile --generate 32 --out demo.prof           # also profile 32 greedy decode tokens per prompt\n\n"
    "  skipprof profile ./my-llama --data fiction=books/*.txt --data code=src.jsonl.gz --max-tokens 500000\n\n"
    "  skipprof profile ./my-llama --data chats.jsonl --text-column messages --class-column topic --json\n\n"
    "  torchrun --nproc-per-node 4 -m skipprofiler profile ./my-llama --out big.prof   # data parallel\n\n"
    "  skipprof profile ./my-70b --device-map auto --dtype bfloat16   # one model over all GPUs\n\n"
    "  skipprof profile ./my-llama --shard 3/8 --out part-3.prof      # array job; then `skipprof merge`\n\n"
    "Scaling out (several GPUs, nodes, array jobs): docs/scaling.md.\n"
)


def _check_options(seq_len: int, batch_size: int, max_tokens: int, generate: int, reservoir: int,
                   doc_samples: int) -> None:
    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--max-tokens", max_tokens)):
        if value <= 0:
            raise CLIError(f"{name} must be > 0, got {value}")
    for name, value in (("--generate", generate), ("--reservoir", reservoir), ("--doc-samples", doc_samples)):
        if value < 0:
            raise CLIError(f"{name} must be >= 0, got {value}")


def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]profiling[/bold]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("prompt tokens"), TextColumn("{task.fields[decode]}"),
                    TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def profile(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint folder or hub id (default: bundled demo).",
                                                   show_default=False)] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="[CLASS=]file|glob|folder|hub-name"
                                                      "[:config][@split]; repeatable.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile file to write.")] = Path("profile.prof"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    text_column: Annotated[Optional[str], typer.Option(help="Text column (default: `text`, else chat `messages` "
                                                            "rendered with the chat template).")] = None,
    class_column: Annotated[Optional[str], typer.Option(help="Column with class labels (default: `class` when "
                                                             "present, else class `default`).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Prompt-token budget over the whole corpus.")] = 60_000,
    seq_len: Annotated[int, typer.Option(help="Tokens per document (longer ones are truncated).")] = 256,
    batch_size: Annotated[int, typer.Option(help="Documents per forward (length-sorted batching).")] = 8,
    generate: Annotated[int, typer.Option(help="Also profile N greedy tokens generated from each prompt (the "
                                               "decode regime, which plans are fitted on).")] = 0,
    reservoir: Annotated[int, typer.Option(help="Per-token samples kept per class and regime (for the adaptive "
                                                "fit).")] = 4096,
    doc_samples: Annotated[int, typer.Option(help="Per-document hidden-state samples kept per class (for the "
                                                  "prompt router).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the sampling keys.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of the table.")
                       ] = False,
    device_map: Annotated[Optional[str], typer.Option(
        help="Spread the model over several devices with accelerate: auto, balanced, balanced_low_0, sequential, "
             "a JSON object {module: device} or a .json file. Overrides --device.", show_default=False)] = None,
    offload_folder: Annotated[Optional[Path], typer.Option(
        help="Folder for weights a --device-map puts on \"disk\".", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option(
        help="I/N: profile only batch j with j % N == I (array jobs; combine the N files with `skipprof "
             "merge`).", show_default=False)] = None,
) -> None:
    """Profile FFN saturation of a model on a corpus."""
    from rich.console import Console

    from ..corpus import Corpus, CorpusError
    from ..distributed import (DistributedError, init_from_env, parse_device_map, parse_shard, profile_distributed,
                               rank_device, shard_batches)
    from ..profile import ProfileSettings
    from .common import check_writable, load_model, parse_device, parse_dtype, print_json
    from .inspect import default_regime, print_table, summary

    _check_options(seq_len, batch_size, max_tokens, generate, reservoir, doc_samples)
    parse_dtype(dtype)
    parse_device(device)
    check_writable(out)
    try:
        parsed_map = parse_device_map(device_map)
        shard_of = parse_shard(shard) if shard is not None else None
        ctx = init_from_env(device)  # None unless launched by torchrun with several ranks
    except (ValueError, DistributedError) as e:
        raise CLIError(str(e)) from None
    if ctx is not None and shard_of is not None:
        raise CLIError("under torchrun the ranks already split the corpus: drop --shard")
    device = str(rank_device(ctx, device))
    if not data:
        from .. import demo

        data = [demo.data_spec("calibration")]
    try:
        from ..corpus import parse_spec

        for spec in data:
            parse_spec(spec)  # a missing data path fails before the model is loaded
    except CorpusError as e:
        raise CLIError(str(e)) from None
    loaded_model, tokenizer = load_model(model, dtype=dtype, device=device, device_map=parsed_map,
                                         offload_folder=offload_folder, dist_ctx=ctx)
    try:
        corpus = Corpus(list(data), tokenizer, text_column=text_column, class_column=class_column,
                        max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size).open()
    except CorpusError as e:
        raise CLIError(str(e)) from None
    console = Console(stderr=True, quiet=ctx is not None and not ctx.is_main)
    settings = ProfileSettings(generate=generate, reservoir_size=reservoir, doc_reservoir_size=doc_samples,
                               seed=seed)
    from .common import model_location

    location = model_location(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    batches = corpus.batches()
    try:
        first = next(batches)  # an empty corpus fails here, before any progress output
    except CorpusError as e:
        raise CLIError(str(e)) from None
    start = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task("profile", total=max_tokens, decode="", rate="")

        def on_batch(progress) -> None:
            seconds = max(time.perf_counter() - start, 1e-9)
            rate = (progress.prompt_tokens + progress.decode_tokens) / seconds
            decode = f"+ {progress.decode_tokens:,} decode" if generate else ""
            bar.update(task, completed=progress.prompt_tokens, decode=decode, rate=f"{rate:,.0f} tok/s")

        try:
            result = profile_distributed(loaded_model, shard_batches(itertools.chain([first], batches), shard_of), ctx,
                                     settings, class_names=lambda: corpus.classes, on_batch=on_batch,
                                     eos_token_ids=eos_ids, pad_token_id=corpus.pad_token_id)
        except CorpusError as e:
            raise CLIError(str(e)) from None
        except DistributedError as e:
            raise CLIError(str(e), exit_code=1) from None
        if result is None:
            return  # not rank 0: rank 0 writes the merged profile
        bar.update(task, total=max(corpus.tokens, 1), completed=corpus.tokens)
    elapsed = time.perf_counter() - start
    # A .gguf file is named by its file name: plans copy the name, and a site-packages path is this machine's only.
    name = Path(location).name if location.lower().endswith(".gguf") else (model or "skipprofiler-demo")
    result.header["model"].update(name=name, path=location)
    result.header["corpus"] = corpus.provenance()
    result.header["corpus_settings"] = corpus.settings()
    result.header["elapsed_s"] = round(elapsed, 3)
    if shard_of is not None:
        result.header["shard"] = {"index": shard_of[0], "count": shard_of[1]}
    if result.tokens("prompt") == 0:
        raise CLIError("no tokens were profiled (interrupted before the first batch); nothing written")
    try:
        result.save(out)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e}") from None
    regime = default_regime(result)
    data_summary = summary(result, regime, str(out))
    data_summary["elapsed_s"] = round(elapsed, 3)
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
