"""`skipprof merge`: two halves merge to the profile of the whole; mismatched or duplicate inputs are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_statistics, run
from tiny_models import tiny_model

from skipprofiler.profile.corpus import Batch
from skipprofiler.profile import Profile, ProfileSettings, profile_model

SETTINGS = ProfileSettings(generate=2, reservoir_size=20, doc_reservoir_size=4, seed=1)




def batches(seed: int, n: int, classes: tuple[int, ...]) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, 10, (len(classes),), generator=g)
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = torch.randint(2, 90, (len(classes), width), generator=g) * mask
        out.append(Batch(ids, mask, torch.tensor(classes), max(classes) + 1))
    return out


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=3)


@pytest.fixture(scope="module")
def halves(llama, tmp_path_factory) -> tuple[Path, Path, Profile]:
    """Two profiles of disjoint halves (the second sees a class the first never does) and the whole's profile."""
    folder = tmp_path_factory.mktemp("halves")
    first, second = batches(1, 2, (0, 1, 0)), batches(2, 2, (1, 2, 2))
    names = ["fiction", "code", "docs"]
    whole = profile_model(llama, first + second, SETTINGS, class_names=names)
    a = profile_model(llama, first, SETTINGS, class_names=names[:2]).save(folder / "a.prof")
    b = profile_model(llama, second, ProfileSettings(generate=2, reservoir_size=20, doc_reservoir_size=4, seed=2),
                      class_names=names).save(folder / "b.prof")
    return a, b, whole


def test_merge_of_two_halves_equals_the_profile_of_the_whole(halves, tmp_path, capsys):
    a, b, whole = halves
    code, out, err = run(["merge", a, b, "--out", tmp_path / "all.prof"], capsys)
    assert code == 0, err
    assert "2 profiles" in out and f"{whole.tokens('prompt')} prompt" in out
    merged = Profile.load(tmp_path / "all.prof")
    assert_same_statistics(merged, whole)
    assert merged.reservoir.shape[2] == 20
    assert np.array_equal(merged.reservoir_len, np.minimum(20, whole.count[:, 0, :]))
    assert merged.header["merged_files"] == [str(a), str(b)] and not merged.partial


def test_merging_profiles_of_different_models_is_refused(halves, tmp_path, capsys):
    a, _, _ = halves
    other = profile_model(tiny_model("llama", num_layers=3, intermediate_size=40), batches(3, 1, (0,)), SETTINGS,
                          class_names=["fiction"]).save(tmp_path / "other.prof")
    code, _, err = run(["merge", a, other, "--out", tmp_path / "x.prof"], capsys)
    assert code != 0 and not (tmp_path / "x.prof").exists()
    assert err.startswith(f"error: cannot merge {other} with {a}: it was made with another model")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_merging_profiles_with_a_different_binning_is_refused(halves, tmp_path, capsys):
    a, _, _ = halves
    profile = Profile.load(a)
    profile.edges["residual"] = profile.edges["residual"] + 1e-6  # same shape, other bin positions
    profile.header["created"] = "another run"
    rebinned = profile.save(tmp_path / "rebinned.prof")
    code, _, err = run(["merge", a, rebinned, "--out", tmp_path / "x.prof"], capsys)
    assert code != 0 and "different binning" in err and not (tmp_path / "x.prof").exists()


@pytest.mark.parametrize("case", ["same-path", "copy"])
def test_the_same_profile_twice_is_refused(halves, tmp_path, capsys, case):
    a, _, _ = halves
    second = a
    if case == "copy":
        second = tmp_path / "copy.prof"
        second.write_bytes(a.read_bytes())
    code, _, err = run(["merge", a, second, "--out", tmp_path / "x.prof"], capsys)
    assert code != 0 and "count its tokens twice" in err and not (tmp_path / "x.prof").exists()


def test_a_partial_input_makes_a_partial_merge_with_a_warning(halves, tmp_path, capsys):
    a, b, _ = halves
    profile = Profile.load(b)
    profile.header["partial"] = True
    partial = profile.save(tmp_path / "partial.prof")
    code, out, err = run(["merge", a, partial, "--out", tmp_path / "all.prof"], capsys)
    assert code == 0 and "is partial" in err and "(partial)" in out
    assert Profile.load(tmp_path / "all.prof").partial


@pytest.mark.parametrize("argv, message", [
    (["{a}", "--out", "{tmp}/x.prof"], "at least two profiles"),
    (["{a}", "{tmp}/missing.prof", "--out", "{tmp}/x.prof"], "profile not found"),
    (["{a}", "{b}", "--out", "{tmp}"], "is a folder"),
    (["{a}", "{b}", "--out", "{tmp}/no/such/folder/x.prof"], "does not exist"),
    (["{a}", "{b}", "--out", "{a}"], "exists; pass --force"),
    (["{a}", "{b}", "--out", "{a}", "--force"], "is one of the inputs"),
    (["{a}", "{tmp}/junk.prof", "--out", "{tmp}/x.prof"], "cannot read profile"),
])
def test_bad_input_gets_one_line_and_no_output(halves, tmp_path, capsys, argv, message):
    a, b, _ = halves
    (tmp_path / "junk.prof").write_text("not a profile")
    args = [s.format(a=a, b=b, tmp=tmp_path) for s in argv]
    code, _, err = run(["merge", *args], capsys)
    assert code != 0 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.prof").exists()


def test_merge_help_shows_examples(capsys):
    code, out, _ = run(["merge", "--help"], capsys)
    assert code == 0 and "skipprof merge shard-0.prof" in out


@pytest.mark.slow
def test_array_job_shards_merge_to_the_whole_corpus_profile(tmp_path, capsys):
    """`skipprof profile --shard I/N` for each I, then `skipprof merge`, equals one `skipprof profile` run."""
    from helpers import write_word_corpus

    model_dir, data = write_word_corpus(tmp_path)
    common = [model_dir, "--data", data, "--batch-size", "4", "--generate", "2", "--reservoir", "16", "--json"]
    assert run(["profile", *common, "--out", tmp_path / "whole.prof"], capsys)[0] == 0
    for index in range(3):
        code, _, err = run(["profile", *common, "--shard", f"{index}/3", "--out", tmp_path / f"part{index}.prof"],
                           capsys)
        assert code == 0, err
    parts = [tmp_path / f"part{index}.prof" for index in range(3)]
    code, _, err = run(["merge", *parts, "--out", tmp_path / "merged.prof"], capsys)
    assert code == 0, err
    merged, whole = Profile.load(tmp_path / "merged.prof"), Profile.load(tmp_path / "whole.prof")
    assert_same_statistics(merged, whole)
    assert [Profile.load(p).header["shard"]["index"] for p in parts] == [0, 1, 2]
