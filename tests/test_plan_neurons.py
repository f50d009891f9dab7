"""Neuron plans in plan files (issue 27 item 2): the `neurons` block, its tensors in the sidecar beside linear maps,
canonical round trips, every problem at once, altered files refused, old plans unchanged, the CLI as a user runs it."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from skipprofiler.plan import (LinearMaps, NeuronSubsets, PlanError, PlanFile, SkipPlan, dump_plan, load_plan,
                               neuron_problems, plan_from_dict, save_plan, schema_path, skip_plan_problems,
                               validate_plan_dict, weights_file_for)

L, H, I = 6, 8, 16  # layers, hidden size, FFN intermediate size
PLANS = Path(__file__).resolve().parent.parent / "plans"
SCHEMA = json.loads(schema_path().read_text())
SKIPPROF = Path(sys.executable).parent / "skipprof"


def subsets(widths: dict[int, int], fill: str = "mean", seed: int = 0, rank: int = 2) -> NeuronSubsets:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, width in widths.items():
        tensors[f"{layer}.kept"] = np.sort(rng.choice(I, width, replace=False)).astype(np.int64)
        if fill in ("mean", "map", "refit"):
            tensors[f"{layer}.bias"] = rng.standard_normal(H).astype(np.float32)
        if fill == "refit":
            tensors[f"{layer}.regression"] = rng.standard_normal((I - width, width)).astype(np.float16)
        if fill == "map":
            tensors[f"{layer}.map_in"] = rng.standard_normal((rank, width)).astype(np.float32)
            tensors[f"{layer}.map_out"] = rng.standard_normal((H, rank)).astype(np.float32)
    return NeuronSubsets(fill, tensors, intermediate_size=I, rank=rank if fill == "map" else None)


def maps(layers) -> LinearMaps:
    rng = np.random.default_rng(1)
    tensors = {}
    for layer in layers:
        tensors[f"{layer}.weight"] = rng.standard_normal((H, H)).astype(np.float32)
        tensors[f"{layer}.bias"] = rng.standard_normal(H).astype(np.float32)
    return LinearMaps(None, tensors)


def mixed_plan() -> PlanFile:
    """Whole-FFN skips with linear maps (layer 3 also narrowed where it is not skipped) and neuron subsets, plus a
    class plan with subsets only (fill none)."""
    glob = SkipPlan("static", compensation="linear", skip_layers={1: 1.0, 3: 0.5}, linear=maps([1, 3]),
                    neurons=subsets({0: 12, 2: 9, 3: 5}), fit={"expected_ffn_flops_saved": 0.21})
    code = SkipPlan("static", neurons=subsets({4: 10, 5: 3}, fill="none", seed=2))
    return PlanFile(model={"name": "tiny", "fingerprint": {"model_type": "llama", "num_layers": L, "hidden_size": H}},
                    global_plan=glob, classes={"code": code})


def rewrite_tensors(plan_path: Path, tensors: dict) -> None:
    """Replace a saved plan's sidecar by `tensors`, re-pinning its sha256 (so only the arrays' own problems show)."""
    from safetensors.numpy import save

    data = save(tensors)
    weights_file_for(plan_path).write_bytes(data)
    old_sha = yaml.safe_load(plan_path.read_text())["global"]["neurons"]["sha256"]
    plan_path.write_text(plan_path.read_text().replace(old_sha, hashlib.sha256(data).hexdigest()))


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_plan(mixed_plan(), tmp_path / "mixed.yaml")


def test_round_trip_is_byte_identical_and_deterministic(saved, tmp_path):
    text = saved.read_text()
    plan = load_plan(saved)
    assert dump_plan(plan) == text
    (tmp_path / "again").mkdir()
    again = save_plan(plan, tmp_path / "again" / "mixed.yaml")
    assert again.read_text() == text
    assert weights_file_for(again).read_bytes() == weights_file_for(saved).read_bytes()
    raw = yaml.safe_load(text)
    assert validate_plan_dict(raw) == []
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(raw)) == []
    neurons = raw["global"]["neurons"]
    assert list(neurons) == ["fill", "intermediate_size", "file", "sha256", "widths"]
    assert neurons["widths"] == {0: 12, 2: 9, 3: 5} and neurons["file"] == "mixed.safetensors"
    assert neurons["sha256"] == raw["global"]["linear"]["sha256"]  # one sidecar for maps and subsets
    assert "    widths:\n      0: 12\n      2: 9\n      3: 5\n" in text


def test_one_file_mixes_skips_linear_maps_and_neuron_subsets(saved):
    from safetensors.numpy import load_file

    stored = load_file(weights_file_for(saved))
    assert sorted(stored) == sorted(
        [f"global.{l}.{p}" for l in (1, 3) for p in ("weight", "bias")]
        + [f"global.neurons.{l}.{p}" for l in (0, 2, 3) for p in ("kept", "bias")]
        + [f"class.code.neurons.{l}.kept" for l in (4, 5)])
    plan = load_plan(saved)
    glob, code = plan.global_plan, plan.classes["code"]
    original = mixed_plan()
    assert glob.linear.layers == [1, 3] and sorted(glob.linear.tensors) == sorted(original.global_plan.linear.tensors)
    for layer in (0, 2, 3):
        np.testing.assert_array_equal(glob.neurons.kept(layer), original.global_plan.neurons.kept(layer))
        np.testing.assert_array_equal(glob.neurons.bias(layer), original.global_plan.neurons.bias(layer))
    assert code.neurons.fill == "none" and code.neurons.bias(4) is None and code.neurons.widths == {4: 10, 5: 3}
    # layer 3 (fraction 0.5) runs narrowed where the pattern does not skip it; layer 1 is skipped whole
    assert [glob.narrowed_layers_at(d) for d in range(4)] == [[0, 2, 3], [0, 2], [0, 2, 3], [0, 2]]
    assert glob.static_layers_at(0) == [1] and glob.static_layers_at(1) == [1, 3]
    assert not code.is_empty() and code.narrowed_layers_at(0) == [4, 5]
    assert neuron_problems(glob, I, H, label="global") == []


def _raw(**neurons) -> dict:
    block = {"fill": "mean", "intermediate_size": I, "file": "p.safetensors", "sha256": "0" * 64,
             "widths": {0: 4}}
    block.update(neurons)
    return {"version": 1, "model": {"name": "m", "fingerprint": {"num_layers": L, "hidden_size": H}},
            "global": {"mode": "static", "skip_layers": [], "neurons": block}}


def test_every_problem_of_a_neurons_block_is_reported_at_once():
    raw = _raw(fill="median", sha256="abc", file="../p.bin", widths={0: 0, 1: 16, 2: "3", 9: 4, 3: 5, 4: 15},
               extra=1)
    raw["global"]["skip_layers"] = [3, {"layer": 4, "fraction": 0.5}]  # 3: whole, so never narrowed; 4: fine
    raw["classes"] = {"a": {"mode": "adaptive", "tau": 0.9, "cold_start": 1, "cold_end": 1, "max_skip": 2,
                            "neurons": copy.deepcopy(_raw()["global"]["neurons"])},
                      "b": {"mode": "static", "neurons": {"fill": "none", "widths": []}}}
    problems = validate_plan_dict(raw)
    expected = [
        "global.neurons.extra: unknown key (allowed here: fill, rank, intermediate_size, file, sha256, widths)",
        "global.neurons.fill: must be one of none, mean, map, refit, got string 'median'",
        "global.neurons.file: must be a .safetensors file name relative to the plan file, got '../p.bin'",
        "global.neurons.sha256: must be 64 lowercase hex digits, got string 'abc'",
        "global.neurons.widths.0: must be in [1, 15], got 0",
        ("global.neurons.widths.1: must be below the FFN's 16 neurons (a layer that keeps them all is left out of "
         "widths), got 16"),
        "global.neurons.widths.2: must be an integer, got string '3'",
        "global.neurons.widths.9: layer 9 is beyond the model's 6 layers (0..5)",
        ("global.neurons.widths.3: layer 3 is in skip_layers with fraction 1 (skipped whole at every eligible "
         "position), so it never runs narrowed: drop it here or give it a fraction below 1"),
        "classes.a.neurons: only applies to static plans (this plan is adaptive)",
        "classes.b.neurons.file: is required",
        "classes.b.neurons.sha256: is required",
        "classes.b.neurons.widths: must be a non-empty mapping of layer -> kept width, got a list",
    ]
    assert problems == expected
    with pytest.raises(PlanError) as info:
        plan_from_dict(raw)
    assert info.value.problems == expected
    schema = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(raw))
    assert schema  # the schema sees the shape problems too (unknown key, fill, adaptive plan with neurons, ...)


def test_tensor_problems_are_all_reported_on_load(saved):
    from safetensors.numpy import load_file

    path = weights_file_for(saved)
    tensors = load_file(path)
    tensors["global.neurons.0.kept"] = tensors["global.neurons.0.kept"][::-1].copy()  # descending
    tensors["global.neurons.2.kept"] = tensors["global.neurons.2.kept"].astype(np.int32)  # wrong dtype
    tensors["global.neurons.3.kept"] = np.array([0, 1, 99], dtype=np.int64)  # too short, out of range
    del tensors["global.neurons.3.bias"]  # fill mean without a bias
    tensors["class.code.neurons.4.bias"] = np.zeros(H, np.float32)  # a bias with fill none
    tensors["class.code.neurons.0.kept"] = np.array([1], dtype=np.int64)  # a layer widths does not list
    rewrite_tensors(saved, tensors)
    with pytest.raises(PlanError) as info:
        load_plan(saved)
    assert info.value.problems == [
        "global.neurons: layer 0 kept must be strictly ascending (sorted, each index once)",
        "global.neurons: layer 2 kept is int32, expected int64",
        "global.neurons: layer 3 kept holds 3 indices but widths records 5",
        "global.neurons: layer 3 kept has indices 0..99 (the FFN's neurons are 0..15)",
        "global.neurons: layer 3 has no 'bias' tensor (fill mean stores kept, bias)",
        "class.code.neurons: the file holds subsets for layers [0] that widths does not list",
        "class.code.neurons: layer 4 has a 'bias' tensor but fill is none (it stores kept)",
    ]


def test_a_map_fill_round_trips_and_its_problems_are_all_reported(tmp_path):
    from safetensors.numpy import load_file

    plan = PlanFile(model={"name": "tiny", "fingerprint": {"model_type": "llama", "num_layers": L, "hidden_size": H}},
                    global_plan=SkipPlan("static", neurons=subsets({0: 12, 2: 9}, fill="map", rank=3)))
    path = save_plan(plan, tmp_path / "map.yaml")
    assert yaml.safe_load(path.read_text())["global"]["neurons"]["rank"] == 3
    loaded = load_plan(path).global_plan.neurons
    assert loaded.fill == "map" and loaded.rank == 3
    for layer in (0, 2):
        for got, want in zip(loaded.neuron_map(layer), plan.global_plan.neurons.neuron_map(layer)):
            assert np.array_equal(got, want)
    assert neuron_problems(load_plan(path).global_plan, I, H, label="global") == []
    tensors = load_file(weights_file_for(path))
    tensors["global.neurons.0.map_in"] = np.zeros((3, 11), np.float32)  # not the kept width
    tensors["global.neurons.2.map_out"] = np.zeros((H, 3), np.float64)  # not float32
    del tensors["global.neurons.2.map_in"]
    rewrite_tensors(path, tensors)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert info.value.problems == [
        "global.neurons: layer 0 map_in has shape (3, 11), expected (3, 12)",
        "global.neurons: layer 2 has no 'map_in' tensor (fill map stores kept, bias, map_in, map_out)",
        "global.neurons: layer 2 map_out is float64, expected float32",
    ]
    no_rank = _raw(fill="map")
    mean_rank = _raw(rank=4)
    assert validate_plan_dict(no_rank) == ["global.neurons.rank: is required with fill map (the rank of its maps)"]
    assert validate_plan_dict(mean_rank) == ["global.neurons.rank: applies to fill map only (fill is mean)"]
    assert validate_plan_dict(_raw(fill="map", rank=0)) == ["global.neurons.rank: must be in [1, inf], got 0"]


def test_a_refit_fill_round_trips_and_its_problems_are_all_reported(tmp_path):
    from safetensors.numpy import load_file

    plan = PlanFile(model={"name": "tiny", "fingerprint": {"model_type": "llama", "num_layers": L, "hidden_size": H}},
                    global_plan=SkipPlan("static", neurons=subsets({0: 12, 2: 9}, fill="refit")))
    path = save_plan(plan, tmp_path / "refit.yaml")
    assert "rank" not in yaml.safe_load(path.read_text())["global"]["neurons"]
    loaded = load_plan(path).global_plan.neurons
    assert loaded.fill == "refit" and all(
        np.array_equal(loaded.regression(l), plan.global_plan.neurons.regression(l)) for l in (0, 2))
    assert loaded.regression(0).dtype == np.float16
    tensors = load_file(weights_file_for(path))
    tensors["global.neurons.0.regression"] = np.zeros((I - 11, 11), np.float16)  # not the kept width
    del tensors["global.neurons.2.regression"]
    rewrite_tensors(path, tensors)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert info.value.problems == [
        f"global.neurons: layer 0 regression has shape ({I - 11}, 11), expected ({I - 12}, 12)",
        "global.neurons: layer 2 has no 'regression' tensor (fill refit stores kept, bias, regression)",
    ]


def test_an_altered_or_missing_sidecar_is_refused(saved):
    path = weights_file_for(saved)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(PlanError) as info:
        load_plan(saved)
    assert len(info.value.problems) == 3  # the global plan's maps and subsets, the class plan's subsets
    assert all("was altered or belongs to another plan" in p for p in info.value.problems)
    assert info.value.problems[1].startswith("global.neurons: ")
    path.unlink()
    with pytest.raises(PlanError, match="class.code.neurons: the tensor file .* is missing"):
        load_plan(saved)


def test_checks_against_the_model_and_plans_built_in_code():
    plan = mixed_plan()
    glob = plan.global_plan
    assert skip_plan_problems(glob, "global", L, H) == []  # subsets in memory need no file yet
    problems = neuron_problems(glob, 12, 7, label="global")
    assert problems[0] == ("global: neurons: chosen for FFNs of 16 neurons, the model's have 12 (this plan is for "
                           "another model)")
    assert any("bias has shape (8,), expected (7,)" in p for p in problems)
    assert any("(the FFN's neurons are 0..11)" in p for p in problems)
    assert neuron_problems(SkipPlan("static", neurons=NeuronSubsets("mean", {}, "p.safetensors", "0" * 64,
                                                                       recorded_widths={0: 3})), I, H) == [
        "plan: neurons: needs its neuron subsets (load the plan from its file, beside which they are stored)"]
    adaptive = SkipPlan("adaptive", tau=[0.9] * L, cold_start=1, cold_end=1, max_skip=2, neurons=subsets({2: 4}))
    assert skip_plan_problems(adaptive, "plan", L, H) == [
        "plan.neurons: only applies to static plans (this plan is adaptive)"]
    whole = SkipPlan("static", skip_layers={2: 1.0}, neurons=subsets({2: 4}))
    assert [p.split(":")[0] for p in skip_plan_problems(whole, "plan", L, H)] == ["plan.neurons.widths.2"]
    with pytest.raises(PlanError, match="not saved yet"):
        dump_plan(plan)  # the YAML needs the sidecar's name and hash


def test_saving_a_plan_whose_tensors_were_never_read_is_refused(saved, tmp_path):
    only_yaml = plan_from_dict(yaml.safe_load(saved.read_text()))
    assert only_yaml.global_plan.neurons.widths == {0: 12, 2: 9, 3: 5}  # as recorded, before the file is read
    assert dump_plan(only_yaml) == saved.read_text()
    with pytest.raises(PlanError, match="no tensors in memory"):
        save_plan(only_yaml, tmp_path / "copy.yaml")
    assert not (tmp_path / "copy.yaml").exists()


@pytest.mark.parametrize("path", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_plans_load_and_redump_byte_identically(path):
    text = path.read_text()
    plan = load_plan(path)
    assert dump_plan(plan) == text
    # plans written before neuron subsets existed load without any; neuron plans load theirs
    assert any(p.neurons is not None for _, p in plan.named_plans()) == ("\n  neurons:" in text or "\n    neurons:" in text)


def test_resaving_an_old_linear_plan_reproduces_its_files(tmp_path):
    """A plan with linear maps only keeps the sidecar format it had: re-saving it changes no byte."""
    source = PLANS / "demo-linear-25.yaml"
    copy_path = save_plan(load_plan(source), tmp_path / source.name)
    assert copy_path.read_text() == source.read_text()
    assert weights_file_for(copy_path).read_bytes() == weights_file_for(source).read_bytes()


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SKIPPROF), *map(str, args)], check=False, capture_output=True, text=True, timeout=120)


def test_cli_show_and_validate_a_neuron_plan(saved):
    shown = _cli("show", saved)
    assert shown.returncode == 0, shown.stderr
    out = " ".join(shown.stdout.split())  # rich wraps long lines
    assert "neurons" in out and "3 layers, 54% kept" in out and "2 layers, 41% kept" in out
    assert "global: neuron subsets in mixed.safetensors" in out and "fill mean" in out
    assert "neurons kept per layer at eligible decode positions (of 16): 0: 12 (75%), 2: 9 (56%), 3: 5 (31%)" in out
    assert "22.9% of all FFN neurons not computed" in out
    assert "class code: neuron subsets in mixed.safetensors" in out and "fill none" in out
    checked = _cli("validate", saved)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip().startswith(f"ok: {saved} is a valid plan v1 for tiny")
    assert "neuron subsets mixed.safetensors (fill mean, 3 layers narrowed, sha256 ok)" in checked.stdout


def test_cli_lists_every_problem_of_a_bad_neuron_plan(saved):
    raw = yaml.safe_load(saved.read_text())
    raw["global"]["neurons"]["fill"] = "median"
    raw["global"]["neurons"]["widths"][9] = 4
    raw["global"]["skip_layers"] = [0, {"layer": 3, "fraction": 0.5}]
    saved.write_text(yaml.safe_dump(raw, sort_keys=False))
    for command in ("validate", "show"):
        result = _cli(command, saved)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert lines[0] == f"error: {saved}: 3 problems:"
        assert [line.split(":")[0].strip() for line in lines[1:]] == [
            "global.neurons.fill", "global.neurons.widths.9", "global.neurons.widths.0"]
    raw["global"]["neurons"]["fill"] = "mean"
    del raw["global"]["neurons"]["widths"][9]
    raw["global"]["skip_layers"] = [1, {"layer": 3, "fraction": 0.5}]
    saved.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _cli("validate", saved).returncode == 0
    weights_file_for(saved).write_bytes(b"not the tensors")
    result = _cli("validate", saved)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "global.neurons: " in result.stderr and "was altered or belongs to another plan" in result.stderr


def test_cli_validate_checks_subsets_against_the_model(tmp_path):
    from tiny_models import tiny_model

    from skipprofiler.arch.registry import model_fingerprint

    model = tiny_model("llama", num_layers=3)
    model.save_pretrained(tmp_path / "m")
    hidden, size = model.config.hidden_size, model.config.intermediate_size
    rng = np.random.default_rng(0)

    def plan_for(chosen_for: int) -> PlanFile:
        kept = np.sort(rng.choice(size, size // 2, replace=False)).astype(np.int64)
        neurons = NeuronSubsets("mean", {"1.kept": kept, "1.bias": np.zeros(hidden, np.float32)},
                                intermediate_size=chosen_for)
        return PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)},
                        global_plan=SkipPlan("static", neurons=neurons))

    ok = save_plan(plan_for(size), tmp_path / "ok.yaml")
    result = _cli("validate", ok, "--model", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    other = save_plan(plan_for(size * 2), tmp_path / "other.yaml")
    result = _cli("validate", other, "--model", tmp_path / "m")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"global: neurons: chosen for FFNs of {size * 2} neurons, the model's have {size} (this plan is for "
            "another model)") in result.stderr
