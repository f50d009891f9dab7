"""--data specs, streaming readers, columns, labels, budget and length-sorted batching."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest
from helpers import word_tokenizer, words, write_jsonl

from skipprofiler.profile.corpus import Corpus, CorpusError, parse_spec


def _corpus(specs, **kw) -> Corpus:
    kw.setdefault("max_tokens", 10_000)
    kw.setdefault("seq_len", 64)
    kw.setdefault("batch_size", 4)
    return Corpus([str(s) for s in specs], word_tokenizer(chat=kw.pop("chat", False)), **kw)


def _all_batches(corpus: Corpus):
    return list(corpus.batches())


def test_spec_parsing(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "w5"}])
    assert parse_spec(f"fiction={f}").label == "fiction" and parse_spec(str(f)).builder == "json"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("w5 w6\n")
    (tmp_path / "sub" / "y.txt.gz").write_bytes(gzip.compress(b"w7\n"))
    folder = parse_spec(str(tmp_path / "sub"))
    assert folder.builder == "text" and len(folder.files) == 2
    assert len(parse_spec(str(tmp_path / "sub" / "*.txt*")).files) == 2
    hub = parse_spec("code=org/name:cfg@validation")
    assert (hub.kind, hub.builder, hub.config, hub.split, hub.label) == ("hub", "org/name", "cfg", "validation",
                                                                         "code")
    for bad, message in ((tmp_path / "missing.jsonl", "data path not found"),
                         (tmp_path / "nothing*.jsonl", "no jsonl/json/txt/parquet/csv files match"),
                         (tmp_path / "empty_dir", "no jsonl/json/txt/parquet/csv files in folder")):
        if "empty_dir" in str(bad):
            bad.mkdir()
        with pytest.raises(CorpusError, match=message):
            parse_spec(str(bad))


def test_labels_from_column_prefix_or_default(tmp_path):
    labelled = write_jsonl(tmp_path / "l.jsonl.gz", [{"text": words(5, i), "class": "ab"[i % 2]} for i in range(6)])
    plain = tmp_path / "p.txt"
    plain.write_text("\n".join(words(3, i) for i in range(4)) + "\n\n")
    corpus = _corpus([labelled, plain, f"named={plain}"])
    batches = _all_batches(corpus)
    assert sorted(corpus.classes) == ["a", "b", "default", "named"]
    counts = {name: 0 for name in corpus.classes}
    for batch in batches:
        for c, n in zip(batch.class_ids.tolist(), batch.attention_mask.sum(1).tolist()):
            counts[corpus.classes[c]] += n
    assert counts == {"a": 15, "b": 15, "default": 12, "named": 12}
    assert corpus.tokens == 54 and corpus.documents == 14


def test_budget_truncation_and_length_sorted_batches(tmp_path):
    records = [{"text": words(n)} for n in (3, 40, 7, 100, 12, 25, 5, 60)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    corpus = _corpus([data], seq_len=32, max_tokens=10_000, batch_size=3)
    batches = _all_batches(corpus)
    lengths = [b.attention_mask.sum(1).tolist() for b in batches]
    flat = [n for row in lengths for n in row]
    assert max(flat) == 32 and corpus.tokens == sum(min(n, 32) for n in (3, 40, 7, 100, 12, 25, 5, 60))
    assert flat == sorted(flat, reverse=True)  # one window: longest first, so padding stays small
    for batch, row in zip(batches, lengths):
        assert batch.input_ids.shape[1] == max(row)
    small = _corpus([data], seq_len=32, max_tokens=50, batch_size=3)
    _all_batches(small)
    assert small.tokens == 50


def test_classes_are_interleaved_when_the_file_is_grouped(tmp_path):
    records = [{"text": words(10, i), "class": "first"} for i in range(20)]
    records += [{"text": words(10, i), "class": "second"} for i in range(20)]
    corpus = _corpus([write_jsonl(tmp_path / "g.jsonl", records)], max_tokens=100)
    _all_batches(corpus)
    assert corpus.classes == ["first", "second"]
    assert [p["documents"] for p in corpus.provenance()] == [10]
    per_class = {c: 0 for c in corpus.classes}
    for batch in _corpus([write_jsonl(tmp_path / "g2.jsonl", records)], max_tokens=100).batches():
        for c in batch.class_ids.tolist():
            per_class[["first", "second"][c]] += 1
    assert per_class == {"first": 5, "second": 5}


def test_csv_parquet_and_chat_messages(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "topic"])
        writer.writerows([[words(4), "x"], [words(6), "y"]])
    corpus = _corpus([tmp_path / "d.csv"], text_column="body", class_column="topic")
    _all_batches(corpus)
    assert corpus.classes == ["x", "y"] and corpus.tokens == 10

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [words(3), words(5)]}), tmp_path / "d.parquet")
    corpus = _corpus([tmp_path / "d.parquet"])
    _all_batches(corpus)
    assert corpus.tokens == 8 and corpus.classes == ["default"]

    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w10 w11"},
                                                                {"role": "assistant", "content": "w12"}]}])
    corpus = _corpus([chats], chat=True)
    batch = _all_batches(corpus)[0]
    assert batch.input_ids[0].tolist() == [2, 10, 11, 3, 2, 12, 3]  # rendered with the chat template


def test_column_errors_list_what_was_found(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": "w5", "label": "x"}])
    with pytest.raises(CorpusError, match=r"no text column in .*columns found: body, label"):
        _corpus([data]).open()
    with pytest.raises(CorpusError, match=r"text column 'content' not in .*columns found: body, label"):
        _corpus([data], text_column="content").open()
    with pytest.raises(CorpusError, match=r"class column 'topic' not in .*columns found: body, label"):
        _corpus([data], text_column="body", class_column="topic").open()
    _corpus([f"x={data}"], text_column="body", class_column="topic").open()  # a CLASS= label needs no column


def test_empty_corpus_and_bad_sizes(tmp_path):
    data = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(CorpusError, match="empty after filtering"):
        _all_batches(_corpus([data]))
    for kw, message in (({"seq_len": 0}, "ProfileSettings.seq_len must be"),
                        ({"batch_size": -1}, "ProfileSettings.batch_size must be"),
                        ({"max_tokens": 0}, "ProfileSettings.max_tokens must be")):
        with pytest.raises(CorpusError, match=message):
            _corpus([data], **kw)


def test_content_hash_covers_the_texts_used(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": words(5, i)} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": words(5, i + 1)} for i in range(3)])
    hashes = []
    for path in (a, a, b):
        corpus = _corpus([path])
        _all_batches(corpus)
        hashes.append(corpus.provenance()[0]["sha256"])
    assert hashes[0] == hashes[1] != hashes[2] and len(hashes[0]) == 64


def test_hub_name_fails_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match="cannot load hub dataset 'no-such-org/no-such-set'") as info:
        _corpus(["no-such-org/no-such-set"]).open()
    assert "\n" not in str(info.value)


def test_provenance_paths_carry_no_machine_prefix(tmp_path, monkeypatch):
    from skipprofiler import demo
    from skipprofiler.profile.corpus import portable_path

    assert portable_path(str(demo.corpus_path("calibration"))) == "skipprofiler/demo/corpus/calibration.jsonl.gz"
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "data" / "a.jsonl")) == "data/a.jsonl"
    outside = str(Path("/") / "srv" / "corpus.jsonl")
    assert portable_path(outside) == outside  # elsewhere: kept as given


def test_load_documents_reads_a_spec_as_the_corpus_does(tmp_path):
    from skipprofiler.profile.corpus import load_documents

    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "w10 w11"}], "topic": "qa"},
        {"messages": [], "topic": "qa"},  # empty: dropped, as the corpus drops it
        {"messages": [{"role": "user", "content": "w12"}], "topic": "help"}])
    tok = word_tokenizer(chat=True)
    docs = load_documents(str(chats), tok, class_column="topic")
    assert [(d.text, d.cls) for d in docs] == [("w2 w10 w11 w3 ", "qa"), ("w2 w12 w3 ", "help")]
    corpus = _corpus([chats], chat=True, class_column="topic")
    assert [(d.text, d.cls) for d in corpus.iter_documents()] == [(d.text, d.cls) for d in docs]
    later = load_documents(f"x={chats}")  # no tokenizer: the messages are rendered when tokenized
    assert [d.cls for d in later] == ["x", "x"] and [d.render(tok) for d in later] == [d.text for d in docs]
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": "w5 w6", "class": "a"}, {"body": " ", "class": "b"}])
    assert [(d.text, d.cls) for d in load_documents(str(body), text_column="body")] == [("w5 w6", "a")]
    with pytest.raises(CorpusError, match=r"no text column in .*columns found: body, class"):
        load_documents(str(body))
