"""`EvalConfig`, everything that shapes an evaluation besides the model and the plans, and `EvalError`."""

from __future__ import annotations

from dataclasses import dataclass


class EvalError(ValueError):
    """Evaluation cannot produce meaningful numbers (bad input, mismatch, empty data, NaN)."""


@dataclass
class EvalConfig:
    """Everything that shapes an evaluation besides the model and the plans (defaults: `skipprof eval`'s)."""

    data: str | None = None  # held-out --data spec (file, folder, glob, hub name; CLASS= prefix); None: bundled
    text_column: str | None = None  # default `text`, else chat `messages` rendered with the chat template
    class_column: str | None = None  # default `class` when present, else one class `default`
    prompt_len: int = 64  # dense prompt prefix of each held-out window
    gen_len: int = 256  # decode positions per window after the prompt: the generation length plans are judged at
    docs_per_class: int | None = 16
    batch_size: int = 16
    batch_decision: str | None = None  # adaptive plans: rows of a batch decide alone or together (None: the plan's)
    greedy_prompts: int = 8  # spread over the classes
    greedy_new_tokens: int = 32
    speed: bool = True
    speed_new_tokens: int = 64
    speed_repeats: int = 5
    baselines: bool = False
    random_seeds: int = 3
    oracle: bool | None = None  # None: with baselines, when the model has <= oracle_max_layers layers
    oracle_max_layers: int = 16
    search_reference: bool | None = None  # None: with baselines, when the oracle is too large (> oracle_max_layers)
    search_docs_per_class: int = 4  # held-out documents per class the search reference is searched on
    search_gen_len: int = 96  # decode positions of those documents during the search (all of them are measured)
    search_shortlist: int = 6  # swap candidates per slot in the search reference (export-plan --refine uses 4)
    seed: int = 0
    calibration_data: str | None = None  # where baselines that fit something (ReplaceMe) fit it; None: bundled split
    qa: bool = False  # knowledge retention: short factual answers, plan vs dense (skipprofiler.evaluation.qa)
    qa_file: str | None = None  # None: the bundled question set
    qa_new_tokens: int = 16
    sweep: list[float] | None = None  # fit static + adaptive plans at these targets from the profile, evaluate each
    sweep_refine: bool = True  # with sweep: refine the static sets by measured KL on the calibration split
    sweep_per_class: bool = False  # with sweep: also fit class plans, evaluated routed by each document's label
    oracle_targets: list[float] | None = None  # with sweep: the targets the oracle runs at (None: where affordable)
    lm_eval: list[str] | None = None  # lm-evaluation-harness tasks run for dense and each named plan (skipprofiler.integrations.lm_eval)
    lm_eval_include: list[str] | None = None  # extra harness task folders (the bundled tasks are always there)
    lm_eval_limit: int | None = None  # documents per harness task (None: all)
    lm_eval_chat: bool = False  # apply the chat template, few-shot examples as turns (the skipprof_qa_chat task)

    @property
    def window(self) -> int:
        """Tokens per held-out document: the prompt plus the generation."""
        return self.prompt_len + self.gen_len

    @property
    def flop_context(self) -> int:
        """Cached positions the FLOP-ideal speedups are counted at: the prompt and half the generation."""
        return self.prompt_len + self.gen_len // 2
