"""The plans checked into `plans/`: valid for the bundled demo model, canonical, portable, and they realize the skip
ratio they promise on held-out text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skipprofiler import demo
from skipprofiler.evaluation.fidelity import (
    dense_references,
    load_documents,
    make_batches,
    measure_plan,
    pad_id_of,
    token_windows,
)
from skipprofiler.plan import dump_plan, load_plan
from skipprofiler.arch.registry import model_fingerprint

PLANS = sorted((Path(__file__).resolve().parent.parent / "plans").glob("demo-*.yaml"))  # smollm2-*: test_real_smollm2


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo.model_path(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo.model_path())


@pytest.fixture(scope="module")
def heldout_references(demo_model):
    model, tokenizer = demo_model
    docs = load_documents(None, split="heldout")
    tokens, classes = token_windows(tokenizer, docs, 128, 8, 34)
    batches = []  # one batch of 8 documents per class: the batch size the shared-decision plans are fitted for
    for cls in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == cls]
        batches += make_batches([tokens[i] for i in idx], [cls] * len(idx), 32, pad_id_of(tokenizer, model), 8)
    return dense_references(model, batches)


def test_the_repo_ships_static_adaptive_and_per_class_plans():
    names = {p.stem for p in PLANS}
    assert {f"demo-{mode}-{pct}" for mode in ("static", "adaptive") for pct in (10, 25, 35)} <= names
    assert {"demo-perclass-25", "demo-perclass-adaptive-25"} <= names
    assert {f"demo-adaptive-{pct}-batch8" for pct in (10, 25, 35)} <= names
    assert "demo-linear-25" in names and (PLANS[0].parent / "demo-linear-25.safetensors").is_file()


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_shipped_plan_validates_against_the_bundled_model_and_is_canonical(path, demo_model):
    model, _ = demo_model
    text = path.read_text()
    plan = load_plan(text, num_layers=model.config.num_hidden_layers, fingerprint=model_fingerprint(model),
                     base_dir=path.parent)  # linear maps are read beside the plan
    assert dump_plan(plan) == text  # checked in canonical form: a re-export diffs only where the plan changed
    corpus = plan.provenance.get("corpus") or []
    recorded = [entry.get("spec", "") for entry in corpus] + [f for entry in corpus for f in entry.get("files", [])]
    assert recorded and not any(Path(p).is_absolute() for p in recorded), recorded  # no machine-specific paths
    if plan.classes:
        assert set(plan.classes) == set(demo.CLASSES) and plan.router is not None


@pytest.mark.slow
@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_shipped_plan_realizes_its_expected_skip_ratio_on_heldout_text(path, demo_model, heldout_references):
    model, _ = demo_model
    plan = load_plan(path)
    if plan.global_plan.batch_decision == "shared":
        assert plan.global_plan.fit["batch_size"] == 8
    _, stats = measure_plan(model, heldout_references, plan)  # shared plans: the 8 rows of a batch decide together
    assert stats["decode_positions"] > 1000
    g = plan.global_plan
    if g.mode == "static" and not plan.classes:  # exact: the rule's layers at each decode index of each window
        decode_lengths = [int(n) - ref.batch.prompt_len for ref in heldout_references
                          for n in ref.batch.attention_mask.sum(1)]
        assert stats["decided_skips"] == sum(len(g.static_layers_at(d)) for n in decode_lengths for d in range(n))
    else:  # adaptive and routed plans: the fit's estimate on calibration text, realized on held-out text
        assert stats["decided_skip_ratio"] == pytest.approx(g.expected_skip_ratio, abs=0.03)
