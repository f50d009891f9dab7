"""The bundled demo model and corpus: present, loadable offline, labelled, splits disjoint."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from skipprofiler import demo


def _records(split: str) -> list[dict]:
    with gzip.open(demo.corpus_path(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_corpus_splits_are_labelled_and_disjoint():
    splits = {name: _records(name) for name in demo.SPLITS}
    for name, records in splits.items():
        assert records, name
        assert {r["class"] for r in records} == set(demo.CLASSES), name
        assert all(set(r) == {"text", "class", "source"} and r["source"] == name for r in records)
        assert all(len(r["text"]) >= 200 for r in records)
        counts = {c: sum(r["class"] == c for r in records) for c in demo.CLASSES}
        assert min(counts.values()) >= 100, counts  # a few hundred calibration / held-out documents per class
    cal = {r["text"] for r in splits["calibration"]}
    held = {r["text"] for r in splits["heldout"]}
    assert not cal & held
    train_path = demo.corpus_path("calibration").with_name("train.jsonl.gz")
    if train_path.exists():  # the training split is rebuilt locally, not shipped
        with gzip.open(train_path, "rt", encoding="utf-8") as f:
            train = {json.loads(line)["text"] for line in f}
        assert not train & cal and not train & held


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="bundled splits"):
        demo.corpus_path("train-all")


def test_bundled_model_loads_offline_and_runs():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo.model_path()
    assert sum(f.stat().st_size for f in path.iterdir()) < 30e6
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers >= 12
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert len(tokenizer) == cfg.vocab_size
    batch = tokenizer(["It is a truth universally acknowledged", "def main():\n    return"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_bundled_model_is_trained():
    """Trained weights, not random: next-token loss on held-out fiction far below uniform (ln 8192 = 9.0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo.model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = next(r["text"] for r in _records("heldout") if r["class"] == "fiction")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.5  # perplexity < 245
