"""plan.py's rule -- which layers a static plan skips at decode index d -- is computed once (`SkipPlan.eligible`,
`fraction_pattern`) and every consumer agrees with it bit for bit: the runtime's decode step (generation), its
position-wise planner (teacher forcing: eval, refine, budgets), the fit's simulation and the vLLM plugin's masks."""

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from skipprofiler.fit.from_profile import eligible_positions, static_skip_ratio
from skipprofiler.plan.model import SkipPlan, fraction_pattern
from skipprofiler.runtime import apply_plan
from skipprofiler.runtime.positionwise import plan_forward
from skipprofiler.runtime.schedule import Kind, Rule, decode_step
from skipprofiler.integrations.vllm import fraction_masks

N = 10_000
FRACTIONS = {1: 0.7, 2: 0.6667, 3: 0.35, 4: 0.65, 5: 1.0}


def reference(plan: SkipPlan, d: int) -> set[int]:
    """The docstring's rule in plain Python floats (float64), written out here rather than imported."""
    if d < plan.warmup_tokens or (plan.dense_every > 0 and (d + 1) % plan.dense_every == 0):
        return set()
    return {l for l, f in plan.skip_layers.items() if f >= 1.0 or math.floor((d + 1) * f) > math.floor(d * f)}


def masks_of(per_index: list[set[int]]) -> dict[int, list[bool]]:
    return {l: [l in layers for layers in per_index] for l in FRACTIONS}


@pytest.mark.parametrize("warmup, dense_every", [(0, 0), (5, 0), (0, 6), (3, 4)])
def test_generated_teacher_forced_vllm_and_fit_masks_are_identical(warmup, dense_every):
    plan = SkipPlan(mode="static", skip_layers=dict(FRACTIONS), warmup_tokens=warmup, dense_every=dense_every)
    expected = masks_of([reference(plan, d) for d in range(N)])
    # generation: one decode step per index, the host path
    rule, cpu = Rule(plan, 6, {}), torch.device("cpu")
    generated = []
    for d in range(N):
        forward = decode_step([rule], [d], 1, cpu)
        generated.append({l for l, a in forward.actions.items() if a.kind is Kind.SKIP_ALL})
    assert masks_of(generated) == expected
    # teacher forcing: all N decode positions in one forward, the position-wise path
    forward = plan_forward([rule], [0], N, cpu, None)
    teacher = {l: forward.static_flags[l].tolist() for l in FRACTIONS}
    assert teacher == expected
    # vLLM: the plugin's masks from a tensor of decode indices (float64 on any device)
    by_fraction = fraction_masks(plan, torch.arange(N))
    assert {l: by_fraction[f].tolist() for l, f in FRACTIONS.items()} == expected
    # the fit's simulation counts the same skips
    d, eligible = eligible_positions(warmup, dense_every, N - warmup)
    assert eligible.tolist() == [plan.eligible(int(x)) for x in d]
    hits = sum(sum(expected[l][warmup:]) for l in FRACTIONS)
    assert static_skip_ratio(plan, 6, N - warmup) == hits / ((N - warmup) * 6)
    # scalars, numpy and torch give one answer
    for f in FRACTIONS.values():
        assert fraction_pattern(f, np.arange(N)).tolist() == fraction_pattern(f, torch.arange(N)).tolist() \
            == [bool(fraction_pattern(f, x)) for x in range(N)]


def test_float32_arithmetic_would_drift_where_the_rule_does_not():
    """The bug this rule fixed: an int64 tensor times a Python float is float32 in torch, and the pattern drifts."""
    d = torch.arange(N)
    float32 = (torch.floor((d + 1) * 0.7) > torch.floor(d * 0.7)).tolist()
    exact = [math.floor((x + 1) * 0.7) > math.floor(x * 0.7) for x in range(N)]
    assert float32 != exact and fraction_pattern(0.7, d).tolist() == exact


def test_generation_logits_equal_teacher_forced_logits_with_fractional_layers():
    """Greedy generation's per-step logits equal the same sequence teacher-forced with `decode_from`: eval (which
    teacher-forces) measures exactly the plan users generate with. Fractions 0.7 / 0.35 / 0.65 drifted from decode
    index 89 and 179 when the position-wise planner computed in float32."""
    model = tiny_model("llama", num_layers=6)
    plan = SkipPlan(mode="static", skip_layers={1: 0.7, 2: 0.35, 4: 0.65})
    prompt = torch.randint(2, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    steps = 200
    with apply_plan(model, plan) as handle, torch.no_grad():
        out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        generated = torch.stack(out.logits, dim=1)[0]  # [steps, vocab]: the logits of each generated token
        gen_stats = handle.stats()
    sequence = out.sequences
    with apply_plan(model, plan) as handle, handle.decode_from(prompt.shape[1]), torch.no_grad():
        forced = model(input_ids=sequence[:, :-1]).logits[0, prompt.shape[1] - 1:]
        forced_stats = handle.stats()
    assert forced.shape == generated.shape
    # the first generated token comes from the prompt pass; decode index d feeds logits row d + 1
    assert torch.equal(forced.argmax(-1), generated.argmax(-1))
    torch.testing.assert_close(forced, generated, rtol=0, atol=1e-4)
    skips = sum(len(plan.static_layers_at(d)) for d in range(steps - 1))
    assert gen_stats["decided_skips"] == forced_stats["decided_skips"] == skips
