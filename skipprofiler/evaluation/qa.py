"""Short-answer knowledge QA: does a skip plan keep the facts a model knows?

FFN-SkipLLM (Jaiswal et al., 2024, Table 3) reports that skipping saturated FFN blocks at decode time keeps factual
generation (FreebaseQA accuracy close to the dense model). This module is the offline counterpart: a bundled set of
short factual questions written for this project (``skipprofiler/data/qa.jsonl``, described in docs/qa-set.md), greedy
generation of short answers, and scoring of a plan against the dense model (`retention`).

Scoring rule (`is_correct`). The answer is read from the first non-empty line of the generation, and separately from
the first sentence of that line. Each is normalised (`normalize_answer`: lower case, accents and punctuation dropped,
articles a/an/the dropped, whitespace collapsed) and split into words. It is correct when one accepted variant occurs
in it as a whole-word span and every word outside that span either

* echoes the question ("The capital of France is Paris"; a final "s" is ignored, so "freezes" echoes "freeze"), or
* is one of a few fixed frame words (`FRAME_WORDS`: is, was, has, answer, called, written, by, ...).

A variant in parentheses is read as a gloss and dropped first ("Hertz (Hz)", "12 (twelve)"); other parentheses stay.

So "Paris", "Paris." and "The capital of France is Paris." are right, while "Paris, Lyon or Marseille" or "Paris is
a beautiful city" are not: any word that is neither the answer nor a restatement of the question makes it wrong, and
text after the first line or sentence is never read. Numbers match only the variants listed in the data (both "12"
and "twelve" are listed). Without the question (``question=None``) only frame words may surround the answer.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .fidelity import pad_id_of

__all__ = ["QAError", "Question", "QAScore", "load_questions", "normalize_answer", "is_correct", "build_prompts",
           "generate_answers", "Prefill", "prefill", "decode_prefilled", "score", "retention", "DEFAULT_PATH", "FRAME_WORDS", "SYSTEM_PROMPT",
           "FEW_SHOT_EXAMPLES"]

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "qa.jsonl"

ARTICLES = frozenset({"a", "an", "the"})
# Words that restate a question's frame without adding a competing answer ("... is", "answer:", "written by ...").
FRAME_WORDS = frozenset({"is", "are", "was", "were", "be", "has", "have", "it", "its", "this", "that", "answer",
                         "question", "called", "named", "denoted", "known", "as", "by", "written", "wrote", "author",
                         "equals", "equal", "to", "makes", "of", "for", "in", "on", "at", "located"})

SYSTEM_PROMPT = "Answer the question with only the answer: a word, a name or a number. Do not explain."
# Worked examples shown before every question (as chat turns, or as "Question:/Answer:" text without a chat template).
# One short sentence restating the question is the form small instruct models keep to best; none of these questions
# is in the bundled set.
FEW_SHOT_EXAMPLES = (("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
                     ("What is 2 plus 3?", "2 plus 3 is 5."),
                     ("Who wrote the poem The Raven?", "The Raven was written by Edgar Allan Poe."))

_REQUIRED_KEYS = ("id", "class", "question", "answers")
_PARENS = re.compile(r"\(([^()]*)\)")


class QAError(ValueError):
    """A question file that cannot be used (one-line message)."""


@dataclass
class Question:
    id: str
    cls: str
    question: str
    answers: list[str]


@dataclass
class QAScore:
    correct: list[bool]
    accuracy: float
    per_class: dict[str, float]
    n_correct: int
    n_questions: int
    class_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # class -> (correct, total)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n_correct": self.n_correct, "n_questions": self.n_questions,
                "per_class": dict(self.per_class),
                "class_counts": {k: list(v) for k, v in self.class_counts.items()}}


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read a JSON-lines question file (default: the bundled set); blank lines are ignored."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.is_file():
        raise QAError(f"question file not found: {path}")
    questions: list[Question] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise QAError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise QAError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in _REQUIRED_KEYS if k not in rec]
            if missing:
                raise QAError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            for key in ("id", "class", "question"):
                if not isinstance(rec[key], str) or not rec[key].strip():
                    raise QAError(f"{path}:{lineno}: {key!r} must be a non-empty string")
            answers = rec["answers"]
            if (not isinstance(answers, list) or not answers
                    or not all(isinstance(a, str) and normalize_answer(a) for a in answers)):
                raise QAError(f"{path}:{lineno}: 'answers' must be a non-empty list of non-empty strings")
            if rec["id"] in seen:
                raise QAError(f"{path}:{lineno}: duplicate id {rec['id']!r}")
            seen.add(rec["id"])
            questions.append(Question(rec["id"], rec["class"], rec["question"], list(answers)))
    if not questions:
        raise QAError(f"question file is empty: {path}")
    return questions


def normalize_answer(text: str) -> str:
    """Lower case, strip accents, drop punctuation and the articles a/an/the, collapse whitespace.

    Thousands separators between digits go ("1,000" -> "1000"); other punctuation becomes a space, so "J.K." ->
    "j k" and "twenty-one" -> "twenty one".
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def _candidates(generated: str) -> list[str]:
    """The first non-empty line, and the first sentence of it when that is shorter."""
    line = next((ln.strip() for ln in generated.splitlines() if ln.strip()), "")
    sentence = re.split(r"(?<=[.!?])\s+", line, maxsplit=1)[0]
    return [line] if sentence == line else [line, sentence]


def _stem(word: str) -> str:
    """Drop one final "s" from words longer than three letters, so "freezes" echoes "freeze", "legs" echoes "leg"."""
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _has_span(words: list[str], span: list[str]) -> list[int]:
    n = len(span)
    return [i for i in range(len(words) - n + 1) if words[i:i + n] == span]


def is_correct(generated: str, answers: Sequence[str], question: str | None = None) -> bool:
    """Whether a generated short answer matches one of `answers` (the rule is in the module docstring).

    question: the question text; its words may surround the answer ("7 plus 5 is 12"). None: only `FRAME_WORDS` may.
    """
    variants = [v.split() for v in (normalize_answer(a) for a in answers) if v]
    variant_set = {" ".join(v) for v in variants}
    allowed = set(FRAME_WORDS)
    if question is not None:
        allowed |= set(normalize_answer(question).split())
    allowed = {_stem(w) for w in allowed}
    for text in _candidates(generated):
        text = _PARENS.sub(lambda m: " " if normalize_answer(m.group(1)) in variant_set else m.group(0), text)
        words = normalize_answer(text).split()
        for variant in variants:
            for i in _has_span(words, variant):
                outside = words[:i] + words[i + len(variant):]
                if all(_stem(w) in allowed for w in outside):
                    return True
    return False


def build_prompts(tokenizer, questions: Sequence[Question]) -> list[list[int]]:
    """Token ids of one prompt per question.

    With a chat template: a system message asking for only the short answer, the question as the user turn, and the
    assistant prefix (``add_generation_prompt=True``). Without one: three fixed few-shot examples (`FEW_SHOT_EXAMPLES`)
    in "Question: ...\\nAnswer: ..." form, then "Question: <q>\\nAnswer:".
    """
    prompts = []
    if getattr(tokenizer, "chat_template", None):
        for q in questions:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}]
            for shot_q, shot_a in FEW_SHOT_EXAMPLES:
                messages += [{"role": "user", "content": shot_q}, {"role": "assistant", "content": shot_a}]
            messages.append({"role": "user", "content": q.question})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    else:
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT_EXAMPLES)
        for q in questions:
            prompts.append(list(tokenizer(f"{shots}Question: {q.question}\nAnswer:")["input_ids"]))
    return prompts


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16,
                     batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy answers (new tokens only, special tokens skipped), in the order of `prompts`.

    Prompts are sorted by length and left-padded into batches (the attention mask marks the padding), then generated
    with ``do_sample=False`` up to `max_new_tokens` or the end-of-sequence token. Works the same with a skip plan
    applied (`skipprofiler.apply_plan`) or forward hooks on the model. progress(done, total) is called per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = pad_id_of(tokenizer, model)
    eos_id = model.generation_config.eos_token_id
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = _left_padded([prompts[i] for i in idx], pad_id)
        width = input_ids.shape[1]
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=pad_id, eos_token_id=eos_id)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True).strip()
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return answers


@dataclass
class Prefill:
    """One left-padded batch of prompts run through the dense model once: its KV cache and first answer token.

    Skip plans act on generated tokens only, so every plan's answers start from the same dense prompt pass;
    `decode_prefilled` continues from a copy of it instead of running the prompts again for every plan."""

    rows: list[int]  # prompt indices, in batch order
    attention_mask: torch.Tensor  # [B, W]
    cache: object
    first: torch.Tensor  # [B, 1] greedy token after the prompt


@torch.no_grad()
def prefill(model, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 16) -> list[Prefill]:
    """Dense prompt passes for `decode_prefilled`, batched as `generate_answers` batches them."""
    from transformers import DynamicCache

    from ..arch.compat import cache_kwargs

    pad_id = pad_id_of(tokenizer, model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, attention_mask = _left_padded([prompts[i] for i in idx], pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = DynamicCache()
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                       use_cache=True, **cache_kwargs(model, cache)).logits
        out.append(Prefill(idx, attention_mask, cache, logits[:, -1].argmax(-1, keepdim=True)))
    return out


@torch.no_grad()
def decode_prefilled(model, tokenizer, prefills: Sequence[Prefill], num_prompts: int, max_new_tokens: int = 16,
                     handle=None) -> list[str]:
    """Greedy answers continuing each `Prefill` (copied, so every call starts from the same prompt pass), in prompt
    order. With a skip-plan `handle` (apply_plan's), generated positions are decode positions from index 0, exactly
    as in `generate`; the answers equal `generate_answers`' (tests/test_qa.py)."""
    import contextlib
    import copy

    from ..arch.compat import cache_kwargs

    eos_id = model.generation_config.eos_token_id
    eos_ids = set(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id if eos_id is not None
                                                                     else tokenizer.eos_token_id])
    answers = [""] * num_prompts
    for batch in prefills:
        cache, mask, nxt = copy.deepcopy(batch.cache), batch.attention_mask, batch.first
        width = mask.shape[1]
        tokens = [nxt]
        done = torch.tensor([int(t) in eos_ids for t in nxt[:, 0]], device=nxt.device)
        scope = handle.decode_from(width) if handle is not None else contextlib.nullcontext()
        with scope:
            for _ in range(max_new_tokens - 1):
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                logits = model(input_ids=nxt, attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                               use_cache=True, **cache_kwargs(model, cache)).logits
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                done |= torch.tensor([int(t) in eos_ids for t in nxt[:, 0]], device=nxt.device)
        generated = torch.cat(tokens, dim=1).tolist()
        for row, i in enumerate(batch.rows):
            ids = generated[row]
            cut = next((k for k, t in enumerate(ids) if t in eos_ids), len(ids))
            answers[i] = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
    return answers


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[row, width - len(p):] = 1
    return input_ids, attention_mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as `generate` computes them (padding gets 1; it is masked anyway)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def score(questions: Sequence[Question], generated: Sequence[str]) -> QAScore:
    """Score generated answers (same order as `questions`) with `is_correct`, overall and per class."""
    if len(questions) != len(generated):
        raise ValueError(f"{len(questions)} questions but {len(generated)} generated answers")
    correct = [is_correct(g, q.answers, q.question) for q, g in zip(questions, generated)]
    counts: dict[str, list[int]] = {}
    for q, ok in zip(questions, correct):
        c = counts.setdefault(q.cls, [0, 0])
        c[0] += ok
        c[1] += 1
    n = len(correct)
    return QAScore(correct=correct, accuracy=sum(correct) / n if n else 0.0,
                   per_class={k: c / t for k, (c, t) in counts.items()}, n_correct=sum(correct), n_questions=n,
                   class_counts={k: (c, t) for k, (c, t) in counts.items()})


def retention(plan: QAScore, dense: QAScore) -> dict:
    """How much of the dense model's QA accuracy a plan keeps.

    retention: plan accuracy / dense accuracy (None when the dense model gets nothing right).
    retention_on_dense_correct: share of the questions the dense model answers right that the plan also gets right.
    """
    if plan.n_questions != dense.n_questions:
        raise ValueError(f"scores are over different question sets ({plan.n_questions} vs {dense.n_questions})")
    dense_right = [p for p, d in zip(plan.correct, dense.correct) if d]
    return {"accuracy": plan.accuracy,
            "retention": plan.accuracy / dense.accuracy if dense.accuracy else None,
            "retention_on_dense_correct": sum(dense_right) / len(dense_right) if dense_right else None,
            "questions": plan.n_questions}
