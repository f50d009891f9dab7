"""The runtime on a CUDA device (skipped without one): plans decode the same tokens as on the CPU, adaptive state
lives on the device by default (no per-layer host sync), and stats() counts masked rows as computed."""

from __future__ import annotations

import pytest
import torch
from helpers import generate
from tiny_models import tiny_model

from skipprofiler.plan.model import SkipPlan
from skipprofiler.runtime import apply_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STATIC = SkipPlan(mode="static", skip_layers={1: 1.0, 2: 0.5}, warmup_tokens=1)
# tau -1: every non-cold layer's cosine passes, so the rule skips max_skip layers after each trigger
ADAPTIVE = SkipPlan(mode="adaptive", tau=[-1.0] * 4, cold_start=1, cold_end=0, max_skip=2, warmup_tokens=1)


def _greedy(model, ids, new_tokens, plan=None, **apply_kwargs):
    """Greedy tokens (tests/test_runtime.generate) and the runtime's stats (None for dense)."""
    if plan is None:
        return generate(model, ids, new_tokens)[0], None
    with apply_plan(model, plan, **apply_kwargs) as handle:
        return generate(model, ids, new_tokens)[0], handle.stats()


@pytest.mark.parametrize("plan", [STATIC, ADAPTIVE], ids=["static", "adaptive"])
def test_a_plan_decodes_the_same_tokens_on_cuda_as_on_cpu(plan):
    cpu = tiny_model("llama", num_layers=4)
    gpu = tiny_model("llama", num_layers=4).cuda()
    ids = torch.randint(2, 90, (1, 6))
    cpu_tokens, cpu_stats = _greedy(cpu, ids, 12, plan)
    gpu_tokens, gpu_stats = _greedy(gpu, ids.cuda(), 12, plan)
    assert torch.equal(gpu_tokens.cpu(), cpu_tokens)
    assert gpu_stats["decided_skips"] == cpu_stats["decided_skips"] > 0
    dense_tokens, _ = _greedy(gpu, ids.cuda(), 12)
    empty_tokens, _ = _greedy(gpu, ids.cuda(), 12, SkipPlan(mode="static", skip_layers={}))
    assert torch.equal(empty_tokens, dense_tokens)


def test_device_state_adaptive_is_the_cuda_default_and_counts_masked_rows_as_computed():
    model = tiny_model("llama", num_layers=4).cuda()
    ids = torch.randint(2, 90, (2, 6), device="cuda")
    default_tokens, default_stats = _greedy(model, ids, 10, ADAPTIVE)
    device_tokens, device_stats = _greedy(model, ids, 10, ADAPTIVE, host_state=False)
    host_tokens, host_stats = _greedy(model, ids, 10, ADAPTIVE, host_state=True)
    assert default_stats == device_stats  # on CUDA the default keeps the state on the device
    assert torch.equal(device_tokens, host_tokens) and torch.equal(default_tokens, host_tokens)
    assert device_stats["decided_skips"] == host_stats["decided_skips"] > 0
    assert device_stats["rows_not_computed"] == 0  # device state masks rows: every FFN row still ran
    assert host_stats["rows_not_computed"] > 0  # host state gathers the rows that run: the rest are not computed
