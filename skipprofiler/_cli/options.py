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

# Settings field -> the option that sets it, for every command. Library messages name fields (`FitSettings.target`,
# `FitSettings.mode="adaptive"`); errors.in_option_words prints the options instead (`--target-skip`, `--mode adaptive`).
OPTION_OF_SETTING: dict[str, str] = {
    "FitSettings.target": "--target-skip",
    "FitSettings.mode": "--mode",
    "FitSettings.apply_to": "--apply-to",
    "FitSettings.warmup_tokens": "--warmup-tokens",
    "FitSettings.dense_every": "--dense-every",
    "FitSettings.compensation": "--compensation",
    "FitSettings.rank": "--rank",
    "FitSettings.error_aware": "--error-aware",
    "FitSettings.max_skip": "--max-skip",
    "FitSettings.tau_mode": "--tau",
    "FitSettings.cold_floor": "--cold-floor",
    "FitSettings.min_class_tokens": "--min-class-tokens",
    "FitSettings.gen_len": "--gen-len",
    "FitSettings.seed": "--seed",
    "FitSettings.batch_decision": "--batch-decision",
    "FitSettings.batch_size": "--batch-size",
    "FitSettings.per_class": "--per-class",
    "FitSettings.classes": "--class",
    "FitSettings.max_ppl_increase": "--max-ppl-increase",
    "FitSettings.max_kl": "--max-kl",
    "FitSettings.refine": "--refine",
    "FitSettings.data": "--data",
    "FitSettings.text_column": "--text-column",
    "FitSettings.class_column": "--class-column",
    "FitSettings.granularity": "--granularity",
    "FitSettings.neuron_fill": "--neuron-fill",
    "FitSettings.neuron_importance": "--neuron-importance",
    "FitSettings.neuron_rounds": "--neuron-rounds",
    "FitSettings.neuron_statistics": "--neuron-statistics",
    "ProfileSettings.data": "--data",
    "ProfileSettings.text_column": "--text-column",
    "ProfileSettings.class_column": "--class-column",
    "ProfileSettings.max_tokens": "--max-tokens",
    "ProfileSettings.seq_len": "--seq-len",
    "ProfileSettings.batch_size": "--batch-size",
    "ProfileSettings.shard": "--shard",
    "ProfileSettings.generate": "--new-tokens",
    "ProfileSettings.reservoir_size": "--reservoir",
    "ProfileSettings.doc_reservoir_size": "--doc-samples",
    "ProfileSettings.seed": "--seed",
    "ProfileSettings.neurons": "--neurons",
    "EvalConfig.data": "--data",
    "EvalConfig.text_column": "--text-column",
    "EvalConfig.class_column": "--class-column",
    "EvalConfig.prompt_len": "--prompt-len",
    "EvalConfig.gen_len": "--gen-len",
    "EvalConfig.docs_per_class": "--docs-per-class",
    "EvalConfig.batch_size": "--batch-size",
    "EvalConfig.batch_decision": "--batch-decision",
    "EvalConfig.greedy_prompts": "--greedy-prompts",
    "EvalConfig.greedy_new_tokens": "--greedy-new-tokens",
    "EvalConfig.speed_new_tokens": "--speed-new-tokens",
    "EvalConfig.speed_repeats": "--speed-repeats",
    "EvalConfig.baselines": "--baselines",
    "EvalConfig.random_seeds": "--seeds",
    "EvalConfig.oracle": "--oracle",
    "EvalConfig.search_reference": "--search-reference",
    "EvalConfig.qa": "--qa",
    "EvalConfig.qa_file": "--qa-file",
    "EvalConfig.sweep": "--sweep",
    "EvalConfig.sweep_refine": "--refine",
    "EvalConfig.sweep_per_class": "--per-class",
    "EvalConfig.oracle_targets": "--oracle-at",
    "EvalConfig.lm_eval": "--lm-eval",
    "EvalConfig.lm_eval_include": "--lm-eval-include",
    "EvalConfig.lm_eval_limit": "--lm-eval-limit",
    "EvalConfig.lm_eval_chat": "--lm-eval-chat",
}

# What no one settings object names: a field every settings object with it sets from the same option (`data`,
# `text_column`: corpus messages, whichever command read the data), or a parameter of a library function that the
# option passes in (`device`: distributed.init_from_env / rank_device; `device_map`: models.load_model, parsed by
# distributed.parse_device_map). Library messages write these in backticks (`device="cuda"`); errors.in_option_words
# prints the option (`--device cuda`).
OPTION_OF_PARAMETER: dict[str, str] = {
    "data": "--data",
    "text_column": "--text-column",
    "device": "--device",
    "device_map": "--device-map",
}

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

