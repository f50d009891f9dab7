"""profile_model on every architecture, exact merging, the file format, padding, decode regime and Ctrl-C."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_statistics
from tiny_models import MODEL_TYPES, tiny_model

from skipprofiler.profile.corpus import Batch
from skipprofiler.profile import (
    METRICS,
    Profile,
    ProfileError,
    ProfileSettings,
    merge_profiles,
    profile_model,
)

SMALL = ProfileSettings(reservoir_size=64, doc_reservoir_size=8, seed=3)


def _batches(seed: int, n: int = 2, pad_id: int = 0, extra_pad: int = 0, classes=(0, 1, 0)) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.tensor([10, 7, 4])
        width = 10 + extra_pad
        ids = torch.nn.functional.pad(torch.randint(2, 90, (3, 10), generator=g), (0, extra_pad))
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        out.append(Batch(ids, mask, torch.tensor(classes), max(classes) + 1))
    return out


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_profiling_runs_on_every_architecture(model_type, tmp_path):
    model = tiny_model(model_type)
    profile = profile_model(model, _batches(0), ProfileSettings(generate=3, reservoir_size=16, doc_reservoir_size=4),
                            class_names=["a", "b"], eos_token_ids=[])
    assert profile.num_layers == 4 and profile.classes == ["a", "b"]
    assert profile.tokens("prompt") == 2 * 21 and profile.tokens("prompt", "b") == 2 * 7
    assert profile.tokens("decode") == 2 * 3 * 3
    assert profile.header["model"]["fingerprint"]["model_type"] == model_type and not profile.partial
    stats = profile.layer_stats("residual", "decode")
    assert np.all((stats["p10"] <= stats["p50"]) & (stats["p50"] <= stats["p90"]))
    assert np.all(np.abs(stats["mean"]) <= 1) and np.all(profile.layer_stats("norm_ratio")["mean"] > 0)
    assert profile.doc_len.tolist() == [4, 2] and profile.doc_features.shape == (2, 4, model.config.hidden_size
                                                                                   if hasattr(model.config,
                                                                                              "hidden_size")
                                                                                   else model.config.n_embd)
    loaded = Profile.load(profile.save(tmp_path / "p.prof"))
    assert loaded.tokens("decode") == profile.tokens("decode")


def test_merge_of_profiles_equals_profile_of_the_union():
    model = tiny_model("llama")
    part_a, part_b = _batches(1), _batches(2, n=3)
    whole = profile_model(model, part_a + part_b, SMALL, class_names=["a", "b"])
    a = profile_model(model, part_a, SMALL, class_names=["a", "b"])
    b = profile_model(model, part_b, ProfileSettings(reservoir_size=64, doc_reservoir_size=8, seed=4),
                      class_names=["a", "b"])
    merged = merge_profiles([a, b])
    assert_same_statistics(merged, whole)
    assert merged.header["merged_from"] == 2 and merged.tokens("prompt") == whole.tokens("prompt")
    # The merged sample is the top-K keys of the union of both samples.
    for c in range(2):
        keys = np.concatenate([a.reservoir_keys[0, c, :a.reservoir_len[0, c]],
                               b.reservoir_keys[0, c, :b.reservoir_len[0, c]]])
        rows = np.concatenate([a.reservoir[0, c, :a.reservoir_len[0, c]], b.reservoir[0, c, :b.reservoir_len[0, c]]])
        top = np.argsort(-keys, kind="stable")[:64]
        assert np.array_equal(merged.reservoir[0, c, :merged.reservoir_len[0, c]], rows[top])


def test_merge_matches_classes_by_name_and_rejects_other_models():
    model = tiny_model("llama")
    a = profile_model(model, _batches(1), SMALL, class_names=["x", "y"])
    b = profile_model(model, _batches(2, classes=(0, 0, 0)), SMALL, class_names=["y"])
    merged = merge_profiles([a, b])
    assert merged.classes == ["x", "y"]
    assert merged.tokens("prompt", "y") == a.tokens("prompt", "y") + b.tokens("prompt", "y")
    assert np.array_equal(merged.hist["residual"][:, :, 0], a.hist["residual"][:, :, 0])
    other = profile_model(tiny_model("llama", num_layers=3), _batches(1), SMALL, class_names=["x", "y"])
    with pytest.raises(ProfileError, match="another model"):
        merge_profiles([a, other])
    with pytest.raises(ProfileError, match="nothing to merge"):
        merge_profiles([])


def test_padding_tokens_never_count():
    model = tiny_model("qwen2")
    plain = profile_model(model, _batches(5), SMALL, class_names=["a", "b"])
    other_pad = profile_model(model, _batches(5, pad_id=77), SMALL, class_names=["a", "b"])
    wider = profile_model(model, _batches(5, pad_id=77, extra_pad=6), SMALL, class_names=["a", "b"])
    assert plain.tokens("prompt") == 42 and plain.count[0, 0].tolist() == [28, 14]
    for m in METRICS:  # what sits in the padded slots changes nothing
        assert np.array_equal(plain.hist[m], other_pad.hist[m])
    # More padding changes the matmul shapes (float rounding), never which tokens count.
    assert np.array_equal(plain.count, wider.count) and np.array_equal(plain.token_count, wider.token_count)
    assert np.allclose(plain.mean["residual"], wider.mean["residual"], atol=1e-6)


def test_stats_agree_with_the_token_sample_when_it_holds_every_token():
    model = tiny_model("gpt2")
    profile = profile_model(model, _batches(6), ProfileSettings(reservoir_size=100), class_names=["a", "b"])
    rows = profile.tokens_reservoir("prompt")
    assert rows.shape == (42, 4)
    assert np.allclose(rows.mean(0), profile.layer_stats("residual")["mean"], atol=1e-6)
    assert np.allclose(profile.tokens_reservoir("prompt", "b").mean(0),
                       profile.layer_stats("residual", cls="b")["mean"], atol=1e-6)
    assert np.allclose(profile.gain_reservoir("prompt").mean(0), profile.layer_stats("stream_gain")["mean"],
                       atol=1e-5)
    p50 = profile.quantile(0.5, "residual", "prompt", 2)
    assert p50 == pytest.approx(np.median(rows[:, 2]), abs=2e-3)
    assert profile.prob_above(p50, "residual", "prompt", 2) == pytest.approx(0.5, abs=0.05)


def test_decode_stops_rows_at_eos():
    model = tiny_model("llama")
    batches = _batches(7, n=1)
    with torch.no_grad():  # the first greedy token of row 0 (left-padded prompt = its 10 real tokens)
        first = int(model(batches[0].input_ids[:1]).logits[0, -1].argmax())
    profile = profile_model(model, batches, ProfileSettings(generate=5), class_names=["a", "b"],
                            eos_token_ids=[first])
    assert profile.tokens("decode", "a") <= 5 and profile.tokens("decode", "b") <= 5
    no_eos = profile_model(model, batches, ProfileSettings(generate=5), class_names=["a", "b"])
    assert no_eos.tokens("decode") == 15 and profile.tokens("decode") < 15


def test_ctrl_c_returns_a_partial_profile_of_what_was_seen(tmp_path):
    model = tiny_model("llama")
    seen = []

    def interrupt(progress):
        seen.append(progress.prompt_tokens)
        os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during the first batch

    profile = profile_model(model, _batches(8, n=5), SMALL, class_names=["a", "b"], on_batch=interrupt)
    assert profile.partial and seen == [21] and profile.tokens("prompt") == 21
    loaded = Profile.load(profile.save(tmp_path / "partial.prof"))
    assert loaded.header["partial"] is True and loaded.tokens("prompt") == 21


def test_file_round_trip_and_errors(tmp_path):
    profile = profile_model(tiny_model("opt"), _batches(9), SMALL, class_names=["a", "b"],
                            header={"corpus": [{"spec": "x", "sha256": "ab" * 32, "documents": np.int64(3),
                                                "files": (Path("a/b.jsonl"),), "share": np.float32(0.5),
                                                "loss": float("nan")}]})
    path = profile.save(tmp_path / "p.prof")
    loaded = Profile.load(path)
    assert_same_statistics(loaded, profile)
    assert np.array_equal(loaded.reservoir, profile.reservoir) and np.array_equal(loaded.doc_keys, profile.doc_keys)
    assert loaded.header["corpus"] == [{"spec": "x", "sha256": "ab" * 32, "documents": 3, "files": ["a/b.jsonl"],
                                        "share": 0.5, "loss": "nan"}]  # strict JSON: no NaN literal
    assert loaded.header["binning"]["residual"]["kind"] == "piecewise"
    assert {"torch", "transformers", "python"} <= set(loaded.header["versions"])
    assert os.listdir(tmp_path) == ["p.prof"]  # no temp file left behind
    with pytest.raises(ProfileError, match="profile not found"):
        Profile.load(tmp_path / "missing.prof")
    (tmp_path / "junk.prof").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ProfileError, match="not a skipprof profile"):
        Profile.load(tmp_path / "junk.prof")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ProfileError, match="without a skipprof profile header"):
        Profile.load(tmp_path / "other.safetensors")


def test_document_features_pool_every_prompt_token_but_the_first_as_the_router_does():
    """The router's centroids come from these features; the runtime pools a prompt the same way
    (skipprofiler.arch.pooling.prompt_weights): the first token, an attention sink with a huge norm in real models, is left out."""
    from skipprofiler.arch.pooling import prompt_weights

    model = tiny_model("llama")
    batches = _batches(5, n=1, classes=(0, 0, 0))
    profile = profile_model(model, batches, ProfileSettings(doc_reservoir_size=8), class_names=["a"])
    assert profile.header["router_pooling"] == "mean_after_first"
    batch = batches[0]
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True).hidden_states[profile.router_layer + 1]
    expected = []
    for row in range(3):
        n = int(batch.attention_mask[row].sum())
        expected.append(hidden[row, 1:n].mean(0).numpy())  # right-padded rows: tokens 1..n-1
    got = profile.doc_features[0, :3]
    order = [int(np.argmin([np.abs(g - e).max() for e in expected])) for g in got]  # the reservoir reorders rows
    assert sorted(order) == [0, 1, 2]
    for g, i in zip(got, order):
        np.testing.assert_allclose(g, expected[i], rtol=1e-5, atol=1e-5)
    weights = prompt_weights(torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0]]), "mean_after_first",
                             starts_sequence=True)
    assert weights.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]  # left- and right-padded rows
    chunk = torch.ones(1, 3)
    assert torch.equal(prompt_weights(chunk, "mean_after_first", starts_sequence=False), chunk)  # a later chunk
    assert torch.equal(prompt_weights(chunk, "mean", starts_sequence=True), chunk)
