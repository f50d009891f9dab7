"""Calibration corpora: `--data` specs -> streaming `datasets` -> labelled, tokenized, length-sorted batches.

A spec is ``[CLASS=]SOURCE`` where SOURCE is a local file, glob or folder (jsonl/json/txt/parquet/csv, optionally
.gz) or a hub dataset ``name[:config][@split]``. Documents are read lazily; sources are interleaved round-robin so a
token budget covers every source; batches are sorted by length inside a bounded window (little padding, flat memory).
`load_documents` reads one spec's documents the same way for eval and `--refine` (held-out data).
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

DEFAULT_CLASS = "default"
AUTO_CLASS_COLUMN = "class"
BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
            ".csv": "csv"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.:%\[\]+-]+)?$")
_LABEL = re.compile(r"^([\w.+-]+)=(.+)$")


class CorpusError(ValueError):
    """Bad corpus input; the message is one actionable line."""


def portable_path(path: str) -> str:
    """A path as provenance records it: files shipped inside this package as ``skipprofiler/...`` and files under
    the working folder relative to it, so that checked-in profiles and plans carry no machine-specific prefix."""
    text = str(path)
    try:
        resolved = Path(text).resolve()
    except (OSError, ValueError):
        return text
    package = Path(__file__).resolve().parent.parent  # the skipprofiler package folder
    for root, prefix in ((package, "skipprofiler"), (Path.cwd().resolve(), "")):
        if resolved.is_relative_to(root):
            rel = resolved.relative_to(root).as_posix()
            return f"{prefix}/{rel}" if prefix else rel
    return text

@dataclass
class DataSpec:
    """One parsed `--data` value."""

    raw: str
    label: str | None  # CLASS= prefix
    kind: str  # "files" or "hub"
    builder: str  # datasets builder (json/text/parquet/csv) or the hub dataset name
    files: list[str] = field(default_factory=list)
    config: str | None = None
    split: str = "train"


def _builder_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or any(ch in source for ch in "*?[") or "\\" in source
            or _builder_of(Path(source)) is not None)


def parse_spec(raw: str) -> DataSpec:
    """`[CLASS=]SOURCE` -> DataSpec; raises CorpusError for a missing path or an empty folder/glob."""
    label, source = None, raw
    match = _LABEL.match(raw)
    if match and "/" not in match.group(1):
        label, source = match.group(1), match.group(2)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _builder_of(p))
        if not files:
            raise CorpusError(f"no jsonl/json/txt/parquet/csv files in folder {source}")
        return _files_spec(raw, label, files)
    if path.is_file():
        return _files_spec(raw, label, [str(path)])
    if any(ch in source for ch in "*?["):
        files = sorted(f for f in _glob.glob(str(path), recursive=True) if Path(f).is_file() and _builder_of(Path(f)))
        if not files:
            raise CorpusError(f"no jsonl/json/txt/parquet/csv files match {source}")
        return _files_spec(raw, label, files)
    if _looks_like_path(source) or not _HUB_NAME.match(source):
        raise CorpusError(f"data path not found: {source}")
    name, split = (source.split("@", 1) + ["train"])[:2]
    name, config = (name.split(":", 1) + [None])[:2]
    return DataSpec(raw, label, "hub", name, config=config, split=split or "train")


def _files_spec(raw: str, label: str | None, files: list[str]) -> DataSpec:
    builders = {_builder_of(Path(f)) for f in files}
    if None in builders:
        bad = next(f for f in files if _builder_of(Path(f)) is None)
        raise CorpusError(f"unsupported data file {bad}: use .jsonl, .json, .txt, .parquet or .csv (optionally .gz)")
    if len(builders) > 1:
        raise CorpusError(f"{raw} mixes file types ({', '.join(sorted(builders))}); pass each type as its own "
                          "`data` spec")
    return DataSpec(raw, label, "files", builders.pop(), files=files)


def _open_stream(spec: DataSpec):
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.kind == "files":
            return datasets.load_dataset(spec.builder, data_files=spec.files, split="train", streaming=True)
        return datasets.load_dataset(spec.builder, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # datasets raises many types; all mean "cannot read this source"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, StopIteration) or (spec.kind == "files" and all(_blank(f) for f in spec.files)):
            raise CorpusError(f"{spec.raw} has no documents (empty file)") from None
        if spec.kind == "hub":
            raise CorpusError(f"cannot load hub dataset {spec.builder!r} (not a local path either; offline?): "
                              f"{first[:200]}") from None
        raise CorpusError(f"cannot read {spec.raw}: {first[:200]}") from None


def _blank(path: str) -> bool:
    """A data file with nothing but whitespace (small files only: a large one is not blank)."""
    try:
        return os.path.getsize(path) < 4096 and not Path(path).read_bytes().strip()
    except OSError:
        return False


@dataclass
class Batch:
    """Labelled token ids: right-padded [B, S] with a 0/1 mask; `class_ids` index the corpus's class list."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    class_ids: torch.Tensor  # [B] int64
    num_classes: int  # classes known when this batch was made (the list only grows)


@dataclass
class Document:
    """One non-empty document and its class label. A chat document read without a tokenizer keeps its `messages`
    (and an empty `text`) until `render` applies a tokenizer's chat template."""

    text: str
    cls: str
    source: int = 0  # index of the spec it came from
    messages: list | None = None

    def render(self, tokenizer: Any) -> str:
        """The text to tokenize: `text`, or `messages` rendered with the tokenizer's chat template."""
        return self.text if self.messages is None else render_chat(tokenizer, self.messages)


def render_chat(tokenizer: Any, messages: list) -> str:
    """Chat messages as text, through the tokenizer's chat template; CorpusError (one line) when that fails."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:
        raise CorpusError(f"cannot render chat messages with the tokenizer's chat template: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def pick_columns(spec: DataSpec, columns: list[str], text_column: str | None = None,
                 class_column: str | None = None) -> tuple[str, str | None, bool]:
    """(text column, class column or None, is chat) for a source with these columns. Text: `text_column`, else
    `text`, else chat `messages`; class: the spec's CLASS= label, else `class_column`, else a `class` column."""
    if not columns:
        return ("text", None, False)  # empty source: nothing will be read from it
    found = ", ".join(columns)
    if text_column is not None:
        if text_column not in columns:
            raise CorpusError(f"text column {text_column!r} not in {spec.raw} (columns found: {found})")
        text, chat = text_column, text_column == "messages"
    elif "text" in columns:
        text, chat = "text", False
    elif "messages" in columns:
        text, chat = "messages", True
    else:
        raise CorpusError(f"no text column in {spec.raw}: pass `text_column` (columns found: {found})")
    class_col = None
    if spec.label is None:
        if class_column is not None:
            if class_column not in columns:
                raise CorpusError(f"class column {class_column!r} not in {spec.raw} (columns found: {found})")
            class_col = class_column
        elif AUTO_CLASS_COLUMN in columns:
            class_col = AUTO_CLASS_COLUMN
    return text, class_col, chat


class Source:
    """One opened `--data` source: its record stream and the columns it is read by (checked when it is opened)."""

    def __init__(self, spec: DataSpec, index: int = 0, text_column: str | None = None,
                 class_column: str | None = None):
        self.spec, self.index = spec, index
        self.stream = _open_stream(spec)
        first = self._peek()
        self.columns = pick_columns(spec, list(first) if first is not None else [], text_column, class_column)

    def _peek(self) -> dict | None:
        try:
            return next(iter(self.stream))
        except StopIteration:
            return None
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CorpusError(f"cannot read {self.spec.raw}: {first[:200]}") from None

    def document(self, record: dict, tokenizer: Any = None) -> Document | None:
        """One record as a Document (None when its text is empty); chat messages are rendered with the tokenizer's
        chat template, or kept for `Document.render` when no tokenizer is given."""
        text_col, class_col, chat = self.columns
        value = record.get(text_col)
        label = self.spec.label or (str(record.get(class_col)) if class_col and record.get(class_col) is not None
                                    else DEFAULT_CLASS)
        if chat and isinstance(value, list):
            if not value:
                return None  # an empty conversation is an empty document
            if tokenizer is None:
                return Document("", label, self.index, messages=value)
            text = render_chat(tokenizer, value)
        else:
            text = value if isinstance(value, str) else ("" if value is None else str(value))
        return Document(text, label, self.index) if text.strip() else None


def load_documents(spec: str, tokenizer: Any = None, *, text_column: str | None = None,
                   class_column: str | None = None) -> list[Document]:
    """Every non-empty document of one `--data` spec, in order, read as `Corpus` (`skipprof profile`) reads a source:
    the same text / class columns, labels and chat-template rendering (deferred to `Document.render` when no
    tokenizer is given)."""
    source = Source(parse_spec(spec), 0, text_column, class_column)
    return [doc for record in source.stream if (doc := source.document(record, tokenizer)) is not None]


def _interleave_classes(documents: Iterator[Document], lookahead: int) -> Iterator[Document]:
    """Yield one document per class in turn, reading at most `lookahead` documents ahead.

    Files are often grouped by class; without this a token budget would be spent on the first class only.
    """
    from collections import deque

    queues: dict[str, deque[Document]] = {}
    buffered = 0
    exhausted = False
    while True:
        while not exhausted and buffered < lookahead:
            doc = next(documents, None)
            if doc is None:
                exhausted = True
                break
            queues.setdefault(doc.cls, deque()).append(doc)
            buffered += 1
        if buffered == 0:
            return
        for queue in queues.values():
            if queue:
                buffered -= 1
                yield queue.popleft()


@dataclass
class _Sequence:
    ids: list[int]
    class_id: int


class Corpus:
    """Streams documents from specs and turns them into batches within a token budget.

    After iteration, `classes`, `tokens`, `documents` and `provenance()` describe what was used.
    """

    def __init__(self, specs: list[str], tokenizer: Any, *, text_column: str | None = None,
                 class_column: str | None = None, max_tokens: int = 200_000, seq_len: int = 256,
                 batch_size: int = 8, sort_window: int | None = None, class_lookahead: int = 2048):
        if seq_len <= 0:
            raise CorpusError(f"ProfileSettings.seq_len must be a positive number of tokens, got {seq_len}")
        if batch_size <= 0:
            raise CorpusError(f"ProfileSettings.batch_size must be positive, got {batch_size}")
        if max_tokens <= 0:
            raise CorpusError(f"ProfileSettings.max_tokens must be positive, got {max_tokens}")
        if not specs:
            raise CorpusError("no data specs given")
        self.specs = [parse_spec(s) for s in specs]
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.class_column = class_column
        self.max_tokens = max_tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.sort_window = sort_window or batch_size * 16
        self.class_lookahead = class_lookahead
        self.classes: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._hashes = [hashlib.sha256() for _ in self.specs]
        self._spec_docs = [0] * len(self.specs)
        self._spec_tokens = [0] * len(self.specs)
        self._sources: list[Source] | None = None

    # ------------------------------------------------------------------ checks
    def open(self) -> "Corpus":
        """Open every source and check its columns (fails fast, before any profiling)."""
        if self._sources is None:
            self._sources = [Source(spec, i, self.text_column, self.class_column) for i, spec in enumerate(self.specs)]
        return self

    # ------------------------------------------------------------------ reading
    def iter_documents(self) -> Iterator[Document]:
        """Non-empty documents, round-robin over classes (bounded look-ahead) and over sources."""
        return _interleave_classes(self._source_documents(), self.class_lookahead)

    def _source_documents(self) -> Iterator[Document]:
        self.open()
        iterators = [iter(s.stream) for s in self._sources]
        active = list(range(len(iterators)))
        while active:
            for index in list(active):
                try:
                    record = next(iterators[index])
                except StopIteration:
                    active.remove(index)
                    continue
                doc = self._sources[index].document(record, self.tokenizer)
                if doc is not None:
                    yield doc

    def _class_id(self, name: str) -> int:
        if name not in self.classes:
            self.classes.append(name)
        return self.classes.index(name)

    def _tokenize(self, docs: list[Document]) -> list[_Sequence]:
        encoded = self.tokenizer([d.text for d in docs], add_special_tokens=True, truncation=True,
                                 max_length=self.seq_len)["input_ids"]
        out = []
        for doc, ids in zip(docs, encoded):
            budget = self.max_tokens - self.tokens
            if budget <= 0:
                break
            ids = list(ids)[:budget]
            if not ids:
                continue
            self.tokens += len(ids)
            self.documents += 1
            self._hashes[doc.source].update(doc.text.encode("utf-8") + b"\0")
            self._spec_docs[doc.source] += 1
            self._spec_tokens[doc.source] += len(ids)
            out.append(_Sequence(ids, self._class_id(doc.cls)))
        return out

    def _windows(self) -> Iterator[list[_Sequence]]:
        window: list[Document] = []
        for doc in self.iter_documents():
            window.append(doc)
            if len(window) >= self.sort_window:
                yield self._tokenize(window)
                window = []
                if self.tokens >= self.max_tokens:
                    return
        if window:
            yield self._tokenize(window)

    def batches(self) -> Iterator[Batch]:
        """Right-padded batches, longest first inside each window; raises CorpusError if nothing is left."""
        pad = self.pad_token_id
        for window in self._windows():
            window.sort(key=lambda s: -len(s.ids))
            for start in range(0, len(window), self.batch_size):
                yield self._collate(window[start:start + self.batch_size], pad)
        if self.tokens == 0:
            raise CorpusError("the corpus is empty after filtering: no non-empty text in "
                              + ", ".join(s.raw for s in self.specs))

    def _collate(self, seqs: list[_Sequence], pad: int) -> Batch:
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
            mask[row, :len(seq.ids)] = 1
        return Batch(ids, mask, torch.tensor([s.class_id for s in seqs], dtype=torch.long), len(self.classes))

    @property
    def pad_token_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        return 0

    # ------------------------------------------------------------------ provenance
    def provenance(self) -> list[dict[str, Any]]:
        """One entry per spec: what was asked, what was read, and a sha256 over the texts used."""
        out = []
        for i, spec in enumerate(self.specs):
            raw = portable_path(spec.raw) if spec.kind == "files" else spec.raw
            entry: dict[str, Any] = {"spec": raw, "kind": spec.kind, "label": spec.label,
                                     "documents": self._spec_docs[i], "tokens": self._spec_tokens[i],
                                     "sha256": self._hashes[i].hexdigest()}
            if spec.kind == "files":
                files = [portable_path(f) for f in spec.files]
                entry["files"] = files if len(files) <= 20 else files[:20] + ["..."]
            else:
                entry.update(name=spec.builder, config=spec.config, split=spec.split)
            if self._sources:
                entry["text_column"], entry["class_column"] = self._sources[i].columns[:2]
            out.append(entry)
        return out

    def settings(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "sort_window": self.sort_window}
