"""compensation mean_output: a skipped FFN's output replaced by its calibrated mean, exactly, on every family."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy_loop, static, untouched
from tiny_models import MODEL_TYPES, tiny_model

from skipprofiler.arch.compat import cache_in
from skipprofiler.evaluation.fidelity import dense_references, make_batches, measure_plan
from skipprofiler.fit.measure import SetEvaluator, ffn_output_means
from skipprofiler.plan.model import PlanError, PlanFile, SkipPlan
from skipprofiler.plan import dump_plan, load_plan, validate_plan_dict
from skipprofiler.fit.refine import refine_static
from skipprofiler.arch.registry import RESIDUAL_INSIDE, first_tensor, model_fingerprint, resolve
from skipprofiler.runtime import apply_plan

FAMILIES = [t for t in MODEL_TYPES if t != "bloom"]  # Bloom's FFN adds the residual itself: refused (tested below)


class MeanReference:
    """The obvious way: on decode forwards (one new token, non-empty cache), each planned FFN's output is replaced
    by the mean vector (a forward hook on the module that produces the FFN output)."""

    def __init__(self, model, plan: SkipPlan):
        self.decode = False
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for site in resolve(model).sites:
            if site.index in plan.skip_layers:
                mean = torch.tensor(plan.ffn_mean[site.index])
                self.handles.append(site.ffn_modules[-1].register_forward_hook(self._replace(mean)))

    def _pre(self, module, args, kwargs):
        cache = cache_in(kwargs)
        self.decode = cache is not None and cache.get_seq_length() > 0

    def _replace(self, mean):
        def fn(module, args, output):
            if not self.decode:
                return None
            out = first_tensor(output)
            filled = mean.to(out.dtype).expand_as(out).clone()
            return (filled,) + tuple(output[1:]) if isinstance(output, tuple) else filled
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def _means(model, scale: float = 0.5) -> dict[int, list[float]]:
    g = torch.Generator().manual_seed(3)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    return {l: (torch.randn(hidden, generator=g) * scale).tolist() for l in range(resolve(model).num_layers)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_mean_output_equals_the_replaced_ffn_output_reference(model_type):
    model = tiny_model(model_type, num_layers=4)
    plan = static([1, 2], compensation="mean_output", ffn_mean=_means(model))
    ids = torch.randint(2, 90, (2, 5))
    zeroed_logits, _ = _with(model, static([1, 2]), ids)
    reference = MeanReference(model, plan)
    ref_logits, ref_tokens = greedy_loop(model, ids, 6)
    reference.remove()
    logits, tokens = _with(model, plan, ids)
    assert (logits - ref_logits).abs().max().item() == 0.0 and torch.equal(tokens, ref_tokens)
    assert (logits - zeroed_logits).abs().max() > 0  # the mean really was added
    assert untouched(model)


def _with(model, plan, ids):
    pf = PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)}, global_plan=plan)
    with apply_plan(model, pf):
        return greedy_loop(model, ids, 6)


def test_mean_output_plans_are_validated_and_round_trip(tmp_path):
    model = tiny_model("llama", num_layers=4)
    means = _means(model)
    fp = model_fingerprint(model)
    plan = PlanFile(model={"name": "tiny", "fingerprint": fp},
                    global_plan=static([2], compensation="mean_output", ffn_mean={2: means[2]}))
    text = dump_plan(plan)
    assert load_plan(text).global_plan.ffn_mean == {2: pytest.approx(means[2])}
    assert dump_plan(load_plan(text)) == text
    with pytest.raises(PlanError, match="global plan.ffn_mean: needs a mean output for every layer the plan may skip; "
                                        "missing \\[1\\]"):
        with apply_plan(model, PlanFile(model=plan.model, global_plan=static(
                [1, 2], compensation="mean_output", ffn_mean={2: means[2]}))):
            pass
    import yaml

    raw = yaml.safe_load(text)
    raw["global"]["ffn_mean"] = {2: [0.0, 1.0]}
    assert any("has 2 numbers but the model's hidden size is" in p for p in validate_plan_dict(raw))
    raw["global"]["ffn_mean"] = {1: means[1]}  # the same rule holds in files: layer 2 is skipped, its mean missing
    assert any("ffn_mean: needs a mean output for every layer the plan may skip; missing [2]" in p
               for p in validate_plan_dict(raw))
    del raw["global"]["ffn_mean"]
    assert any("ffn_mean: is required with compensation: mean_output" in p for p in validate_plan_dict(raw))


def test_bloom_refuses_mean_output():
    model = tiny_model("bloom", num_layers=4)
    assert any(site.contribution == RESIDUAL_INSIDE for site in resolve(model).sites)
    plan = PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)},
                    global_plan=static([1], compensation="mean_output", ffn_mean=_means(model)))
    with pytest.raises(PlanError, match="not supported for bloom"):
        apply_plan(model, plan)


def test_refine_with_mean_output_measures_compensated_sets_and_keeps_only_skipped_means():
    model = tiny_model("llama", num_layers=6)
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(2, 96, (20,), generator=g).tolist() for _ in range(4)]
    refs = dense_references(model, make_batches(tokens, ["x"] * 4, prompt_len=6, pad_id=0, batch_size=8))
    means = ffn_output_means(model, refs)
    assert sorted(means) == list(range(6)) and len(means[0]) == model.config.hidden_size
    plan = refine_static(model, None, static({2: 1.0, 3: 0.5}, compensation="mean_output"), references=refs)
    assert sorted(plan.ffn_mean) == sorted(plan.skip_layers)
    sums, _ = measure_plan(model, refs, plan)
    assert sums.total_kl_mean() == pytest.approx(plan.fit["refined_kl"], rel=1e-5)
    plain = SetEvaluator(model, refs, static({}))(tuple(sorted(plan.skip_layers.items())))
    assert plain != pytest.approx(plan.fit["refined_kl"], rel=1e-6)  # the compensation changed the measurement
