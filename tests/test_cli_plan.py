"""`skipprof export-plan`, `validate`, `show`: summaries, all problems at once, one-line errors for bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml
from helpers import run

from skipprofiler.plan import load_plan

GOOD_PLAN = """\
version: 1
model:
  name: tiny
  fingerprint:
    model_type: llama
    num_layers: 4
global:
  mode: static
  skip_layers: [1, {layer: 2, fraction: 0.5}]
classes:
  code:
    mode: adaptive
    tau: 0.9
    cold_start: 1
    cold_end: 1
    max_skip: 2
"""




def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_validate_ok_and_show(tmp_path, capsys):
    path = write(tmp_path, GOOD_PLAN)
    code, out, _ = run(["validate", path], capsys)
    assert code == 0 and out.startswith(f"ok: {path} is a valid plan v1 for tiny (global static, 1 class plans (code)")
    code, out, _ = run(["show", path], capsys)
    assert code == 0
    assert "1, 2 (0.5)" in out and "tau 0.9, k 2, layers 1..2" in out
    code, out, _ = run(["show", path, "--yaml"], capsys)
    assert code == 0 and load_plan(out) == load_plan(path)


def test_validate_reports_every_problem_one_per_line(tmp_path, capsys):
    bad = GOOD_PLAN.replace("tau: 0.9", "tau: 1.7").replace("[1, {layer: 2", "[9, {layer: 2") + "extra: 1\n"
    code, _, err = run(["validate", write(tmp_path, bad)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].endswith("3 problems:")
    assert sorted(line.strip() for line in lines[1:]) == sorted([
        "extra: unknown key (allowed here: version, model, provenance, defaults, global, classes, router)",
        "global.skip_layers[0]: layer 9 is beyond the model's 4 layers (0..3)",
        "classes.code.tau: must be in [-1.0, 1.0], got 1.7"])
    assert "Traceback" not in err


@pytest.mark.parametrize("text,expected", [
    ("version: [1\n", "malformed YAML: line 2"),
    ("version: 2\nmodel: {name: x, fingerprint: {num_layers: 2}}\nglobal: {mode: static}\n",
     "unsupported plan version 2"),
])
def test_validate_bad_files(tmp_path, capsys, text, expected):
    code, _, err = run(["validate", write(tmp_path, text)], capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    code, _, err = run(["validate", tmp_path / "missing.yaml"], capsys)
    assert code == 2 and err.strip() == f"error: plan file not found: {tmp_path / 'missing.yaml'}"


@pytest.mark.slow
def test_validate_against_a_model_checks_the_fingerprint(tmp_path, capsys):
    from tiny_models import tiny_model

    from skipprofiler.arch.registry import model_fingerprint

    model = tiny_model("llama", num_layers=4)
    model.save_pretrained(tmp_path / "m")
    fp = model_fingerprint(model)
    plan = yaml.safe_load(GOOD_PLAN)
    plan["model"]["fingerprint"] = fp
    ok = write(tmp_path, yaml.safe_dump(plan), "ok.yaml")
    code, out, err = run(["validate", ok, "--model", tmp_path / "m"], capsys)
    assert code == 0, err
    plan["model"]["fingerprint"]["config_hash"] = "0000000000000000"
    plan["model"]["fingerprint"]["num_layers"] = 6
    code, _, err = run(["validate", write(tmp_path, yaml.safe_dump(plan), "other.yaml"), "--model", tmp_path / "m"],
                       capsys)
    assert code == 2 and "model.fingerprint.config_hash: plan was fitted for '0000000000000000'" in err
    assert "model.fingerprint.num_layers: plan was fitted for 6, the model has 4" in err


# ----------------------------------------------------------------------------------------------------------------
# export-plan (needs the profile stage)


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory) -> Path:
    from helpers import BASE_CURVE, synthetic_profile

    path = tmp_path_factory.mktemp("prof") / "synthetic.prof"
    code = tuple(min(0.99, c + (0.03 if 2 <= l <= 5 else -0.03)) if l < 11 else c for l, c in enumerate(BASE_CURVE))
    synthetic_profile({"fiction": BASE_CURVE, "code": code}).save(path)
    return path


@pytest.mark.parametrize("mode", ["static", "adaptive"])
def test_export_plan_writes_a_valid_plan_and_prints_a_summary(tmp_path, capsys, profile_file, mode):
    out_path = tmp_path / f"{mode}.yaml"
    code, out, err = run(["export-plan", profile_file, "--target-skip", "0.25", "--mode", mode, "--per-class",
                          "--out", out_path], capsys)
    assert code == 0, err
    plan_file = load_plan(out_path)
    assert plan_file.global_plan.mode == mode
    for plan in [plan_file.global_plan, *plan_file.classes.values()]:
        assert abs(plan.expected_skip_ratio - 0.25) <= 0.01
    assert set(plan_file.classes) == {"fiction", "code"} and plan_file.router is not None
    assert plan_file.provenance["profile_sha256"] and plan_file.provenance["tool_version"]
    assert f"wrote {out_path}" in out and "class code" in out and "router: layer 6" in out
    assert run(["validate", out_path], capsys)[0] == 0


def test_export_plan_to_stdout_and_one_class(capsys, profile_file):
    code, out, err = run(["export-plan", profile_file, "-r", "0.1", "--class", "code", "--out", "-"], capsys)
    assert code == 0, err
    plan_file = load_plan(out)
    assert list(plan_file.classes) == ["code"] and plan_file.router is None


@pytest.mark.parametrize("args,expected", [
    (["--target-skip", "1.5"], "--target-skip must be in (0, 1), got 1.5"),
    (["--target-skip", "0"], "--target-skip must be in (0, 1), got 0"),
    (["--target-skip", "0.2", "--class", "poetry"], "unknown class 'poetry'; the profile's classes: fiction, code"),
    (["--target-skip", "0.2", "--mode", "dynamic"], "--mode must be one of static, adaptive, got 'dynamic'"),
    (["--target-skip", "0.95"], "lower --target-skip or --cold-floor"),
    (["--target-skip", "0.2", "--batch-decision", "shared"], "--batch-decision shared applies to --mode adaptive"),
    (["--target-skip", "0.2", "--mode", "adaptive", "--batch-decision", "vote"], "--batch-decision must be one of"),
])
def test_export_plan_bad_options(tmp_path, capsys, profile_file, args, expected):
    code, _, err = run(["export-plan", profile_file, *args, "--out", tmp_path / "p.yaml"], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.yaml").exists()


def test_export_plan_bad_profiles_and_outputs(tmp_path, capsys, profile_file):
    code, _, err = run(["export-plan", tmp_path / "none.prof", "-r", "0.2"], capsys)
    assert code == 2 and "profile not found" in err and len(err.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt.prof"
    corrupt.write_bytes(b"\x00garbage" * 10)
    code, _, err = run(["export-plan", corrupt, "-r", "0.2"], capsys)
    assert code == 2 and "cannot read profile" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["export-plan", profile_file, "-r", "0.2", "--out", blocker / "p.yaml"], capsys)
    assert code == 2 and "cannot write" in err
    code, _, err = run(["export-plan", profile_file, "-r", "0.2", "--out", tmp_path], capsys)
    assert code == 2 and "is a directory" in err


def test_partial_profile_is_allowed_with_a_warning(tmp_path, capsys):
    from helpers import BASE_CURVE, synthetic_profile

    profile = synthetic_profile({"x": BASE_CURVE})
    profile.header["partial"] = True
    profile.save(tmp_path / "partial.prof")
    code, _, err = run(["export-plan", tmp_path / "partial.prof", "-r", "0.2", "--out", tmp_path / "p.yaml"], capsys)
    assert code == 0 and "partial profile" in err
    assert load_plan(tmp_path / "p.yaml").provenance["partial_profile"] is True


@pytest.mark.slow
def test_end_to_end_profile_then_export_then_apply(tmp_path, capsys):
    """`skipprof profile` on a tiny model, then export-plan, then the runtime applies the plan to that model."""
    import torch
    from tiny_models import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from skipprofiler.runtime import apply_plan

    model = tiny_model("llama", num_layers=4)
    model.save_pretrained(tmp_path / "m")
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]",
                            eos_token="w1").save_pretrained(tmp_path / "m")
    data = tmp_path / "data.jsonl.gz"
    with gzip.open(data, "wt") as f:
        for i in range(8):
            f.write(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90 + 2}" for j in range(40)),
                                "class": "a" if i % 2 else "b"}) + "\n")
    code, _, err = run(["profile", tmp_path / "m", "--data", data, "--out", tmp_path / "t.prof"], capsys)
    assert code == 0, err
    for mode in ("static", "adaptive"):
        out_path = tmp_path / f"{mode}.yaml"
        code, _, err = run(["export-plan", tmp_path / "t.prof", "-r", "0.25", "--mode", mode, "--dense-every", "0",
                            "--warmup-tokens", "0", "--out", out_path], capsys)
        assert code == 0, err
        plan_file = load_plan(out_path)
        assert abs(plan_file.global_plan.expected_skip_ratio - 0.25) <= 0.01
        with apply_plan(model, out_path) as handle, torch.no_grad():
            model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=24, do_sample=False)
            stats = handle.stats()
        assert stats["decode_positions"] == 23 and stats["decided_skips"] > 0
        if mode == "static":  # the same layers at every position: the fitted ratio, up to the fractional layer's pattern
            assert stats["decided_skip_ratio"] == pytest.approx(0.25, abs=1 / (4 * 23))


def test_wrong_kind_of_file_gets_a_message_that_says_what_it_is(tmp_path, capsys, profile_file):
    truncated = tmp_path / "cut.prof"
    truncated.write_bytes(profile_file.read_bytes()[:500])
    code, _, err = run(["inspect", truncated], capsys)
    assert code != 0 and "truncated or not a skipprof profile" in err and "Traceback" not in err
    code, _, err = run(["show", profile_file], capsys)
    assert code != 0 and "not a YAML plan but a binary file" in err and "skipprof inspect" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(["profile", "--data", empty, "--out", tmp_path / "x.prof"], capsys)
    assert code != 0 and "has no documents (empty file)" in err


def test_export_plan_budget_options_are_checked_before_any_work(tmp_path, capsys, profile_file):
    out = tmp_path / "p.yaml"
    for args, expected in ((["-r", "0.2", "--max-kl", "0.1"], "exclude each other"),
                           ([], "set --target-skip (a skip ratio), or a quality budget"),
                           (["--max-ppl-increase", "0"], "must be > 0"),
                           (["--max-kl", "0.1", "--mode", "adaptive"], "fits static plans"),
                           (["--max-kl", "0.1", "--per-class"], "global plan only")):
        code, _, err = run(["export-plan", profile_file, *args, "--out", out], capsys)
        assert code != 0 and expected in err, (args, err)
    assert not out.exists()


@pytest.mark.slow
def test_export_plan_with_a_quality_budget_measures_on_the_profiled_model(tmp_path, capsys):
    demo_profile, out = tmp_path / "demo.prof", tmp_path / "budget.yaml"
    code, _, err = run(["profile", "--max-tokens", "1500", "--generate", "4", "--out", demo_profile], capsys)
    assert code == 0, err
    code, _, err = run(["export-plan", demo_profile, "--max-kl", "0.05", "--gen-len", "128", "--out", out], capsys)
    assert code == 0, err
    assert "measuring on the profiled model: the bundled demo model" in err and "[export-plan] set " in err
    plan = load_plan(out).global_plan
    record = plan.fit["budget_fit"]
    assert record["budget"] == {"max_kl": 0.05} and 0 < record["kl"] <= 0.05
    assert plan.skip_layers and plan.expected_skip_ratio == pytest.approx(sum(plan.skip_layers.values()) / 12, abs=1e-6)
    assert plan.fit["gen_len"] == 128
    whole_layer_steps = [step for step in record["path"] if all(isinstance(l, int) for l in step["layers"])]
    assert whole_layer_steps[-1]["kl"] > 0.05  # the greedy walk stopped at the first set over the budget
