"""`skipprof profile` and `skipprof inspect`: the table, --json, one-line errors that write nothing, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import run, word_tokenizer, words, write_jsonl
from tiny_models import tiny_model

from skipprofiler.profile import Profile


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama", num_layers=3)
    model.save_pretrained(root / "m")
    word_tokenizer().save_pretrained(root / "m")
    write_jsonl(root / "data.jsonl.gz", [{"text": words(12 + i, i), "class": "ab"[i % 2], "meta": 1}
                                         for i in range(10)])
    return root


def test_profile_writes_a_profile_and_prints_the_table(workspace, tmp_path, capsys):
    out = tmp_path / "t.prof"
    code, stdout, err = run(["profile", workspace / "m", "--data", workspace / "data.jsonl.gz", "--out", out,
                             "--generate", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    profile = Profile.load(out)
    assert profile.classes == ["a", "b"] and profile.tokens("prompt") == sum(12 + i for i in range(10))
    assert profile.tokens("decode") == 30
    assert profile.header["corpus"][0]["documents"] == 10 and len(profile.header["corpus"][0]["sha256"]) == 64
    assert set(profile.header["corpus_settings"]) == {"max_tokens", "seq_len", "batch_size", "sort_window"}
    assert profile.header["model"]["path"] == str(workspace / "m")
    assert "residual cos(h, h + FFN) per layer, decode tokens" in stdout and f"wrote {out}" in stdout
    for name in ("all", "a", "b", "p10", "p50", "p90"):
        assert name in stdout
    code, inspected, _ = run(["inspect", out], capsys)
    assert code == 0 and inspected.split("\n", 1)[1] in stdout  # same table (the first line names the model)


def test_json_summaries_of_profile_and_inspect_agree(workspace, tmp_path, capsys):
    out = tmp_path / "j.prof"
    code, stdout, err = run(["profile", workspace / "m", "--data", f"only={workspace / 'data.jsonl.gz'}", "--out",
                             out, "--json", "--device", "cpu", "--max-tokens", "50"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["tokens"]["prompt"] == 50 and summary["classes"] == ["only"] and summary["regime"] == "prompt"
    rows = summary["layers"]["all"]
    assert [r["layer"] for r in rows] == [0, 1, 2] and all(r["p10"] <= r["p50"] <= r["p90"] for r in rows)
    code, inspected, _ = run(["inspect", out, "--json"], capsys)
    assert json.loads(inspected)["layers"] == summary["layers"]


def _bad_inputs(root: Path, tmp: Path) -> list[tuple[list, str]]:
    from transformers import DistilBertConfig, XGLMConfig, XGLMForCausalLM

    DistilBertConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, hidden_dim=48).save_pretrained(tmp / "bert")
    XGLMForCausalLM(XGLMConfig(vocab_size=96, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4)
                    ).save_pretrained(tmp / "xglm")
    empty = write_jsonl(tmp / "empty.jsonl", [{"text": ""}, {"text": " "}])
    no_text = write_jsonl(tmp / "notext.jsonl", [{"body": "w5", "topic": "x"}])
    data = root / "data.jsonl.gz"
    m = root / "m"
    return [
        ([tmp / "nope"], "model path not found"),
        ([tmp / "bert"], "is not a causal LM"),
        ([tmp / "xglm"], "unknown architecture 'xglm'"),
        ([m, "--data", tmp / "missing.jsonl"], "data path not found"),
        ([m, "--data", empty], "empty after filtering"),
        ([m, "--data", no_text], "pass --text-column (columns found: body, topic)"),
        ([m, "--data", no_text, "--text-column", "content"], "columns found: body, topic"),
        ([m, "--data", data, "--class-column", "topic"], "class column 'topic' not in"),
        ([m, "--data", data, "--seq-len", "0"], "--seq-len must be > 0"),
        ([m, "--data", data, "--dtype", "float8"], "unknown --dtype"),
        ([m, "--data", data, "--out", tmp / "no" / "dir" / "p.prof"], "does not exist"),
    ]


@pytest.mark.slow  # loads a model per case
def test_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, capsys):
    out = tmp_path / "never.prof"
    cases = _bad_inputs(workspace, tmp_path)
    capsys.readouterr()  # what saving the cases' models printed (transformers' progress bars) is not the CLI's
    for args, expected in cases:
        argv = ["profile", *args] + ([] if "--out" in args else ["--out", out]) + ["--device", "cpu"]
        code, stdout, err = run(argv, capsys)
        assert code != 0 and expected in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".prof", ".tmp")]


@pytest.mark.parametrize("args, expected", [
    (["--shard", "a/b"], "error: --shard 'a/b' is not I/N (e.g. 0/8 for the first of 8 jobs)"),
    (["--shard", "3/2"], "error: --shard 3/2: I must be in 0..N-1 and N >= 1"),
    (["--device-map", "{not json"], "error: --device-map is not valid JSON"),
    (["--device-map", "everywhere"], "error: --device-map 'everywhere' is none of auto, balanced"),
])
def test_shard_and_device_map_errors_name_the_options(tmp_path, capsys, args, expected):
    """The library names the setting (`ProfileSettings.shard`, `device_map`); the CLI prints the option."""
    code, _, err = run(["profile", *args, "--out", tmp_path / "p.prof"], capsys)
    assert code == 2 and err.startswith(expected), err
    assert "ProfileSettings" not in err and "`" not in err


def test_inspect_errors(tmp_path, capsys):
    code, _, err = run(["inspect", tmp_path / "none.prof"], capsys)
    assert code == 2 and "profile not found" in err
    (tmp_path / "bad.prof").write_bytes(b"junk")
    code, _, err = run(["inspect", tmp_path / "bad.prof"], capsys)
    assert code == 2 and "cannot read profile" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_writes_a_partial_profile(workspace, tmp_path, capsys, monkeypatch):
    from skipprofiler.profile import corpus as corpus_module

    real_batches = corpus_module.Corpus.batches

    def batches_then_ctrl_c(self):
        for i, batch in enumerate(real_batches(self)):
            yield batch
            if i == 0:
                os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the first batch runs

    monkeypatch.setattr(corpus_module.Corpus, "batches", batches_then_ctrl_c)
    out = tmp_path / "partial.prof"
    code, _, err = run(["profile", workspace / "m", "--data", workspace / "data.jsonl.gz", "--out", out,
                        "--batch-size", "2", "--device", "cpu"], capsys)
    assert code == 130 and "partial profile" in err and len(err.strip().splitlines()) == 1
    profile = Profile.load(out)
    assert profile.partial and 0 < profile.tokens("prompt") < sum(12 + i for i in range(10))


@pytest.mark.slow
def test_no_model_or_data_profiles_the_demo_model_on_its_calibration_split(tmp_path, capsys, monkeypatch):
    """The defaults: the bundled model, its calibration split (labels from its class column), ./profile.prof."""
    from skipprofiler import demo
    from skipprofiler.profile.corpus import portable_path

    try:
        demo.model_path()
    except FileNotFoundError:
        pytest.skip("the demo model is not built yet")
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(["profile", "--max-tokens", "2000"], capsys)
    assert code == 0, err
    profile = Profile.load(tmp_path / "profile.prof")
    assert profile.num_layers == 12 and set(profile.classes) == set(demo.CLASSES)
    assert profile.tokens("prompt") == 2000 and all(profile.tokens("prompt", c) > 0 for c in demo.CLASSES)
    assert profile.header["model"]["name"] == "skipprofiler-demo"
    assert profile.header["model"]["path"] == str(demo.model_path())
    assert [entry["spec"] for entry in profile.header["corpus"]] == [portable_path(demo.data_spec("calibration"))]
    assert "residual cos(h, h + FFN) per layer" in stdout and "fiction" in stdout
