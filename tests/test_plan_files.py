"""Plan files: canonical YAML round trips, validation that reports every problem, the JSON schema agreeing."""

from __future__ import annotations

import copy
import json
import os
import stat

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipprofiler.plan.model import PlanError, PlanFile, Router, SkipPlan
from skipprofiler.plan import (
    dump_plan,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
    schema_path,
    validate_plan_dict,
)

SCHEMA = json.loads(schema_path().read_text())
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789é", min_size=1, max_size=8)
unit_floats = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False)


def schema_errors(d) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(d)]


@st.composite
def skip_plans(draw, num_layers: int, compensation: str | None = None) -> SkipPlan:
    mode = draw(st.sampled_from(["static", "adaptive"]))
    plan = SkipPlan(mode=mode, apply_to=draw(st.sampled_from(["decode", "all"])),
                    warmup_tokens=draw(st.integers(0, 64)),
                    dense_every=draw(st.sampled_from([0, 2, 3, 6, 10])),
                    compensation=compensation or draw(st.sampled_from(["none", "norm_ratio"])))
    if mode == "static":
        layers = draw(st.lists(st.integers(0, num_layers - 1), unique=True, max_size=num_layers))
        plan.skip_layers = {l: draw(st.one_of(st.just(1.0), st.floats(1e-4, 1.0, exclude_min=True)))
                            for l in layers}
    else:
        if draw(st.booleans()):
            plan.tau = [draw(unit_floats)] * num_layers
        else:
            plan.tau = draw(st.lists(unit_floats, min_size=num_layers, max_size=num_layers))
        plan.cold_start = draw(st.integers(0, num_layers // 2))
        plan.cold_end = draw(st.integers(0, num_layers - plan.cold_start))
        plan.max_skip = draw(st.integers(0, num_layers))
        plan.batch_decision = draw(st.sampled_from(["per_sequence", "shared"]))
    if plan.compensation == "norm_ratio" or draw(st.booleans()):
        plan.norm_gain = draw(st.lists(st.floats(0.01, 10.0), min_size=num_layers, max_size=num_layers))
    if draw(st.booleans()):
        plan.expected_skip_ratio = draw(st.floats(0.0, 1.0))
    plan.fit = draw(st.dictionaries(names, st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                                                     names, st.lists(st.integers(0, 9), max_size=4)), max_size=3))
    return plan


@st.composite
def plan_files(draw) -> PlanFile:
    num_layers = draw(st.integers(1, 12))
    hidden = draw(st.integers(1, 6))
    class_names = draw(st.lists(names, unique=True, max_size=3))
    plan_file = PlanFile(
        model={"name": draw(names), "fingerprint": {"model_type": "llama", "num_layers": num_layers,
                                                   "hidden_size": hidden, "config_hash": "0123abcd"}},
        global_plan=draw(skip_plans(num_layers)),
        classes={name: draw(skip_plans(num_layers)) for name in class_names},
        defaults=draw(st.fixed_dictionaries({}, optional={"apply_to": st.sampled_from(["decode", "all"]),
                                                          "warmup_tokens": st.integers(0, 9),
                                                          "dense_every": st.sampled_from([0, 6]),
                                                          "compensation": st.just("none")})),
        provenance=draw(st.fixed_dictionaries({}, optional={"created": st.just("2025-01-02T03:04:05+00:00"),
                                                            "tool_version": st.just("0.1.0"),
                                                            "tokens": st.fixed_dictionaries({"decode": st.integers(0, 99)}),
                                                            "zz_extra": names})),
    )
    if class_names and draw(st.booleans()):
        plan_file.router = Router(layer=draw(st.integers(0, num_layers - 1)), classes=list(class_names),
                                  centroids=[draw(st.lists(unit_floats, min_size=hidden, max_size=hidden))
                                             for _ in class_names],
                                  heldout_accuracy=draw(st.one_of(st.none(), st.floats(0.0, 1.0))))
    return plan_file


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_files())
def test_random_valid_plans_round_trip_byte_identically(plan_file):
    text = dump_plan(plan_file)
    loaded = load_plan(text)
    assert loaded == plan_file
    assert dump_plan(loaded) == text
    raw = yaml.safe_load(text)
    assert validate_plan_dict(raw) == []
    assert schema_errors(raw) == []


# Corruptions: (description, function mutating a raw plan dict in place, whether the JSON schema can see it too).
def _first_plan(d) -> dict:
    return d["global"]


CORRUPTIONS = [
    ("unknown top-level key", lambda d: d.__setitem__("extra", 1), True),
    ("unknown plan key", lambda d: _first_plan(d).__setitem__("skip_ratio", 0.2), True),
    ("unknown fingerprint key", lambda d: d["model"]["fingerprint"].__setitem__("layers", 3), True),
    ("unsupported version", lambda d: d.__setitem__("version", 2), True),
    ("version as string", lambda d: d.__setitem__("version", "1"), True),
    ("missing model", lambda d: d.pop("model"), True),
    ("missing global", lambda d: d.pop("global"), True),
    ("mode unknown", lambda d: _first_plan(d).__setitem__("mode", "dynamic"), True),
    ("warmup negative", lambda d: _first_plan(d).__setitem__("warmup_tokens", -1), True),
    ("warmup as bool", lambda d: _first_plan(d).__setitem__("warmup_tokens", True), True),
    ("dense_every 1", lambda d: _first_plan(d).__setitem__("dense_every", 1), True),
    ("apply_to unknown", lambda d: _first_plan(d).__setitem__("apply_to", "prefill"), True),
    ("expected ratio > 1", lambda d: _first_plan(d).__setitem__("expected_skip_ratio", 1.5), True),
    ("expected ratio string", lambda d: _first_plan(d).__setitem__("expected_skip_ratio", "high"), True),
    ("num_layers zero", lambda d: d["model"]["fingerprint"].__setitem__("num_layers", 0), True),
    ("defaults unknown key", lambda d: d.setdefault("defaults", {}).__setitem__("warmup", 3), True),
    ("layer beyond model", lambda d: d.__setitem__("global", {"mode": "static", "skip_layers": [
        d["model"]["fingerprint"]["num_layers"]]}), False),
    ("fraction zero", lambda d: d.__setitem__("global", {"mode": "static", "skip_layers": [
        {"layer": 0, "fraction": 0.0}]}), True),
    ("duplicate layer", lambda d: d.__setitem__("global", {"mode": "static", "skip_layers": [0, 0]}), False),
    ("tau out of range", lambda d: d.__setitem__("global", {"mode": "adaptive", "tau": 1.7, "cold_start": 0,
                                                            "cold_end": 0, "max_skip": 1}), True),
    ("tau wrong length", lambda d: d.__setitem__("global", {
        "mode": "adaptive", "tau": [0.5] * (d["model"]["fingerprint"]["num_layers"] + 1), "cold_start": 0,
        "cold_end": 0, "max_skip": 1}), False),
    ("adaptive without max_skip", lambda d: d.__setitem__("global", {"mode": "adaptive", "tau": 0.9,
                                                                     "cold_start": 0, "cold_end": 0}), True),
    ("static with tau", lambda d: d.__setitem__("global", {"mode": "static", "skip_layers": [], "tau": 0.9}), True),
    ("norm_ratio without gains", lambda d: d.__setitem__("global", {"mode": "static", "skip_layers": [],
                                                                    "compensation": "norm_ratio"}), False),
    ("cold layers exceed model", lambda d: d.__setitem__("global", {
        "mode": "adaptive", "tau": 0.9, "cold_start": d["model"]["fingerprint"]["num_layers"], "cold_end": 1,
        "max_skip": 1}), False),
    ("router for unknown class", lambda d: d.__setitem__("router", {"layer": 0, "classes": ["nope"],
                                                                    "centroids": [[0.0]]}), False),
    ("class plan not a mapping", lambda d: d.__setitem__("classes", {"code": [1, 2]}), True),
    ("fit not a mapping", lambda d: _first_plan(d).__setitem__("fit", [1]), True),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_files(), st.sampled_from(CORRUPTIONS))
def test_random_corruptions_are_rejected_with_a_message(plan_file, corruption):
    description, corrupt, schema_sees_it = corruption
    raw = yaml.safe_load(dump_plan(plan_file))
    corrupt(raw)
    problems = validate_plan_dict(raw)
    assert problems, description
    assert all(isinstance(p, str) and ": " in p for p in problems)
    with pytest.raises(PlanError) as info:
        load_plan(yaml.safe_dump(raw, sort_keys=False))
    assert info.value.problems == problems
    if schema_sees_it:
        assert schema_errors(raw), description


def _minimal(num_layers: int = 4) -> dict:
    return {"version": 1, "model": {"name": "m", "fingerprint": {"num_layers": num_layers}},
            "global": {"mode": "static", "skip_layers": [1]}}


def test_every_problem_is_reported_at_once_with_its_path():
    raw = _minimal()
    raw["bogus"] = 1
    raw["global"] = {"mode": "adaptive", "tau": [0.9, 1.7, 0.9, 0.9], "cold_start": 0, "cold_end": 0, "max_skip": 9}
    raw["classes"] = {"code": {"mode": "static", "skip_layers": [2, {"layer": 7, "fraction": 0.5}]}}
    problems = validate_plan_dict(raw)
    assert "bogus: unknown key (allowed here: version, model, provenance, defaults, global, classes, router)" in problems
    assert "global.tau[1]: must be in [-1.0, 1.0], got 1.7" in problems
    assert "global.max_skip: must be in [0, 4], got 9" in problems
    assert "classes.code.skip_layers[1].layer: layer 7 is beyond the model's 4 layers (0..3)" in problems
    assert len(problems) == 4


def test_batch_decision_is_adaptive_only_and_written_only_when_shared():
    adaptive = {"mode": "adaptive", "tau": 0.9, "cold_start": 1, "cold_end": 1, "max_skip": 2}
    raw = {**_minimal(), "global": {**adaptive, "batch_decision": "shared"},
           "classes": {"a": {**adaptive, "batch_decision": "together"},
                       "b": {"mode": "static", "skip_layers": [1], "batch_decision": "shared"}}}
    problems = validate_plan_dict(raw)
    assert problems == ["classes.a.batch_decision: must be one of per_sequence, shared, got string 'together'",
                        "classes.b.batch_decision: only applies to adaptive plans (this plan is static)"]
    del raw["classes"]
    assert not schema_errors(raw)
    text = dump_plan(plan_from_dict(raw))
    assert load_plan(text).global_plan.batch_decision == "shared" and "batch_decision: shared" in text
    per_sequence = dump_plan(plan_from_dict({**raw, "global": adaptive}))
    assert "batch_decision" not in per_sequence and load_plan(per_sequence).global_plan.batch_decision == "per_sequence"


def test_model_checks_layers_and_fingerprint():
    raw = _minimal()
    raw["model"]["fingerprint"].update(model_type="llama", config_hash="aaaa")
    assert validate_plan_dict(raw, num_layers=4, fingerprint={"model_type": "llama", "num_layers": 4,
                                                              "config_hash": "aaaa"}) == []
    problems = validate_plan_dict(raw, num_layers=1, fingerprint={"model_type": "llama", "num_layers": 1,
                                                                  "config_hash": "bbbb"})
    assert any(p.startswith("model.fingerprint.num_layers: plan was fitted for 4, the model has 1") for p in problems)
    assert any(p.startswith("model.fingerprint.config_hash:") for p in problems)
    assert "global.skip_layers[0]: layer 1 is beyond the model's 1 layers (0..0)" in problems


def test_defaults_fill_plans_and_are_not_repeated():
    text = dump_plan(plan_from_dict({**_minimal(), "defaults": {"warmup_tokens": 8, "dense_every": 6},
                                     "classes": {"code": {"mode": "static", "skip_layers": [2],
                                                          "dense_every": 0}}}))
    loaded = load_plan(text)
    assert (loaded.global_plan.warmup_tokens, loaded.global_plan.dense_every) == (8, 6)
    assert (loaded.classes["code"].warmup_tokens, loaded.classes["code"].dense_every) == (8, 0)
    assert "  dense_every: 0\n" in text and "  warmup_tokens: 8\n" in text.split("global:")[0]
    assert text.count("warmup_tokens") == 1


def test_fractional_layers_and_scalar_tau_spelling():
    raw = _minimal(6)
    raw["global"] = {"mode": "static", "skip_layers": [5, 2, {"layer": 3, "fraction": 0.5}]}
    raw["classes"] = {"a": {"mode": "adaptive", "tau": 0.95, "cold_start": 2, "cold_end": 1, "max_skip": 2}}
    plan_file = plan_from_dict(raw)
    assert plan_file.global_plan.skip_layers == {2: 1.0, 3: 0.5, 5: 1.0}
    assert plan_file.classes["a"].tau == [0.95] * 6
    text = dump_plan(plan_file)
    assert "skip_layers: [2, {layer: 3, fraction: 0.5}, 5]" in text
    assert "tau: 0.95\n" in text


def test_canonical_text_round_trips_and_comments_are_dropped():
    text = dump_plan(plan_from_dict(_minimal()))
    assert dump_plan(load_plan(text)) == text
    commented = "# hand-written\n" + text
    assert dump_plan(load_plan(commented)) == text


def test_malformed_yaml_and_duplicate_keys_are_one_line_errors(tmp_path):
    for bad, expected in (("version: [1\n", "malformed YAML: line 2"), ("version: 1\nversion: 1\n", "duplicate key"),
                          ("- just\n- a list\n", "plan: must be a mapping")):
        with pytest.raises(PlanError) as info:
            load_plan(bad)
        assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "missing.yaml")


def test_save_plan_is_atomic_and_reloads(tmp_path):
    plan_file = plan_from_dict(_minimal())
    path = save_plan(plan_file, tmp_path / "p.yaml")
    assert load_plan(path) == plan_file
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]
    with pytest.raises(PlanError):  # an invalid plan is never written
        save_plan(PlanFile(model={"name": "m", "fingerprint": {"num_layers": 2}},
                           global_plan=SkipPlan("static", skip_layers={5: 1.0})), tmp_path / "q.yaml")
    assert not (tmp_path / "q.yaml").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_save_plan_to_read_only_folder_fails_cleanly(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OSError):
            save_plan(plan_from_dict(_minimal()), folder / "p.yaml")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(stat.S_IRWXU)


def test_plan_to_dict_is_the_schema_shape():
    raw = _minimal()
    plan_file = plan_from_dict(copy.deepcopy(raw))
    assert plan_to_dict(plan_file) == raw
    assert schema_errors(raw) == []


def test_the_schema_names_the_keys_and_choices_validation_uses():
    """The schema file is written by hand (it documents the format for other tools); its keys and enums must be the
    ones planio.validate_plan_dict checks, which come from plan.py's constants."""
    from skipprofiler.plan import validate as planio
    from skipprofiler.plan.model import (APPLY_TO, BATCH_DECISIONS, COMPENSATIONS, DEFAULT_KEYS, MODES, NEURON_FILLS,
                                         ROUTER_POOLINGS)

    defs, props = SCHEMA["$defs"], SCHEMA["properties"]
    assert set(props) == set(planio.TOP_KEYS)
    assert set(props["model"]["properties"]["fingerprint"]["properties"]) == set(planio.FINGERPRINT_KEYS)
    assert set(props["router"]["properties"]) == set(planio.ROUTER_KEYS)
    assert props["router"]["properties"]["metric"]["enum"] == list(planio.ROUTER_METRICS)
    assert props["router"]["properties"]["pooling"]["enum"] == list(ROUTER_POOLINGS)
    assert set(defs["plan"]["properties"]) == set(planio.PLAN_KEYS)
    assert set(defs["plan"]["properties"]["linear"]["properties"]) == set(planio.LINEAR_KEYS)
    assert set(defs["plan"]["properties"]["neurons"]["properties"]) == set(planio.NEURON_KEYS)
    assert set(defs["plan"]["properties"]["neurons"]["required"]) == set(planio.NEURON_KEYS) - {"intermediate_size", "rank"}
    assert defs["plan"]["properties"]["neurons"]["properties"]["fill"]["enum"] == list(NEURON_FILLS)
    assert defs["plan"]["properties"]["mode"]["enum"] == list(MODES)
    assert defs["plan"]["properties"]["batch_decision"]["enum"] == list(BATCH_DECISIONS)
    assert set(defs["settings"]["properties"]) == set(DEFAULT_KEYS)
    assert defs["settings"]["properties"]["apply_to"]["enum"] == list(APPLY_TO)
    assert defs["settings"]["properties"]["compensation"]["enum"] == list(COMPENSATIONS)
