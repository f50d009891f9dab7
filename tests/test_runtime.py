"""Runtime (`skipprofiler.apply_plan`): exactness against references, decode tracking, adaptive rule, classes, errors.

References are independent of the runtime: static skipping is compared with a model whose skipped FFNs have their
output weights zeroed on decode forwards (swapped in by a pre-hook that applies the plan's rule from plan.py), and
the adaptive rule with a hook-based re-implementation that reads h from the pre-FFN norm's input.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    AdaptiveReference,
    ZeroedReference,
    decisions,
    generate,
    greedy_loop,
    left_padded,
    output_weights,
    plan_file,
    pooled,
    quantile_tau,
    static,
    token_cos,
    untouched,
)
from tiny_models import tiny_model
from transformers import DynamicCache

from skipprofiler.arch.compat import cache_kwargs
from skipprofiler.fit.from_profile import simulate_adaptive
from skipprofiler.plan.model import PlanError, Router, SkipPlan
from skipprofiler.arch.registry import resolve
from skipprofiler.runtime import apply_plan

# ---- references -----------------------------------------------------------------------------------------------------


# ---- static plans ---------------------------------------------------------------------------------------------------


def test_static_hand_loop_matches_zeroed_reference_with_warmup_dense_every_and_fractions():
    model = tiny_model("llama", num_layers=6)
    plan = static({1: 1.0, 2: 0.5, 4: 1.0}, warmup_tokens=2, dense_every=3)
    ids = torch.randint(2, 90, (1, 5))
    ref = ZeroedReference(model, plan)
    ref_logits, ref_tokens = greedy_loop(model, ids, 12)
    ref.remove()
    with apply_plan(model, plan) as handle:
        logits, tokens = greedy_loop(model, ids, 12)
        stats = handle.stats()
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() == 0.0
    # 12 decode forwards (d = 0..11), warm-up 2 -> 10 counted; skipped = sum of |static_layers_at(d)|
    expected = sum(len(plan.static_layers_at(d)) for d in range(12))
    assert stats == {"decode_positions": 10, "num_layers": 6, "decided_skips": expected, "decided_skip_ratio": expected / 60,
                     "rows_not_computed": expected, "not_computed_ratio": expected / 60, "substitute_rows": 0,
                     "substitute_flops": 0.0, "narrowed_rows": 0, "ffn_flops_saved_share": expected / 60,
                     "plan_bytes": 0, "model_bytes": sum(t.numel() * t.element_size()
                                                         for t in (*model.parameters(), *model.buffers()))}
    assert expected > 0


def test_static_generate_greedy_batch_left_padding_matches_reference():
    model = tiny_model("llama", num_layers=4)
    plan = static([1, 2], warmup_tokens=1)
    ids, mask = left_padded()
    ref = ZeroedReference(model, plan)
    ref_seq, ref_scores = generate(model, ids, 6, mask)
    ref.remove()
    dense_seq, _ = generate(model, ids, 6, mask)
    with apply_plan(model, plan) as handle:
        seq, scores = generate(model, ids, 6, mask)
        stats = handle.stats()
    assert torch.equal(seq, ref_seq)
    assert (scores - ref_scores).abs().max().item() == 0.0
    assert not torch.equal(seq, dense_seq) or (scores - generate(model, ids, 6, mask)[1]).abs().max() > 0
    # generate feeds 5 decode forwards for 6 new tokens; 3 rows; warm-up 1 -> 4 counted per row
    assert stats["decode_positions"] == 12 and stats["decided_skips"] == 24


def test_static_generate_sampling_matches_reference():
    model = tiny_model("llama", num_layers=4)
    plan = static([2])
    ids = torch.randint(2, 90, (2, 4))
    ref = ZeroedReference(model, plan)
    torch.manual_seed(7)
    ref_seq, _ = generate(model, ids, 8, do_sample=True, top_k=0, temperature=1.0)
    ref.remove()
    with apply_plan(model, plan):
        torch.manual_seed(7)
        seq, _ = generate(model, ids, 8, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(seq, ref_seq)


def test_apply_to_all_equals_zeroed_weights_everywhere():
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (2, 6))
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for p in output_weights(zeroed, 1) + output_weights(zeroed, 3):
            p.zero_()
        expected = zeroed(input_ids=ids).logits
    with apply_plan(model, static([1, 3], apply_to="all")), torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max().item() == 0.0


def test_remove_restores_dense_logits_bit_exactly_and_leaves_nothing_behind():
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (2, 5))
    keys = list(model.state_dict())
    dense_logits, dense_tokens = greedy_loop(model, ids, 5)
    handle = apply_plan(model, static([1, 2]))
    skipped_logits, _ = greedy_loop(model, ids, 5)
    handle.remove()
    handle.remove()  # idempotent
    logits, tokens = greedy_loop(model, ids, 5)
    assert (skipped_logits - dense_logits).abs().max() > 0
    assert torch.equal(logits, dense_logits) and torch.equal(tokens, dense_tokens)
    assert list(model.state_dict()) == keys
    assert untouched(model)


def test_empty_plan_changes_nothing():
    model = tiny_model("llama", num_layers=4)
    ids, mask = left_padded()
    dense = generate(model, ids, 5, mask)
    with apply_plan(model, static([])) as handle:
        got = generate(model, ids, 5, mask)
        assert "skipprof" not in repr(model)
    assert torch.equal(got[0], dense[0]) and torch.equal(got[1], dense[1])
    assert handle.stats()["decided_skips"] == 0 and handle.stats()["decode_positions"] == 12


def test_hand_loop_with_the_deprecated_cache_name_is_detected():
    """Transformers 5.24 renamed `past_key_values` to `cache`; loops still using the old name must still skip."""
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (1, 5))
    cache = DynamicCache()
    with apply_plan(model, static([1, 2])) as handle, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(3):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert handle.stats() == {"decode_positions": 3, "num_layers": 4, "decided_skips": 6, "decided_skip_ratio": 0.5,
                              "rows_not_computed": 6, "not_computed_ratio": 0.5, "substitute_rows": 0,
                              "substitute_flops": 0.0, "narrowed_rows": 0, "ffn_flops_saved_share": 0.5,
                              "plan_bytes": 0, "model_bytes": sum(t.numel() * t.element_size()
                                                                  for t in (*model.parameters(), *model.buffers()))}

def test_skipped_ffns_are_not_executed():
    """Count the rows each FFN's output projection processes: a skipped FFN must not run at all on decode."""
    model = tiny_model("llama", num_layers=4)
    rows = {l: 0 for l in range(4)}

    def counter(layer):
        def hook(module, args, out):
            rows[layer] += args[0].shape[:-1].numel()
        return hook

    hooks = [resolve(model).sites[l].ffn.down_proj.register_forward_hook(counter(l)) for l in range(4)]
    ids = torch.randint(2, 90, (2, 5))
    with apply_plan(model, static([1, 3], warmup_tokens=2)):
        greedy_loop(model, ids, 6)
    for h in hooks:
        h.remove()
    prompt, decode = 2 * 5, 2 * 6
    assert rows[0] == rows[2] == prompt + decode
    assert rows[1] == rows[3] == prompt + 2 * 2  # prompt and the two warm-up tokens only


@pytest.mark.parametrize("length, starts, ffn_rows", [
    (40, [10, 30], 10 + 30),  # 80 positions: only the kept ones reach the FFN
    (8, [3, 6], 9),  # 16 positions, 9 running: a multi-position forward runs only the rows it keeps
    (8, [1, 2], 3),  # 16 positions, 3 running
])
def test_mixed_rows_run_the_ffn_on_kept_rows_only(length, starts, ffn_rows):
    """decode_from with per-row starts: rows at different decode indices, exact either way."""
    model = tiny_model("llama", num_layers=4)
    seen = []
    hook = resolve(model).sites[2].ffn.down_proj.register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
    ids = torch.randint(2, 90, (2, length))
    plan = static([2])
    starts = torch.tensor(starts)
    with apply_plan(model, plan) as handle, handle.decode_from(starts), torch.no_grad():
        got = model(input_ids=ids).logits
        stats = handle.stats()
    hook.remove()
    assert seen == [ffn_rows]
    decode = int((length - starts).sum())
    assert stats["decode_positions"] == decode and stats["decided_skips"] == decode
    masked = ffn_rows == 2 * length  # every row ran: skipped rows were masked, none saved
    assert stats["rows_not_computed"] == (0 if masked else decode)
    # reference: zero the FFN output at positions >= start per row (forward hook: exact, saves nothing)
    keep = (torch.arange(length)[None, :] < starts[:, None]).float()[..., None]
    ref_hook = resolve(model).sites[2].ffn.register_forward_hook(lambda m, a, o: o * keep)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    ref_hook.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_print_model_shows_planned_ffns():
    model = tiny_model("llama", num_layers=4)
    with apply_plan(model, static({2: 1.0, 3: 0.5})):
        text = repr(model)
        assert "skipprof: layer 2: static skip on decode" in text
        assert "skipprof: layer 3: static skip 0.5 of positions on decode" in text
        assert "layer 1:" not in text
    assert "skipprof" not in repr(model)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "adaptive"])
def test_compile_when_applied_before_compiling(mode):
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (2, 5))
    plan = static([1, 2], warmup_tokens=1) if mode == "static" else SkipPlan(
        mode="adaptive", tau=quantile_tau(model, ids[:1], 8), cold_start=1, cold_end=1, max_skip=2)
    with apply_plan(model, plan) as handle:
        eager_logits, eager_tokens = greedy_loop(model, ids, 5)
        eager_stats = handle.stats()
        handle.reset_stats()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")  # dynamo tracing (what decides correctness), no codegen
        logits, tokens = greedy_loop(compiled, ids, 5)
        assert handle.stats() == eager_stats and eager_stats["decided_skips"] > 0
    torch._dynamo.reset()
    assert torch.equal(tokens, eager_tokens)
    assert (logits - eager_logits).abs().max().item() == 0.0


def test_static_decode_compiles_to_one_graph_without_breaks():
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (1, 5))
    with apply_plan(model, static([1, 2])):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
            explained = torch._dynamo.explain(model)(input_ids=ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0


# ---- adaptive plans -------------------------------------------------------------------------------------------------


def test_adaptive_matches_reference_rule_bs1():
    model = tiny_model("llama", num_layers=8)
    ids = torch.randint(2, 90, (1, 6))
    plan = SkipPlan(mode="adaptive", tau=quantile_tau(model, ids, 16), cold_start=2, cold_end=1, max_skip=2,
                    warmup_tokens=2, dense_every=5)
    ref = AdaptiveReference(model, plan)
    ref_logits, ref_tokens = greedy_loop(model, ids, 16)
    ref.remove()
    assert ref.skipped > 0
    for host in (True, False):
        with apply_plan(model, plan, host_state=host) as handle:
            logits, tokens = greedy_loop(model, ids, 16)
            stats = handle.stats()
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max().item() == 0.0
        assert stats["decided_skips"] == ref.skipped and stats["decode_positions"] == 14


def test_adaptive_per_sequence_host_and_device_state_agree():
    model = tiny_model("llama", num_layers=8)
    ids, mask = left_padded(batch=4, length=8)
    plan = SkipPlan(mode="adaptive", tau=quantile_tau(model, ids[:1], 12, q=0.9), cold_start=1, cold_end=1, max_skip=3)
    results = {}
    for host in (True, False):
        with apply_plan(model, plan, host_state=host) as handle:
            seq, scores = generate(model, ids, 10, mask)
            results[host] = seq, scores, handle.stats()
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=1e-5)
    decided = ("decode_positions", "decided_skips", "decided_skip_ratio")
    assert [results[True][2][k] for k in decided] == [results[False][2][k] for k in decided]
    assert results[False][2]["rows_not_computed"] == 0  # device state masks skipped rows: the FFN ran on them
    assert 0 < results[True][2]["decided_skip_ratio"] < 3 / 8  # some positions triggered, not all
    # per sequence: each row alone takes the same decisions as inside the batch (its skips do not depend on others)
    per_row = 0
    for b in range(4):
        real = mask[b].bool()
        with apply_plan(model, plan) as handle:
            generate(model, ids[b:b + 1, real], 10)
            per_row += handle.stats()["decided_skips"]
    assert per_row == results[True][2]["decided_skips"]


@pytest.mark.parametrize("batch", [1, 4])
def test_adaptive_shared_batch_decision_matches_reference_rule(batch):
    model = tiny_model("llama", num_layers=8)
    ids, mask = left_padded(batch=batch, length=8)
    plan = SkipPlan(mode="adaptive", tau=quantile_tau(model, ids[:1], 12, q=0.3), cold_start=1, cold_end=1,
                    max_skip=3, warmup_tokens=1, dense_every=4)
    ref = AdaptiveReference(model, plan)
    ref_logits, ref_tokens = greedy_loop(model, ids, 12, mask)
    ref.remove()
    assert ref.skipped > 0
    for host in (True, False):
        with apply_plan(model, plan, host_state=host, batch_decision="shared") as handle:
            logits, tokens = greedy_loop(model, ids, 12, mask)
            stats = handle.stats()
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6 if host else 1e-5)
        assert stats["decided_skips"] == ref.skipped
    if batch == 1:  # one row: deciding together is deciding alone
        with apply_plan(model, plan) as handle:
            logits, tokens = greedy_loop(model, ids, 12, mask)
        assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


def test_adaptive_shared_padding_never_votes_and_columns_decide_apart():
    model = tiny_model("llama", num_layers=6)
    ids = torch.randint(2, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    plan = SkipPlan(mode="adaptive", tau=quantile_tau(model, ids[:1, :4], 8, q=0.5), cold_start=1, cold_end=1,
                    max_skip=2)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # row 1 is right-padded over the whole decode region: it follows row 0, never votes
    out = {}
    for host in (True, False):
        with apply_plan(model, plan, host_state=host, batch_decision="shared") as handle, handle.decode_from(4):
            with torch.no_grad():
                out[host] = model(input_ids=ids, attention_mask=mask).logits[0], handle.stats()
    with apply_plan(model, plan) as handle, handle.decode_from(4):  # row 0 alone, per sequence
        with torch.no_grad():
            alone = model(input_ids=ids[:1]).logits[0], handle.stats()
    assert alone[1]["decided_skips"] > 0
    for host in (True, False):
        torch.testing.assert_close(out[host][0], alone[0], rtol=0, atol=1e-5)
        assert decisions(out[host][1]) == decisions(alone[1])  # padding is not counted either


def test_plan_batch_decision_is_the_default_and_apply_plan_overrides_it():
    model = tiny_model("llama", num_layers=6)
    ids, mask = left_padded(batch=3, length=6)
    plan = SkipPlan(mode="adaptive", tau=quantile_tau(model, ids[:1], 8, q=0.3), cold_start=1, cold_end=1, max_skip=2)
    shared_plan = SkipPlan(**{**vars(plan), "batch_decision": "shared"})
    counts = {}
    for name, p, override in (("alone", plan, None), ("shared", plan, "shared"), ("plan", shared_plan, None),
                              ("override", shared_plan, "per_sequence")):
        with apply_plan(model, p, batch_decision=override) as handle:
            greedy_loop(model, ids, 8, mask)
            counts[name] = handle.stats()["decided_skips"]
    assert counts["plan"] == counts["shared"] != counts["alone"] == counts["override"]
    router = Router(layer=0, classes=["code"], centroids=[[1.0] * model.config.hidden_size])
    routed = plan_file(model, plan, classes={"code": shared_plan}, router=router)  # global per sequence, class shared
    with pytest.raises(PlanError, match="disagree on batch_decision"):
        apply_plan(model, routed, prompt_class="auto")
    assert untouched(model)
    apply_plan(model, routed, prompt_class="auto", batch_decision="shared").remove()


def test_batch_decision_is_validated_before_touching_the_model():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(ValueError, match="batch_decision must be one of per_sequence, shared"):
        apply_plan(model, SkipPlan(mode="static", skip_layers={1: 1.0}), batch_decision="batch")
    assert untouched(model)
    plan = SkipPlan(mode="adaptive", tau=[0.5] * 4, cold_start=1, cold_end=1, max_skip=1)
    with apply_plan(model, plan, batch_decision="shared") as handle:
        assert "decided per batch" in str(model) and "batch_decision=shared" in repr(handle)


def test_fit_simulation_of_the_adaptive_rule_equals_the_runtime_on_the_same_cosines():
    """fit.simulate_adaptive judges each token on its dense cosines; the runtime on the stream it computes. They agree:
    a token's one run starts before any of its FFNs is skipped, so every cosine the rule reads is a dense one."""
    model = tiny_model("llama", num_layers=8)
    prompt, length = 4, 28
    ids = torch.randint(2, 90, (1, length), generator=torch.Generator().manual_seed(3))
    cos = token_cos(model, ids)[prompt:]  # [decode positions, L], float32, read by hooks
    tau = []  # per layer, midway between two observed cosines near the 85th percentile: no value sits on it
    for l in range(cos.shape[1]):
        values = cos[:, l].sort().values
        near = int(len(values) * 0.85) - 3
        i = near + int((values[near + 1:near + 6] - values[near:near + 5]).argmax())
        tau.append(float((values[i] + values[i + 1]) / 2))
    plan = SkipPlan(mode="adaptive", tau=tau, cold_start=1, cold_end=1, max_skip=3)
    simulated, _ = simulate_adaptive(cos.numpy(), np.asarray(tau), 1, 1, 3)
    assert 0 < (simulated > 0).sum() < len(simulated)  # some tokens trigger, some do not
    for host in (True, False):
        per_token = []
        with apply_plan(model, plan, host_state=host) as handle, torch.no_grad():
            for t in range(prompt, length):  # one decode position per forward: the stats count that token alone
                handle.reset_stats()
                with handle.decode_from(t):
                    model(input_ids=ids[:, :t + 1])
                per_token.append(handle.stats()["decided_skips"])
        assert per_token == simulated.tolist(), host


def test_adaptive_teacher_forced_decode_from_matches_host_device():
    model = tiny_model("llama", num_layers=6)
    ids = torch.randint(2, 90, (3, 10))
    plan = SkipPlan(mode="adaptive", tau=quantile_tau(model, ids[:1, :4], 8), cold_start=1, cold_end=1, max_skip=2)
    out = {}
    for host in (True, False):
        with apply_plan(model, plan, host_state=host) as handle, handle.decode_from(torch.tensor([2, 4, 6])):
            with torch.no_grad():
                out[host] = model(input_ids=ids).logits, handle.stats()
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    assert decisions(out[True][1]) == decisions(out[False][1]) and out[True][1]["decode_positions"] == 8 + 6 + 4
    assert out[False][1]["rows_not_computed"] == 0 < out[True][1]["rows_not_computed"]  # device state masks rows


# ---- classes, router, compensation ----------------------------------------------------------------------------------


def test_prompt_class_selects_plan_and_unknown_class_lists_classes():
    model = tiny_model("llama", num_layers=4)
    pf = plan_file(model, static([1]), classes={"code": static([2]), "fiction": static([3])})
    with apply_plan(model, pf, prompt_class="code") as handle:
        assert handle.plan.skip_layers == {2: 1.0} and handle.chosen_classes == ["code"]
    with apply_plan(model, pf) as handle:
        assert handle.plan.skip_layers == {1: 1.0} and handle.chosen_classes is None
    with pytest.raises(PlanError, match="unknown prompt class 'poetry'.*code, fiction"):
        apply_plan(model, pf, prompt_class="poetry")
    assert untouched(model)


def test_auto_routes_each_row_to_its_class_plan():
    model = tiny_model("llama", num_layers=4)
    a, b = torch.randint(2, 40, (1, 6)), torch.randint(50, 90, (1, 6))
    router = Router(layer=1, classes=["code", "fiction"],
                    centroids=[pooled(model, a, 1)[0].tolist(), pooled(model, b, 1)[0].tolist()])
    pf = plan_file(model, static([]), classes={"code": static([2]), "fiction": static([3])}, router=router)
    batch = torch.cat([a, b, a])
    with apply_plan(model, pf, prompt_class="auto") as handle:
        logits, tokens = greedy_loop(model, batch, 5)
        assert handle.chosen_classes == ["code", "fiction", "code"]
        assert handle.chosen_class == "code" and handle.plan.skip_layers == {2: 1.0}
    for row, cls in ((0, "code"), (1, "fiction")):
        with apply_plan(model, pf, prompt_class=cls):
            row_logits, row_tokens = greedy_loop(model, batch[row:row + 1], 5)
        assert torch.equal(tokens[row:row + 1], row_tokens)
        torch.testing.assert_close(logits[:, row:row + 1], row_logits, rtol=0, atol=1e-5)
    # teacher forcing: the router sees only the prompt part (before start) via an early-exit pre-pass
    full = torch.cat([batch, tokens], 1)
    with apply_plan(model, pf, prompt_class="auto") as handle, handle.decode_from(6), torch.no_grad():
        model(input_ids=full)
        assert handle.chosen_classes == ["code", "fiction", "code"]


def test_auto_without_router_is_an_error():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(PlanError, match="router"):
        apply_plan(model, plan_file(model, static([1]), classes={"code": static([2])}), prompt_class="auto")


def test_norm_ratio_compensation_matches_hook_reference():
    model = tiny_model("llama", num_layers=4)
    gain = [1.0, 1.25, 0.9, 1.1]
    plan = static([1, 2], compensation="norm_ratio", norm_gain=gain, apply_to="all")
    ids = torch.randint(2, 90, (2, 5))
    arch, h, hooks = resolve(model), {}, []
    for l in (1, 2):
        hooks.append(arch.sites[l].layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, l=l: h.__setitem__(l, a[0])))
        hooks.append(arch.sites[l].ffn.register_forward_hook(lambda m, a, o, l=l: h[l] * (gain[l] - 1.0)))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for hk in hooks:
        hk.remove()
    with apply_plan(model, plan), torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max().item() == 0.0
    with apply_plan(model, static([1, 2], apply_to="all")), torch.no_grad():
        assert (model(input_ids=ids).logits - got).abs().max() > 0  # compensation changed something


def test_norm_ratio_unsupported_residual_form_is_a_clear_error():
    model = tiny_model("gemma2", num_layers=4)
    with pytest.raises(PlanError, match="norm_ratio is not supported for gemma2"):
        apply_plan(model, static([1], compensation="norm_ratio", norm_gain=[1.0] * 4))
    assert untouched(model)


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_fingerprint_mismatch_is_an_error_unless_not_strict():
    model = tiny_model("llama", num_layers=4)
    other = tiny_model("llama", num_layers=4, intermediate_size=64)
    pf = plan_file(other, static([1]))
    with pytest.raises(PlanError, match="fitted for another model.*strict=False"):
        apply_plan(model, pf)
    assert untouched(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_plan(model, pf, strict=False)
    assert any("another model" in str(w.message) for w in caught)
    handle.remove()


def test_second_plan_without_removing_first_is_an_error():
    model = tiny_model("llama", num_layers=4)
    handle = apply_plan(model, static([1]))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_plan(model, static([2]))
    handle.remove()
    apply_plan(model, static([2])).remove()
    assert untouched(model)


@pytest.mark.parametrize("plan, message", [
    (static([1, 7]), r"plan.skip_layers\[1\]: layer 7 is beyond the model's 4 layers"),
    (SkipPlan(mode="adaptive", tau=[0.9] * 3, max_skip=1), r"plan.tau: must have one entry per layer \(4\), got 3"),
    (static([1], compensation="norm_ratio"), "norm_gain"),
])
def test_plan_not_fitting_the_model_is_rejected_before_touching_it(plan, message):
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (1, 4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(PlanError, match=message):
        apply_plan(model, plan)
    assert untouched(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_yaml_path_is_loaded_through_planio(tmp_path):
    planio = pytest.importorskip("skipprofiler.plan.io")
    model = tiny_model("llama", num_layers=4)
    path = tmp_path / "plan.yaml"
    planio.save_plan(plan_file(model, static([2])), path)
    with apply_plan(model, path) as handle:
        assert handle.plan.skip_layers == {2: 1.0}


# ---- benchmark library ----------------------------------------------------------------------------------------------


def test_flop_count_matches_hand_count_and_ideal_speedup():
    from skipprofiler.arch.flops import token_flops
    from skipprofiler.evaluation.bench import run_flops, synthetic_model

    model = synthetic_model("llama-tiny")  # hidden 64, intermediate 128, 6 layers, 4 heads, vocab 512
    f = token_flops(model)
    assert f["ffn"] == 2 * 3 * 64 * 128 and f["attn_proj"] == 2 * 4 * 64 * 64
    assert f["lm_head"] == 2 * 64 * 512 and f["attn_per_position"] == 4 * 64 and f["layers"] == 6
    dense, plan = run_flops(model, batch=2, prompt_tokens=3, new_tokens=3, skipped_calls=5)
    per_layer = f["ffn"] + f["attn_proj"]
    prompt = 2 * (3 * 6 * per_layer + 6 * f["attn_per_position"] * 6 + f["lm_head"])
    decode = sum(2 * (6 * (per_layer + f["attn_per_position"] * ctx) + f["lm_head"]) for ctx in (4, 5))
    assert dense == pytest.approx(prompt + decode) and dense - plan == 5 * f["ffn"]


def test_benchmark_interleaves_arms_and_reports_medians():
    from skipprofiler.evaluation.bench import (
        Arm,
        benchmark_decode,
        middle_static_plan,
        synthetic_model,
    )

    model = synthetic_model("llama-tiny")
    plan = middle_static_plan(6, 0.25)
    assert sum(plan.skip_layers.values()) == pytest.approx(1.5)
    result = benchmark_decode(model, [Arm("static", plan)], batch=2, prompt_tokens=4, new_tokens=4, repeats=5)
    dense, arm = result.results
    assert dense.name == "dense" and len(dense.seconds) == len(arm.seconds) == 5
    assert arm.stats["decided_skip_ratio"] == pytest.approx(sum(len(plan.static_layers_at(d)) for d in range(3)) / 18)
    assert arm.ideal_speedup > 1.0
    rows = result.rows()
    assert rows[1]["speedup"] == pytest.approx(dense.median / arm.median)
    assert rows[1]["measured_over_ideal"] == pytest.approx(rows[1]["speedup"] / arm.ideal_speedup)
    assert "meas/ideal" in result.table()
    with pytest.raises(ValueError, match="repeats must be >= 5"):
        benchmark_decode(model, [Arm("static", plan)], repeats=3)


@pytest.mark.slow
def test_cli_bench_decode_writes_rows_and_rejects_bad_input(tmp_path, capsys):
    import json

    from skipprofiler._cli.main import main

    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode", "--model", "synthetic:llama-tiny", "--new-tokens", "3", "--prompt-tokens", "2",
              "--adaptive", "", "--static", "0.3", "--json", str(out)])
    assert exit_info.value.code in (0, None)
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["dense", "empty plan", "static 30%"]
    assert rows[2]["ideal_speedup"] > 1 and rows[2]["runs"] == 5
    for argv, message in ((["--repeats", "3"], "--repeats must be at least 5"),
                          (["--model", str(tmp_path)], "is not a model checkpoint: no config.json in it"),
                          (["--model", "synthetic:llama-tiny", "--adaptive", "0.2,x"], "comma-separated"),
                          (["--model", "synthetic:llama-tiny", "--dtype", "int4"], "unknown --dtype"),
                          (["--model", "synthetic:llama-tiny", "--batch-decision", "vote"], "unknown --batch-decision"),
                          (["--model", "synthetic:llama-tiny", str(tmp_path / "missing.yaml")], "plan file not found")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "decode", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_bench_decode_with_plan_files(tmp_path, capsys):
    planio = pytest.importorskip("skipprofiler.plan.io")
    import json

    from skipprofiler._cli.main import main
    from skipprofiler.evaluation.bench import synthetic_model

    tiny = synthetic_model("llama-tiny")
    good, foreign = tmp_path / "good.yaml", tmp_path / "foreign.yaml"
    planio.save_plan(plan_file(tiny, static([2, 3])), good)
    planio.save_plan(plan_file(tiny_model("llama", num_layers=4), static([2])), foreign)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode", str(good), "--model", "synthetic:llama-tiny", "--new-tokens", "3",
              "--prompt-tokens", "2", "--json", str(out)])
    assert exit_info.value.code in (0, None)
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["dense", "good"] and rows[1]["saved_ratio"] == pytest.approx(2 / 6)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode", str(foreign), "--model", "synthetic:llama-tiny"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "fitted for another model" in err and "Traceback" not in err


def test_generate_without_cache_skips_as_with_cache_and_bare_forwards_warn_once():
    import warnings as _warnings

    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (1, 6))
    with apply_plan(model, plan_file(model, static([1, 2]))) as handle:
        cached, _ = generate(model, ids, 4)
        with _warnings.catch_warnings():
            _warnings.simplefilter("error")  # inside generate the decode positions are known: no warning
            uncached, _ = generate(model, ids, 4, use_cache=False)
        assert torch.equal(uncached, cached) and handle.stats()["decided_skips"] > 0
        handle.reset_stats()
        with pytest.warns(UserWarning, match="use_cache=False"):
            model(ids, use_cache=False)
        assert handle.stats()["decided_skips"] == 0
        with _warnings.catch_warnings():
            _warnings.simplefilter("error")
            model(ids, use_cache=False)  # warned once already
            with handle.decode_from(4):  # teacher forcing marks decode positions: no warning, and it skips
                model(ids, use_cache=False)
        assert handle.stats()["decided_skips"] > 0
