"""Data-parallel profiling: batch sharding, exact reduction, and real 2-process gloo launches under torchrun.

Run as a script, this file is the torchrun worker of the launch tests (`python -m torch.distributed.run ...
tests/test_distributed.py MODEL_DIR OUT [--fail-rank R]`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_statistics, write_word_corpus

from skipprofiler.profile.corpus import Batch
from skipprofiler.profile.distributed import (
    DistributedError,
    combine_rank_profiles,
    init_from_env,
    parse_shard,
    rank_device,
    rank_gpu_group,
    rank_seed,
    reduce_profile,
    shard,
    shard_batches,
)
from skipprofiler.profile import Profile, ProfileSettings, profile_model

SETTINGS = ProfileSettings(generate=2, reservoir_size=24, doc_reservoir_size=3, seed=5)
CLASSES = ["fiction", "code", "docs"]


def corpus_batches(num_batches: int = 5) -> list[Batch]:
    """A fixed little corpus: right-padded batches of varied lengths and classes (classes appear late too)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for j in range(num_batches):
        lengths = torch.randint(3, 12, (3,), generator=g)
        width = int(lengths.max())
        ids = torch.randint(2, 90, (3, width), generator=g)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        classes = torch.randint(0, 2 if j < 2 else 3, (3,), generator=g)
        out.append(Batch(ids * mask, mask, classes, 2 if j < 2 else 3))
    return out


def assert_reservoir_full(p: Profile, size: int) -> None:
    """The merged reservoir has the requested capacity and holds min(capacity, finite tokens) rows per class."""
    assert p.reservoir.shape[2] == size and p.header["reservoir_size"] == size
    for r in range(2):
        for c in range(p.num_classes):
            assert p.reservoir_len[r, c] == min(size, p.count[r, 0, c])
            valid = p.reservoir_keys[r, c, :p.reservoir_len[r, c]]
            assert np.all(np.isfinite(valid)) and np.all(np.diff(valid) <= 0)


# ------------------------------------------------------------------------------------------------ in-process


def test_shard_deals_items_round_robin_and_the_union_is_the_whole():
    items = list(range(11))
    shards = [list(shard(items, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items
    with pytest.raises(ValueError, match="outside"):
        list(shard(items, 3, 3))


def test_shard_runs_the_failure_check_before_each_kept_item():
    seen: list[int] = []

    def check():
        if len(seen) == 2:
            raise DistributedError("rank 1 failed: boom")

    with pytest.raises(DistributedError, match="boom"):
        for item in shard(range(10), 0, 2, before_each=check):
            seen.append(item)
    assert seen == [0, 2]


def test_rank_seeds_keep_rank_0_and_differ_across_ranks():
    seeds = [rank_seed(7, r) for r in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [rank_seed(7, r) for r in range(8)]  # deterministic


def test_combined_rank_profiles_equal_the_single_process_profile():
    """The reduction logic alone: shards profiled in this process, combined as rank 0 would."""
    from tiny_models import tiny_model

    model = tiny_model("llama")
    batches = corpus_batches()
    whole = profile_model(model, batches, SETTINGS, class_names=CLASSES)
    world = 3
    ranks = [profile_model(model, shard(batches, r, world), ProfileSettings(
        generate=2, reservoir_size=24, doc_reservoir_size=3, seed=rank_seed(SETTINGS.seed, r)),
        class_names=CLASSES) for r in range(world)]
    merged = combine_rank_profiles(ranks, world, "gloo")
    assert_same_statistics(merged, whole)
    assert_reservoir_full(merged, 24)
    assert merged.header["distributed"]["world_size"] == 3
    assert sum(t["prompt"] for t in merged.header["distributed"]["rank_tokens"]) == whole.tokens("prompt")
    assert merged.header["corpus"] == whole.header["corpus"] and merged.header["seed"] == SETTINGS.seed
    assert merged.doc_len.sum() == whole.doc_len.sum()


def test_a_rank_without_batches_does_not_shrink_the_document_sample():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    batches = corpus_batches(2)
    ranks = [profile_model(model, shard(batches, r, 3), SETTINGS, class_names=CLASSES) for r in range(3)]
    assert ranks[2].tokens("prompt") == 0
    merged = combine_rank_profiles(ranks, 3, "gloo")
    whole = profile_model(model, batches, SETTINGS, class_names=CLASSES)
    assert_same_statistics(merged, whole)
    assert merged.doc_features.shape == whole.doc_features.shape


def test_single_process_reduction_passes_the_profile_through_or_raises_the_error():
    from tiny_models import tiny_model

    profile = profile_model(tiny_model("llama", num_layers=2), corpus_batches(1), SETTINGS, class_names=CLASSES)
    assert reduce_profile(None, profile) is profile
    with pytest.raises(DistributedError, match="went wrong"):
        reduce_profile(None, None, error="went wrong")


def test_shard_specs_parse_and_bad_ones_are_refused():
    assert parse_shard("2/8") == (2, 8) and parse_shard("0/1") == (0, 1)
    assert list(shard_batches(range(7), (1, 3))) == [1, 4] and shard_batches([5], None) == [5]
    for bad in ("8/8", "-1/4", "1/0", "a/b", "3", "1/2/3"):
        with pytest.raises(ValueError, match="ProfileSettings.shard"):
            parse_shard(bad)


def test_single_process_environment_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_from_env("cpu") is None and rank_device(None, "cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cpu") is None


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}, "outside WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two"}, "not an integer"),
])
def test_a_broken_launch_environment_is_a_one_line_error(monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedError, match=message):
        init_from_env("cpu")


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A real gloo process group of one rank, for the collectives' own logic."""
    import torch.distributed as dist

    from skipprofiler.profile.distributed import DistContext, _default_store

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, backend="gloo",
                      store=_default_store())
    yield ctx
    ctx.close()


def test_status_exchange_fails_every_rank_when_one_reports_an_error(gloo_world_of_one):
    from skipprofiler.profile.distributed import exchange_status, gather_profiles

    exchange_status(gloo_world_of_one, None)
    with pytest.raises(DistributedError, match="profiling failed on rank 0: out of memory"):
        exchange_status(gloo_world_of_one, "out of memory")
    assert gather_profiles(gloo_world_of_one, "a profile") == ["a profile"]


def test_a_published_failure_stops_the_other_ranks_at_their_next_batch(gloo_world_of_one):
    from skipprofiler.profile.distributed import (
        peer_failure,
        publish_failure,
        raise_if_peer_failed,
    )

    assert gloo_world_of_one.store is not None and peer_failure(gloo_world_of_one) is None
    raise_if_peer_failed(gloo_world_of_one)
    publish_failure(gloo_world_of_one, "rank 3 failed: RuntimeError: CUDA out of memory")
    assert peer_failure(gloo_world_of_one) == "rank 3 failed: RuntimeError: CUDA out of memory"
    with pytest.raises(DistributedError, match="rank 0 stopped: rank 3 failed"):
        list(shard(range(4), 0, 2, before_each=lambda: raise_if_peer_failed(gloo_world_of_one)))


def test_rank_gpu_groups_split_a_node_into_contiguous_blocks():
    assert [rank_gpu_group(r, 2, 8) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_gpu_group(2, 3, 8) == [4, 5]
    with pytest.raises(DistributedError, match="at least one"):
        rank_gpu_group(0, 4, 2)


# ------------------------------------------------------------------------------------------------ torchrun


# Launches run one at a time (one xdist worker, `--dist loadgroup` in pyproject): one failed once in a full `-n 2`
# run, not reproduced alone; two 2-rank launches side by side on 2 cores is 4 processes contending for rendezvous.
ONE_LAUNCH_AT_A_TIME = pytest.mark.xdist_group("torchrun")


def _torchrun(model_dir: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.2", __file__, str(model_dir), str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory) -> Path:
    from tiny_models import tiny_model

    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


@pytest.mark.slow
@ONE_LAUNCH_AT_A_TIME
def test_two_gloo_ranks_equal_a_single_process_run(saved_tiny_model, tmp_path):
    from skipprofiler.arch.models import load_model

    out = tmp_path / "dist.prof"
    result = _torchrun(saved_tiny_model, out)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = Profile.load(out)
    single = profile_model(load_model(saved_tiny_model), corpus_batches(), SETTINGS, class_names=CLASSES)
    assert_same_statistics(distributed, single)
    assert_reservoir_full(distributed, SETTINGS.reservoir_size)
    info = distributed.header["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo" and not distributed.partial
    assert [t["prompt"] for t in info["rank_tokens"]] == [
        sum(int(b.attention_mask.sum()) for b in shard(corpus_batches(), r, 2)) for r in range(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.prof"]  # no temp files left


@pytest.mark.slow
@ONE_LAUNCH_AT_A_TIME
def test_a_rank_failing_mid_run_fails_the_launch_and_writes_nothing(saved_tiny_model, tmp_path):
    out = tmp_path / "dist.prof"
    result = _torchrun(saved_tiny_model, out, "--fail-rank", "1")
    assert result.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure in batch 3" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@ONE_LAUNCH_AT_A_TIME
def test_torchrun_skipprof_profile_equals_the_single_process_command(tmp_path, capsys):
    from skipprofiler._cli.main import main

    model_dir, data = write_word_corpus(tmp_path)
    common = ["--data", data, "--batch-size", "4", "--generate", "2", "--reservoir", "16", "--json"]
    try:
        main(["profile", str(model_dir), "--out", str(tmp_path / "single.prof"), *map(str, common)])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "skipprofiler", "profile", str(model_dir), "--out", str(tmp_path / "dist.prof"),
                             *map(str, common)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single, distributed = Profile.load(tmp_path / "single.prof"), Profile.load(tmp_path / "dist.prof")
    assert_same_statistics(distributed, single)
    assert_reservoir_full(distributed, 16)
    assert distributed.header["distributed"]["world_size"] == 2
    assert distributed.header["corpus"] == single.header["corpus"]  # every rank read the whole corpus


# ------------------------------------------------------------------------------------------------ the worker


class _FailingBatches:
    """The corpus, raising on this rank's second batch (global batch 3 on rank 1), after one good batch."""

    def __init__(self, batches: list[Batch], fail: bool):
        self.batches, self.fail = batches, fail

    def __iter__(self):
        for j, batch in enumerate(self.batches):
            if self.fail and j == 3:
                raise RuntimeError(f"injected failure in batch {j}")
            yield batch


def _worker(argv: list[str]) -> int:
    """One torchrun rank: profile its shard of `corpus_batches()` with the saved tiny model; rank 0 writes OUT."""
    import argparse

    from skipprofiler.profile.distributed import init_from_env, profile_distributed, rank_device, report_error
    from skipprofiler.arch.models import load_model

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=-1)
    args = parser.parse_args(argv)
    try:
        ctx = init_from_env("cpu", timeout_s=120)
        with ctx:
            model = load_model(args.model_dir).to(rank_device(ctx, "cpu"))
            batches = _FailingBatches(corpus_batches(), fail=ctx.rank == args.fail_rank)
            merged = profile_distributed(model, batches, ctx, SETTINGS, class_names=CLASSES)
            if merged is not None:
                merged.save(args.out)
    except DistributedError as e:
        report_error(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
