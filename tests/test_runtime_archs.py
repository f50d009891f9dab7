"""The runtime on every registered architecture: static exactness, bit-exact removal, empty plans, no FFN work."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    AdaptiveZeroedReference,
    ZeroedReference,
    decode_loop,
    generate,
    greedy_loop,
    quantile_tau_any,
    static,
    untouched,
)
from tiny_models import MODEL_TYPES, tiny_model
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

from skipprofiler.arch.compat import cache_kwargs
from skipprofiler.plan.model import SkipPlan
from skipprofiler.arch.registry import resolve
from skipprofiler.runtime import apply_plan


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_static_plan_equals_zeroed_reference_and_remove_restores(model_type):
    model = tiny_model(model_type, num_layers=4)
    plan = static({1: 1.0, 2: 0.5}, warmup_tokens=1, dense_every=4)
    ids = torch.randint(2, 90, (2, 5))
    dense_logits, _ = greedy_loop(model, ids, 8)
    ref = ZeroedReference(model, plan)
    ref_logits, ref_tokens = greedy_loop(model, ids, 8)
    ref_seq, _ = generate(model, ids, 8)
    ref.remove()
    with apply_plan(model, plan):
        logits, tokens = greedy_loop(model, ids, 8)
        seq, _ = generate(model, ids, 8)
        assert "skipprof: layer 1: static skip on decode" in repr(model)
    assert (logits - ref_logits).abs().max().item() == 0.0
    assert torch.equal(tokens, ref_tokens) and torch.equal(seq, ref_seq)
    assert (logits - dense_logits).abs().max() > 0  # the plan did something
    after, _ = greedy_loop(model, ids, 8)
    assert torch.equal(after, dense_logits)
    assert untouched(model)


class ParamUses(TorchFunctionMode):
    """Counts torch calls that touch any of the given parameters: the FFN's weights are used iff the FFN runs."""

    def __init__(self, params):
        super().__init__()
        self.ids = {id(p) for p in params}
        self.uses = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(id(a) in self.ids for a in (*args, *kwargs.values())):
            self.uses += 1
        return func(*args, **kwargs)


def decode_param_uses(model, ids, steps, params) -> int:
    """Uses of `params` during `steps` decode forwards (the prompt forward runs outside the counter)."""
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        with ParamUses(params) as counter:
            for _ in range(steps):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)
    return counter.uses


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_empty_plan_is_dense_and_skipped_ffns_do_no_work(model_type):
    model = tiny_model(model_type, num_layers=4)
    ids = torch.randint(2, 90, (2, 5))
    dense_logits, _ = greedy_loop(model, ids, 4)
    with apply_plan(model, static([])):
        empty_logits, _ = greedy_loop(model, ids, 4)
    assert torch.equal(empty_logits, dense_logits)
    sites = resolve(model).sites
    skipped_params = [p for m in sites[2].ffn_modules for p in m.parameters()]
    dense_params = [p for m in sites[1].ffn_modules for p in m.parameters()]
    assert decode_param_uses(model, ids, 4, skipped_params) > 0  # the counter sees a running FFN
    with apply_plan(model, static([2])):
        assert decode_param_uses(model, ids, 4, skipped_params) == 0
        assert decode_param_uses(model, ids, 4, dense_params) > 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_adaptive_matches_an_independent_reference_with_host_and_device_state(model_type):
    model = tiny_model(model_type, num_layers=6)
    ids = torch.randint(2, 90, (1, 5))
    plan = SkipPlan(mode="adaptive", tau=quantile_tau_any(model, ids, 8), cold_start=1, cold_end=1, max_skip=2,
                    warmup_tokens=1, dense_every=4)
    dense_logits, _ = decode_loop(model, ids, 10)
    ref = AdaptiveZeroedReference(model, plan)
    ref_logits, ref_tokens = decode_loop(model, ids, 10, ref)
    ref.remove()
    assert ref.skipped > 0 and not torch.equal(ref_logits, dense_logits)
    after, _ = decode_loop(model, ids, 10)
    assert torch.equal(after, dense_logits)  # the reference restored every weight
    for host in (True, False):
        with apply_plan(model, plan, host_state=host) as handle:
            logits, tokens = decode_loop(model, ids, 10)
            stats = handle.stats()
        assert torch.equal(tokens, ref_tokens), host
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert stats["decided_skips"] == ref.skipped
        assert stats["rows_not_computed"] == (ref.skipped if host else 0)  # device state masks: nothing saved


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_adaptive_host_and_device_state_agree(model_type):
    model = tiny_model(model_type, num_layers=6)
    ids = torch.randint(2, 90, (3, 5))
    plan = SkipPlan(mode="adaptive", tau=quantile_tau_any(model, ids[:1], 8), cold_start=1, cold_end=1,
                    max_skip=2)
    results = {}
    for host in (True, False):
        with apply_plan(model, plan, host_state=host) as handle:
            logits, tokens = greedy_loop(model, ids, 8)
            results[host] = logits, tokens, handle.stats()
    assert torch.equal(results[True][1], results[False][1])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    decided = ("decode_positions", "decided_skips", "decided_skip_ratio")
    assert [results[True][2][k] for k in decided] == [results[False][2][k] for k in decided]
    assert results[False][2]["rows_not_computed"] == 0  # device state masks skipped rows: the FFN ran on them
    assert results[True][2]["decided_skips"] > 0
