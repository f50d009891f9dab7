"""Held-out data prepared once per run and shared by every row: the windows per class with their dense references,
the greedy prompts with their dense continuations, and the dense QA passes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .fidelity import DenseReference, FidelityError, dense_reference, greedy_tokens, model_forward, prepare_windows
from ..progress import Progress
from .config import EvalConfig, EvalError


@dataclass
class QAData:
    """The QA questions, their prompts, the dense prompt passes (reused by every plan) and the dense score."""

    questions: list
    prompts: list[list[int]]
    prefills: list  # qa.Prefill per batch
    dense: Any  # qa.QAScore
    tokenizer: Any
    new_tokens: int


@dataclass
class EvalData:
    """Held-out windows prepared once: dense references per class and greedy prompts."""

    references: list[DenseReference]
    classes: list[str]
    prompts: list[list[int]]
    prompt_classes: list[str]
    dense_greedy: list[list[int]] = field(default_factory=list)
    qa: QAData | None = None
    windows: list[tuple[list[int], str]] = field(default_factory=list)  # (tokens, class) of every held-out document
    pad_id: int = 0
    progress: Progress = field(default_factory=Progress)  # every row reports its steps here
    row_plans: dict[str, Any] = field(default_factory=dict)  # row name -> its plan, or ("drop_layers", layers)

    def of_class(self, cls: str) -> list[DenseReference]:
        return [r for r in self.references if r.batch.classes[0] == cls]

    def tokens(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ref in self.references:
            out[ref.batch.classes[0]] = out.get(ref.batch.classes[0], 0) + int(ref.mask.sum())
        return out


def prepare_data(model, tokenizer, data_spec: str | None, config: EvalConfig,
                 progress: Progress | None = None) -> EvalData:
    """Tokenize, cut and batch the held-out documents per class; compute the dense references and greedy runs."""
    progress = progress or Progress()
    try:
        # Whole windows only: every row is measured at the stated generation length, none at a shorter one.
        windows = prepare_windows(model, tokenizer, data_spec, split="heldout", window=config.window,
                                  min_len=config.window, prompt_len=config.prompt_len, batch_size=config.batch_size,
                                  per_class=config.docs_per_class, text_column=config.text_column,
                                  class_column=config.class_column)
    except FidelityError as e:
        raise EvalError(f"held-out data: {e} (EvalConfig.prompt_len={config.prompt_len} + "
                        f"EvalConfig.gen_len={config.gen_len}; lower EvalConfig.gen_len for shorter documents)"
                       ) from None
    tokens, classes, pad, batches = windows.tokens, windows.classes, windows.pad_id, windows.batches
    class_names = list(dict.fromkeys(classes))
    forward, references = model_forward(model), []
    with progress.stage("dense pass", len(batches)) as tick:
        for batch in batches:
            try:
                references.append(dense_reference(forward, batch))
            except FidelityError as e:
                raise EvalError(f"held-out data: {e}") from None
            tick()
    prompts, prompt_classes = [], []
    by_class = {c: [t for t, k in zip(tokens, classes) if k == c] for c in class_names}
    for i in range(config.greedy_prompts):
        cls = class_names[i % len(class_names)]
        pool = by_class[cls]
        if i // len(class_names) < len(pool):
            prompts.append(pool[i // len(class_names)][:config.prompt_len])
            prompt_classes.append(cls)
    data = EvalData(references, class_names, prompts, prompt_classes, windows=list(zip(tokens, classes)), pad_id=pad,
                    progress=progress)
    with progress.stage("dense greedy", len(prompts)) as tick:
        for prompt in prompts:
            data.dense_greedy += greedy_tokens(model, [prompt], config.greedy_new_tokens)
            tick()
    return data


def prepare_qa(model, tokenizer, config: EvalConfig, log=None, progress: Progress | None = None) -> QAData:
    """The QA questions and the dense model's prompt passes and answers (skipprofiler.evaluation.qa)."""
    from .qa import QAError, build_prompts, decode_prefilled, load_questions, prefill, score

    progress = progress or Progress()
    try:
        questions = load_questions(config.qa_file)
    except QAError as e:
        raise EvalError(f"QA questions: {e}") from None
    prompts = build_prompts(tokenizer, questions)
    started = time.perf_counter()
    with progress.stage("QA dense (prompts, answers)", 2) as tick:
        prefills = prefill(model, tokenizer, prompts, batch_size=config.batch_size)
        tick()
        answers = decode_prefilled(model, tokenizer, prefills, len(prompts), max_new_tokens=config.qa_new_tokens)
        tick()
    if log:
        log(f"QA: {len(questions)} questions, dense pass {time.perf_counter() - started:.0f} s")
    return QAData(questions, prompts, prefills, score(questions, answers), tokenizer, config.qa_new_tokens)


def search_windows(data: EvalData, config: EvalConfig) -> tuple[list[list[int]], list[str]]:
    """The search reference's windows and their classes: the first `search_docs_per_class` held-out documents of
    each class, cut to `prompt_len + search_gen_len` tokens."""
    kept: dict[str, int] = {}
    windows, classes = [], []
    for tokens, cls in data.windows:
        if kept.get(cls, 0) < config.search_docs_per_class:
            kept[cls] = kept.get(cls, 0) + 1
            windows.append(tokens[:config.prompt_len + config.search_gen_len])
            classes.append(cls)
    return windows, classes
