"""Neuron plans in the runtime (issue 27 item 4): the kept neurons permuted first in place, decode positions run the
FFN on weight views of the first k, prompts run whole; checked against a reference that zeroes the dropped neurons'
activations on the down projection's input (and adds the mean bias), independent of the runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import generate, left_padded, static_cache_decode, untouched
from tiny_models import tiny_model
from transformers import DynamicCache

from skipprofiler.arch.capture import down_weight
from skipprofiler.arch.compat import cache_in, cache_kwargs
from skipprofiler.arch.registry import OUTPUT_PROJECTIONS, resolve
from skipprofiler.plan.model import NeuronSubsets, PlanError, SkipPlan
from skipprofiler.runtime import apply_plan
from skipprofiler.runtime.checks import fit_problems

FAMILIES = ["llama", "phi3", "gemma2", "gpt2", "gpt_neox", "gptj", "falcon", "bloom", "opt", "olmo2", "granite"]


def down_of(site):
    if site.ffn is None:
        return site.fc2
    return next(m for n, m in site.ffn.named_modules() if n and n.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS)


def width_of(site) -> int:
    down = down_of(site)
    return int(down.in_features if hasattr(down, "in_features") else down.weight.shape[0])


def neuron_plan(model, share=0.7, fill="mean", layers=None, seed=0, rank=3, **kw) -> SkipPlan:
    """Keep a random `share` of every (or each listed) layer's neurons; a random mean bias with fill mean, and a
    random rank-`rank` map besides with fill map."""
    arch, rng = resolve(model), np.random.default_rng(seed)
    hidden = model.config.hidden_size
    tensors = {}
    for layer in range(arch.num_layers) if layers is None else layers:
        size = width_of(arch.sites[layer])
        tensors[f"{layer}.kept"] = np.sort(rng.choice(size, int(round(share * size)), replace=False)).astype(np.int64)
        if fill in ("mean", "map", "refit"):
            tensors[f"{layer}.bias"] = (rng.normal(size=hidden) * 0.05).astype(np.float32)
        if fill == "refit":  # the dropped neurons regressed on the kept ones, half precision as the fit stores it
            k = len(tensors[f"{layer}.kept"])
            tensors[f"{layer}.regression"] = (rng.normal(size=(size - k, k)) * 0.1).astype(np.float16)
        if fill == "map":
            k = len(tensors[f"{layer}.kept"])
            tensors[f"{layer}.map_in"] = (rng.normal(size=(rank, k)) / np.sqrt(k)).astype(np.float32)
            tensors[f"{layer}.map_out"] = (rng.normal(size=(hidden, rank)) * 0.3).astype(np.float32)
    return SkipPlan(mode="static", neurons=NeuronSubsets(fill, tensors, rank=rank if fill == "map" else None), **kw)


class NeuronReference:
    """The rule with hooks: at decode positions (absolute position >= prompt_len, decode index d) layer l's dropped
    neurons are zeroed on its down projection's input and the bias (and with fill map the map of the kept neurons'
    activations) is added to its output."""

    def __init__(self, model, plan: SkipPlan, prompt_len):
        self.plan, self.prompt_len = plan, prompt_len  # int, or per row
        self.masks: dict[int, torch.Tensor] = {}
        self.hooks = [model.register_forward_pre_hook(self.before, with_kwargs=True)]
        arch = resolve(model)
        for layer in plan.neurons.layers:
            down = down_of(arch.sites[layer])
            keep = torch.zeros(width_of(arch.sites[layer]))
            keep[torch.from_numpy(plan.neurons.kept(layer))] = 1.0
            bias = plan.neurons.bias(layer)
            bias = torch.from_numpy(bias) if bias is not None else None
            maps = plan.neurons.neuron_map(layer)
            kept = torch.from_numpy(plan.neurons.kept(layer))
            regression = plan.neurons.regression(layer)
            if regression is not None:  # what the refit adds over the model's own columns: W_D (B a_K)
                dropped = np.setdiff1d(np.arange(len(keep)), plan.neurons.kept(layer))
                maps = (regression.astype(np.float32), down_weight(down).detach().numpy()[:, dropped])
            self.hooks.append(down.register_forward_pre_hook(self.zero(layer, keep)))
            self.hooks.append(down.register_forward_hook(self.add(layer, bias, maps, kept)))

    def before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_in(kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        batch, seq = ids.shape
        start = torch.as_tensor(self.prompt_len).reshape(-1, 1).expand(batch, 1)
        d = past + torch.arange(seq)[None, :] - start  # [B, S]
        self.masks = {l: torch.tensor([[l in self.plan.narrowed_layers_at(int(x)) if x >= 0 else False for x in row]
                                       for row in d.tolist()]) for l in self.plan.neurons.layers}

    def zero(self, layer, keep):
        def hook(module, args):
            a = args[0]
            mask = self.masks[layer].reshape(*a.shape[:-1], 1)
            return (a * torch.where(mask, keep.to(a.dtype), torch.ones_like(keep, dtype=a.dtype)),)
        return hook

    def add(self, layer, bias, maps, kept):
        def hook(module, args, out):
            if bias is None:
                return out
            mask = self.masks[layer].reshape(*out.shape[:-1], 1)
            extra = bias.to(out.dtype)
            if maps is not None:  # the map reads the kept neurons' activations (args[0]: the dropped ones zeroed)
                m_in, m_out = (torch.from_numpy(m).to(out.dtype) for m in maps)
                extra = extra + args[0].reshape(*out.shape[:-1], -1)[..., kept] @ m_in.T @ m_out.T
            return out + torch.where(mask, extra, torch.zeros_like(extra))
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def reference_forward(model, plan, ids, start, **kw):
    ref = NeuronReference(model, plan, start)
    try:
        with torch.no_grad():
            return model(input_ids=ids, **kw).logits
    finally:
        ref.remove()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- exactness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_matches_the_zeroing_reference_and_remove_restores_bit_for_bit(family):
    model = tiny_model(family, num_layers=3)
    before, keys = params(model), list(model.state_dict())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = neuron_plan(model, 0.6, warmup_tokens=1, dense_every=4)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    expected = reference_forward(model, plan, ids, [4, 7])
    assert not torch.allclose(expected, dense, atol=1e-4)  # the plan changes the output: the comparison informs
    with apply_plan(model, plan) as handle:
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # really permuted
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # in place: no second copy
        with torch.no_grad():
            prompt_only = model(input_ids=ids).logits  # no decode position: the dense function
            with handle.decode_from([4, 7]):
                forced = model(input_ids=ids).logits
    torch.testing.assert_close(prompt_only, dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(forced, expected, rtol=0, atol=1e-5)
    assert list(model.state_dict()) == keys and untouched(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bloom", "opt"])
def test_a_map_fill_adds_the_map_of_the_kept_activations_at_decode_positions(family):
    model = tiny_model(family, num_layers=3)
    before = params(model)
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    plan = neuron_plan(model, 0.6, fill="map", rank=4)
    mean_only = neuron_plan(model, 0.6, fill="mean")  # same kept neurons and bias (same seed), no map
    expected = reference_forward(model, plan, ids, [4, 7])
    assert not torch.allclose(expected, reference_forward(model, mean_only, ids, [4, 7]), atol=1e-4)
    with apply_plan(model, plan) as handle, torch.no_grad(), handle.decode_from([4, 7]):
        forced = model(input_ids=ids).logits
    torch.testing.assert_close(forced, expected, rtol=0, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bloom", "opt"])
def test_a_refit_fill_folds_its_regression_into_the_kept_down_columns_at_decode_positions(family):
    model = tiny_model(family, num_layers=3)
    before = params(model)
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    plan = neuron_plan(model, 0.6, fill="refit")
    mean_only = neuron_plan(model, 0.6, fill="mean")  # same kept neurons and bias (same seed), the model's columns
    expected = reference_forward(model, plan, ids, [4, 7])
    assert not torch.allclose(expected, reference_forward(model, mean_only, ids, [4, 7]), atol=1e-4)
    with apply_plan(model, plan) as handle, torch.no_grad():
        with handle.decode_from([4, 7]):
            forced = model(input_ids=ids).logits
        generate(model, ids[:, :5], 4)
        stats = handle.stats()
    torch.testing.assert_close(forced, expected, rtol=0, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the folded columns (hidden x k) are held beside the model (stats say how much), the bias too
    hidden = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    held = sum(hidden * len(plan.neurons.kept(l)) + plan.neurons.bias(l).size for l in plan.neurons.layers)
    assert stats["plan_bytes"] == held * 4
    assert stats["model_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bloom", "opt"])
def test_generation_logits_equal_teacher_forced_logits_and_the_reference(family):
    """Decode steps (weight views of the first k neurons) equal the same sequence teacher-forced (mixed forwards:
    prompt rows whole, decode rows split by the rule), with whole-FFN skips at fractions mixed in."""
    model = tiny_model(family, num_layers=4)
    plan = neuron_plan(model, 0.5, layers=[0, 1, 2], warmup_tokens=2, dense_every=5, skip_layers={1: 0.5, 3: 1.0})
    prompt = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    steps = 14
    with apply_plan(model, plan) as handle:
        sequence, logits = generate(model, prompt, steps)
        gen = handle.stats()
    with apply_plan(model, plan) as handle, handle.decode_from(prompt.shape[1]), torch.no_grad():
        forced = model(input_ids=sequence[:, :-1]).logits[0, prompt.shape[1] - 1:]
        forced_stats = handle.stats()
    torch.testing.assert_close(forced, logits[:, 0], rtol=0, atol=1e-5)
    assert gen == forced_stats and gen["narrowed_rows"] > 0 and gen["rows_not_computed"] > 0
    narrowed = sum(len(plan.narrowed_layers_at(d)) for d in range(steps - 1))
    assert gen["narrowed_rows"] == narrowed


def test_generate_clients_match_the_reference():
    """Greedy on a left-padded batch, beams, sampling with a seed, use_cache=False, StaticCache: each equals the
    zeroing reference run the same way."""
    model = tiny_model("llama", num_layers=4)
    ids, mask = left_padded(batch=3, length=7)
    plan = neuron_plan(model, 0.5, warmup_tokens=1)
    clients = {"greedy": {}, "beams": {"num_beams": 3}, "no_cache": {"use_cache": False},
               "sample": {"do_sample": True, "top_k": 5}, "static_cache": {"cache_implementation": "static"}}
    for name, kw in clients.items():
        torch.manual_seed(0)
        ref = NeuronReference(model, plan, ids.shape[1])
        try:
            expected, expected_logits = generate(model, ids, 6, mask, **kw)
        finally:
            ref.remove()
        with apply_plan(model, plan) as handle:
            torch.manual_seed(0)
            got, got_logits = generate(model, ids, 6, mask, **kw)
            assert handle.stats()["narrowed_rows"] > 0, name
        assert torch.equal(got, expected), name
        torch.testing.assert_close(got_logits, expected_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_is_token_identical(assist):
    model = tiny_model("llama", num_layers=4)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    extra = ({"prompt_lookup_num_tokens": 3} if assist == "prompt_lookup"
             else {"assistant_model": tiny_model("llama", num_layers=2, seed=1)})
    plan = neuron_plan(model, 0.4)
    with apply_plan(model, plan):
        planned, _ = generate(model, ids, 10)
        assisted, _ = generate(model, ids, 10, **extra)
    assert torch.equal(assisted, planned)
    assert not torch.equal(planned, generate(model, ids, 10)[0])


def test_multi_turn_runs_the_new_prompt_whole():
    model = tiny_model("llama", num_layers=4)
    plan = neuron_plan(model, 0.5)
    turn1 = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    user2 = torch.randint(2, 90, (1, 7), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    results = []
    for applied in (True, False):
        ref = None if applied else NeuronReference(model, plan, turn1.shape[1])
        handle = apply_plan(model, plan) if applied else None
        with torch.no_grad():
            cache = DynamicCache()
            out1 = model.generate(turn1, **cache_kwargs(model, cache), **kw)
            prompt2 = torch.cat([out1, user2], 1)
            if ref is not None:
                ref.prompt_len = prompt2.shape[1]
            out2 = model.generate(prompt2, **cache_kwargs(model, cache), **kw)
        results.append((out1, out2))
        (handle or ref).remove()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ---- cost: no syncs, one graph, stats, memory -------------------------------------------------------------------------


def test_a_narrowed_decode_step_adds_no_host_sync_or_copy():
    from test_runtime_sync import decode_step_ops

    model = tiny_model("llama", num_layers=4)
    ops = decode_step_ops(model, neuron_plan(model, 0.5, layers=[1, 2]))
    forbidden = {"_local_scalar_dense", "lift_fresh", "_to_copy", "copy_", "nonzero", "sum", "index_select",
                 "index_copy", "tolist", "cat"}
    assert ops and not forbidden & set(ops), ops
    assert "mm" in ops or "addmm" in ops or "linear" in ops  # the narrowed projections, on views


@pytest.mark.parametrize("fill", ["mean", "refit"])
def test_a_narrowed_static_decode_step_is_one_graph_under_fullgraph_compile(fill):
    """(fill refit: its columns are folded at apply_plan, so no graph computes the fold)"""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", num_layers=3)
    ids = torch.randint(2, 90, (1, 5))
    plan = neuron_plan(model, 0.5, fill=fill, layers=[0, 1], skip_layers={2: 1.0}, warmup_tokens=1)

    def decode(forward):
        return static_cache_decode(model, forward, ids, steps=5)

    with apply_plan(model, plan) as handle:
        eager_tokens, eager_logits = decode(model)
        eager_stats = handle.stats()
        handle.reset_stats()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model.__call__, fullgraph=True, backend="eager")
        tokens, logits = decode(compiled)
        assert handle.stats() == eager_stats and eager_stats["narrowed_rows"] > 0
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not counters["graph_break"] and graphs <= 3  # prompt, dense decode, narrowed decode
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)


def test_stats_report_the_ffn_flops_saved_net_of_substitutes():
    model = tiny_model("llama", num_layers=4)
    hidden, size = model.config.hidden_size, model.config.intermediate_size
    plan = neuron_plan(model, 0.75, layers=[0, 1, 2], skip_layers={3: 1.0})
    ids = torch.randint(2, 90, (1, 5))
    with apply_plan(model, plan) as handle:
        generate(model, ids, 5)
        stats = handle.stats()
    k = int(round(0.75 * size))
    ffn = 3 * 2 * hidden * size  # gate, up, down
    per_position = 3 * ((size - k) * 6 * hidden - hidden) + ffn  # three narrowed layers, one skipped whole
    assert stats["decode_positions"] == 4 and stats["narrowed_rows"] == 12 and stats["rows_not_computed"] == 4
    assert stats["ffn_flops_saved_share"] == pytest.approx(per_position / (4 * ffn))


def test_stats_count_a_map_fill_as_spent_flops():
    model = tiny_model("llama", num_layers=2)
    hidden, size = model.config.hidden_size, model.config.intermediate_size
    plan = neuron_plan(model, 0.75, fill="map", rank=2)
    ids = torch.randint(2, 90, (1, 5))
    with apply_plan(model, plan) as handle:
        generate(model, ids, 5)
        stats = handle.stats()
    k = int(round(0.75 * size))
    ffn = 3 * 2 * hidden * size
    per_row = (size - k) * 6 * hidden - hidden - 2 * 2 * (k + hidden)  # dropped neurons less bias adds and the map
    assert stats["narrowed_rows"] == 8
    assert stats["ffn_flops_saved_share"] == pytest.approx(per_row / ffn)


def test_model_memory_is_unchanged_when_applied():
    model = tiny_model("llama", num_layers=4)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    with apply_plan(model, neuron_plan(model, 0.7)):
        assert sum(p.numel() * p.element_size() for p in model.parameters()) == nbytes
        assert sum(b.numel() * b.element_size() for b in model.buffers()) == buffers


# ---- what users see ---------------------------------------------------------------------------------------------------


def test_print_model_shows_the_narrowed_ffns():
    model = tiny_model("llama", num_layers=3)
    with apply_plan(model, neuron_plan(model, 0.5, layers=[1])):
        text = str(model)
    assert "skipprof: layer 1: keeps 24 of 48 neurons on decode, mean bias for the rest" in text
    assert "layer 0:" not in text


def test_plans_the_model_cannot_narrow_are_refused_in_one_line_each():
    moe = tiny_model("mixtral", num_layers=2)
    plan = SkipPlan(mode="static", neurons=NeuronSubsets("none", {"0.kept": np.arange(4), "1.kept": np.arange(4)}))
    problems = fit_problems(moe, plan)
    assert len(problems) == 1 and "mixtral cannot run part of an FFN (layers 0, 1" in problems[0]
    model = tiny_model("llama", num_layers=2)
    before = params(model)
    bad = SkipPlan(mode="static", neurons=NeuronSubsets("none", {"0.kept": np.array([1, 48]),
                                                                 "1.kept": np.array([2, 2])}))
    problems = fit_problems(model, bad)
    assert any("layer 0 keeps indices out of range (the FFN has 48 neurons" in p for p in problems)
    assert any("layer 1 keeps a neuron twice" in p for p in problems)
    with pytest.raises(PlanError):
        apply_plan(model, bad)
    assert untouched(model) and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
