"""Data and scoring of the bundled lm-evaluation-harness tasks (docs/lm-eval.md), from skipprofiler's own data:
the QA set (skipprofiler/data/qa.jsonl, scored by skipprofiler.evaluation.qa.is_correct, the rule of `skipprof eval --qa`) and
the bundled held-out split (skipprofiler/demo/corpus/heldout.jsonl.gz). Nothing is downloaded."""

from __future__ import annotations

from typing import Any


def qa_dataset(**_: Any):
    """The bundled QA questions as one `test` split; `system_prompt` is `--qa`'s system message (the chat task's
    description)."""
    from datasets import Dataset, DatasetDict

    from skipprofiler.evaluation.qa import SYSTEM_PROMPT, load_questions

    rows = [{"id": q.id, "class": q.cls, "question": q.question, "answers": q.answers, "system_prompt": SYSTEM_PROMPT}
            for q in load_questions()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def qa_fewshot() -> list[dict]:
    """`--qa`'s three worked examples, always these, in this order."""
    from skipprofiler.evaluation.qa import FEW_SHOT_EXAMPLES

    return [{"question": q, "answers": [a]} for q, a in FEW_SHOT_EXAMPLES]


def qa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: skipprofiler.evaluation.qa.is_correct on the generation (normalised, question echoes allowed)."""
    from skipprofiler.evaluation.qa import is_correct

    return {"exact_match": float(is_correct(results[0], doc["answers"], doc["question"]))}


def heldout_dataset(**_: Any):
    """The bundled held-out documents as one `test` split, the classes interleaved (document i of every class, then
    i + 1), so that ``--limit N`` takes the first N / classes documents of each class, as `skipprof eval` does."""
    from datasets import Dataset, DatasetDict

    from skipprofiler.evaluation.fidelity import load_documents

    by_class: dict[str, list[str]] = {}
    for doc in load_documents(None, split="heldout"):
        by_class.setdefault(doc.cls, []).append(doc.text)
    rows, depth = [], max(len(v) for v in by_class.values())
    for i in range(depth):
        for cls, texts in by_class.items():
            if i < len(texts):
                rows.append({"class": cls, "text": texts[i]})
    return DatasetDict({"test": Dataset.from_list(rows)})
