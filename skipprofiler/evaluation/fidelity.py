"""Fidelity primitives: teacher-forced KL / perplexity / top-1 agreement and greedy-continuation agreement.

Teacher-forced protocol (the one eval and `--refine` share): every document is cut to a window of tokens; the first
`prompt_len` tokens are the prompt (run densely, as in generation), the rest are decode positions. Logits at a decode
position p predict token p + 1, so the measured positions are `prompt_len <= p <= len - 2`. The dense log-probs are
computed once per batch (`DenseReference`) and reused for every plan compared against them.

Plans are measured as deployment runs them: `measure_plan` applies one with `apply_plan` + `handle.decode_from`, and
greedy continuations come from `greedy.greedy_decode` under whatever plan the caller applied. Held-out documents are
read by `corpus.load_documents`, exactly as `skipprof profile` reads its corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..profile.corpus import Document
from ..arch.greedy import greedy_decode, logits_of


class FidelityError(ValueError):
    """A fidelity measurement is impossible or meaningless (no decode positions, non-finite logits)."""


@dataclass
class TokenBatch:
    """Right-padded token windows of one class-mixed batch, with the shared prompt length."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    prompt_len: int
    classes: list[str]  # one label per row

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)

    def measured_mask(self) -> torch.Tensor:
        """[B, T] bool: decode positions whose next token is real (the positions KL/ppl/top-1 are measured on)."""
        batch, width = self.input_ids.shape
        pos = torch.arange(width).unsqueeze(0).expand(batch, width)
        return (pos >= self.prompt_len) & (pos <= self.lengths.unsqueeze(1) - 2)


def make_batches(token_lists: Sequence[Sequence[int]], classes: Sequence[str], prompt_len: int, pad_id: int,
                 batch_size: int) -> list[TokenBatch]:
    """Group documents (already tokenized and cut) into right-padded batches, longest first to limit padding."""
    if prompt_len < 1:
        raise FidelityError(f"prompt_len must be >= 1, got {prompt_len}")
    keep = [(list(t), c) for t, c in zip(token_lists, classes) if len(t) >= prompt_len + 2]
    if not keep:
        raise FidelityError(f"no document has at least prompt_len + 2 = {prompt_len + 2} tokens")
    keep.sort(key=lambda tc: -len(tc[0]))
    batches = []
    for start in range(0, len(keep), batch_size):
        chunk = keep[start:start + batch_size]
        width = len(chunk[0][0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (toks, _) in enumerate(chunk):
            ids[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, :len(toks)] = 1
        batches.append(TokenBatch(ids, mask, prompt_len, [c for _, c in chunk]))
    return batches


@dataclass
class DenseReference:
    """The dense model's log-probs on one batch's measured positions (computed once, reused for every plan)."""

    batch: TokenBatch
    mask: torch.Tensor  # [B, T] bool, measured positions
    log_probs: torch.Tensor  # [N, V] float32, rows in mask order
    targets: torch.Tensor  # [N] long, the next tokens
    row_class: list[str]  # [N] class of each measured position


def dense_reference(forward: Callable[[TokenBatch], torch.Tensor], batch: TokenBatch) -> DenseReference:
    """Run `forward(batch) -> logits [B, T, V]` densely once and keep the log-probs at the measured positions."""
    mask = batch.measured_mask()
    if not bool(mask.any()):
        raise FidelityError("the batch has no decode positions to measure (documents shorter than prompt_len + 2)")
    with torch.inference_mode():
        logits = forward(batch)
    log_probs = _masked_log_probs(logits, mask, "the dense model")
    targets = batch.input_ids[:, 1:][mask[:, :-1]] if mask.shape[1] > 1 else batch.input_ids.new_zeros(0)
    rows = mask.nonzero()[:, 0].tolist()
    return DenseReference(batch, mask, log_probs, targets, [batch.classes[r] for r in rows])


def _masked_log_probs(logits: torch.Tensor, mask: torch.Tensor, who: str) -> torch.Tensor:
    picked = logits[mask].float()
    if not bool(torch.isfinite(picked).all()):
        raise FidelityError(f"{who} produced non-finite logits (NaN/inf) on decode positions")
    return F.log_softmax(picked, dim=-1)


@dataclass
class FidelitySums:
    """Additive per-class sums, so batches and runs merge exactly; `summary()` turns them into metrics."""

    count: dict[str, int] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    nll_plan: dict[str, float] = field(default_factory=dict)
    nll_dense: dict[str, float] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)

    def add(self, cls: str, count: int, kl: float, nll_plan: float, nll_dense: float, top1: float) -> None:
        for store, value in ((self.count, count), (self.kl, kl), (self.nll_plan, nll_plan),
                             (self.nll_dense, nll_dense), (self.top1, top1)):
            store[cls] = store.get(cls, 0) + value

    def merge(self, other: "FidelitySums") -> None:
        for cls in other.count:
            self.add(cls, other.count[cls], other.kl[cls], other.nll_plan[cls], other.nll_dense[cls], other.top1[cls])

    def total_kl_mean(self) -> float:
        n = sum(self.count.values())
        return sum(self.kl.values()) / n if n else math.nan

    def summary(self, cls: str | None = None) -> dict[str, float]:
        """Metrics for one class (None: all positions pooled)."""
        keys = list(self.count) if cls is None else [cls]
        n = sum(self.count.get(k, 0) for k in keys)
        if n == 0:
            raise FidelityError(f"no measured positions for class {cls!r}")
        mean = lambda store: sum(store.get(k, 0.0) for k in keys) / n  # noqa: E731
        out = {"tokens": n, "kl_mean": mean(self.kl), "ppl": math.exp(mean(self.nll_plan)),
               "ppl_dense": math.exp(mean(self.nll_dense)), "top1_agreement": mean(self.top1)}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise FidelityError(f"non-finite {', '.join(bad)} for class {cls or 'overall'}")
        return out


def compare(reference: DenseReference, plan_logits: torch.Tensor, sums: FidelitySums | None = None) -> FidelitySums:
    """Accumulate KL(dense || plan), both NLLs and top-1 agreement on the reference's measured positions."""
    sums = sums if sums is not None else FidelitySums()
    plan_lp = _masked_log_probs(plan_logits, reference.mask, "the plan")
    dense_lp = reference.log_probs
    kl = (dense_lp.exp() * (dense_lp - plan_lp)).sum(-1).clamp_min(0.0)  # clamp: rounding can give -1e-9
    nll_plan = -plan_lp.gather(1, reference.targets[:, None]).squeeze(1)
    nll_dense = -dense_lp.gather(1, reference.targets[:, None]).squeeze(1)
    top1 = (plan_lp.argmax(-1) == dense_lp.argmax(-1)).float()
    for cls in dict.fromkeys(reference.row_class):
        sel = torch.tensor([c == cls for c in reference.row_class])
        sums.add(cls, int(sel.sum()), float(kl[sel].double().sum()), float(nll_plan[sel].double().sum()),
                 float(nll_dense[sel].double().sum()), float(top1[sel].double().sum()))
    return sums


# ---------------------------------------------------------------------------------------------------------------
# Generation fidelity


@dataclass
class GreedyComparison:
    """Greedy continuations with and without a plan, compared token by token."""

    agreement: float  # share of generated positions where both runs produced the same token
    first_divergence_mean: float  # mean index of the first differing token (= n_new when none differs)
    identical: float  # share of prompts whose whole continuation is identical
    per_prompt_first_divergence: list[int]


def greedy_tokens(model, prompts: Sequence[Sequence[int]], n_new: int) -> list[list[int]]:
    """Greedy continuation of each prompt (batch size 1, KV cache, no EOS stop so lengths are comparable)."""
    device = next(model.parameters()).device
    return [greedy_decode(model, torch.tensor([list(prompt)], dtype=torch.long, device=device), n_new)[0].tolist()
            for prompt in prompts]


def compare_greedy(dense: Iterable[Sequence[int]], plan: Iterable[Sequence[int]]) -> GreedyComparison:
    firsts, same, total, identical = [], 0, 0, 0
    for a, b in zip(dense, plan):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        firsts.append(first)
        same += sum(int(a[i] == b[i]) for i in range(n))
        total += n
        identical += int(first == n)
    if total == 0:
        raise FidelityError("no generated tokens to compare")
    return GreedyComparison(same / total, sum(firsts) / len(firsts), identical / len(firsts), firsts)


# ---------------------------------------------------------------------------------------------------------------
# Documents -> token windows -> dense references, and measuring a plan on them


def load_documents(spec: str | None, split: str = "heldout", *, text_column: str | None = None,
                   class_column: str | None = None) -> list[Document]:
    """Documents of a `--data` spec, read exactly as `skipprof profile` reads them (`corpus.load_documents`): a file,
    folder or glob (jsonl/json/txt/parquet/csv, gz ok) or a hub name, with an optional `CLASS=` prefix; None: the
    bundled demo split. Text: `text_column`, else `text`, else chat `messages` (rendered by `token_windows`);
    labels: the prefix, else `class_column`, else a `class` column, else `default`.
    """
    from ..profile.corpus import CorpusError, load_documents as read_documents

    if spec is None:
        from .. import demo

        spec = str(demo.corpus_path(split))
    try:
        docs = read_documents(spec, text_column=text_column, class_column=class_column)
    except CorpusError as e:
        raise FidelityError(str(e)) from None
    if not docs:
        raise FidelityError(f"no non-empty documents in {spec}")
    return docs


def token_windows(tokenizer, docs: Sequence[Document], window: int, per_class: int | None,
                  min_len: int) -> tuple[list[list[int]], list[str]]:
    """Tokenize and cut each document to `window` tokens; keep the first `per_class` long-enough ones per class."""
    kept: dict[str, int] = {}
    tokens, classes = [], []
    for doc in docs:
        if per_class is not None and kept.get(doc.cls, 0) >= per_class:
            continue
        ids = tokenizer(doc.render(tokenizer), add_special_tokens=False, truncation=True,
                        max_length=window)["input_ids"]
        if len(ids) < min_len:
            continue
        kept[doc.cls] = kept.get(doc.cls, 0) + 1
        tokens.append(ids)
        classes.append(doc.cls)
    if not tokens:
        raise FidelityError(f"no document has at least {min_len} tokens")
    return tokens, classes


def pad_id_of(tokenizer, model=None) -> int:
    """The id right- and left-padded batches are filled with (every padded position is masked): the tokenizer's pad
    token, else the model config's, else the tokenizer's end-of-sequence token, else the generation config's pad
    token, else 0. The one pad rule of eval, `--refine`, linear substitutes, QA answers and the lm-eval model."""
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                 getattr(tokenizer, "eos_token_id", None), getattr(generation, "pad_token_id", None)):
        if isinstance(cand, int):
            return cand
    return 0


@dataclass
class Windows:
    """Documents of a data spec as token windows (in document order) and their right-padded batches."""

    tokens: list[list[int]]
    classes: list[str]  # one label per window
    pad_id: int
    batches: list[TokenBatch]


def prepare_windows(model, tokenizer, data_spec: str | None, *, split: str, window: int, min_len: int, prompt_len: int,
                    batch_size: int, per_class: int | None, text_column: str | None = None,
                    class_column: str | None = None, select: Callable[[list[Document]], list[Document]] | None = None,
                    by_class: bool = True) -> Windows:
    """Documents -> token windows -> batches, the one data path of eval (held-out windows), `--refine` (calibration
    references) and linear substitutes (calibration statistics).

    Documents are read by `load_documents` (None: the bundled demo split), narrowed by `select` when given, cut to
    `window` tokens keeping the first `per_class` of at least `min_len` tokens per class (`token_windows`), then
    batched by `make_batches`: per class in order of first appearance when `by_class`, else all classes mixed.
    """
    docs = load_documents(data_spec, split=split, text_column=text_column, class_column=class_column)
    if select is not None:
        docs = select(docs)
    tokens, classes = token_windows(tokenizer, docs, window, per_class, min_len)
    pad = pad_id_of(tokenizer, model)
    if not by_class:
        return Windows(tokens, classes, pad, make_batches(tokens, classes, prompt_len, pad, batch_size))
    batches = []
    for cls in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == cls]
        batches += make_batches([tokens[i] for i in idx], [cls] * len(idx), prompt_len, pad, batch_size)
    return Windows(tokens, classes, pad, batches)


def model_forward(model) -> Callable[[TokenBatch], torch.Tensor]:
    """Cache-less full-sequence forward returning logits (what both the dense and the plan arm run)."""
    device = next(model.parameters()).device

    def forward(batch: TokenBatch) -> torch.Tensor:
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False)
        return logits_of(out).cpu()

    return forward


def dense_references(model, batches: Sequence[TokenBatch]) -> list[DenseReference]:
    forward = model_forward(model)
    return [dense_reference(forward, b) for b in batches]


def measure_plan(model, references: Sequence[DenseReference], plan, prompt_class: str | None = None,
                 strict: bool = True, batch_decision: str | None = None) -> tuple[FidelitySums, dict]:
    """Teacher-forced fidelity of `plan` applied with the runtime exactly as in generation.

    The prompt prefix runs densely and positions >= prompt_len are decode positions (`handle.decode_from`), so
    warm-up, dense-every, fractional layers and the adaptive trigger behave as they do when generating.
    With ``batch_decision="shared"`` (or a plan saying so) the rows of each batch decide together, position by
    position, as rows decoding in one batch would. Returns the per-class sums and the runtime's realized-skip statistics.
    """
    from ..runtime import apply_plan

    forward = model_forward(model)
    sums = FidelitySums()
    routed: list[str | None] = []
    with apply_plan(model, plan, prompt_class=prompt_class, strict=strict, batch_decision=batch_decision) as handle:
        handle.reset_stats()
        with torch.inference_mode():
            for ref in references:
                with handle.decode_from(ref.batch.prompt_len):
                    logits = forward(ref.batch)
                compare(ref, logits, sums)
                if prompt_class == "auto":
                    routed += handle.chosen_classes or []
        stats = dict(handle.stats())
    if prompt_class == "auto":
        stats["routed_classes"] = routed  # the router's class per row (document window), in order
    return sums, stats
