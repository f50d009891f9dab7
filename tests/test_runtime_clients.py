"""The runtime in generation clients beyond a plain loop: chat turns reusing a cache, assisted and prompt-lookup
decoding, hand-written verification, continuous batching; and the pure schedule against plan.py's rule."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from helpers import generate, static, static_cache_decode
from tiny_models import tiny_model
from transformers import DynamicCache

from skipprofiler.arch.compat import cache_kwargs
from skipprofiler.plan.model import SkipPlan
from skipprofiler.arch.registry import resolve
from skipprofiler.runtime import apply_plan
from skipprofiler.runtime.handle import forward_plan
from skipprofiler.runtime.schedule import Kind, Rule, first_decode_index


class RowCounter:
    """Rows each layer's FFN output projection processes (an FFN that is skipped processes none)."""

    def __init__(self, model):
        self.rows = {}
        self.hooks = [site.ffn.down_proj.register_forward_hook(self._hook(site.index))
                      for site in resolve(model).sites]

    def _hook(self, layer):
        def hook(module, args, out):
            self.rows[layer] = self.rows.get(layer, 0) + args[0].shape[:-1].numel()
        return hook

    def reset(self):
        self.rows = {}

    def remove(self):
        for h in self.hooks:
            h.remove()


def test_multi_turn_generate_with_a_reused_cache_runs_the_new_prompt_dense():
    model = tiny_model("llama", num_layers=4)
    counter = RowCounter(model)
    turn1 = torch.randint(2, 90, (1, 6))
    user2 = torch.randint(2, 90, (1, 7))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with apply_plan(model, static([1, 2])) as handle, torch.no_grad():
        cache = DynamicCache()
        out1 = model.generate(turn1, **cache_kwargs(model, cache), **kw)
        prompt2 = torch.cat([out1, user2], 1)
        cached = cache.get_seq_length()
        handle.reset_stats()
        counter.reset()
        out2 = model.generate(prompt2, **cache_kwargs(model, cache), **kw)
        stats = handle.stats()
    counter.remove()
    assert out2.shape[1] == prompt2.shape[1] + 5
    chunk = prompt2.shape[1] - cached  # turn 1's last token and the new user text
    assert chunk == 8
    assert counter.rows[0] == chunk + 4  # the dense layer: the chunk and 4 fed-back generated tokens
    assert counter.rows[1] == counter.rows[2] == chunk  # skipped layers ran on every prompt token, no decode token
    assert stats["decode_positions"] == 4 and stats["decided_skips"] == 8 == stats["rows_not_computed"]


def test_hand_loop_chat_turn_is_a_prompt_and_verifying_marks_decode_positions():
    model = tiny_model("llama", num_layers=4)
    counter = RowCounter(model)
    ids = torch.randint(2, 90, (1, 5))
    with apply_plan(model, static([2])) as handle, torch.no_grad():
        cache = DynamicCache()

        def forward(tokens):
            return model(input_ids=tokens, **cache_kwargs(model, cache), use_cache=True)

        out = forward(ids)
        for _ in range(3):
            out = forward(out.logits[:, -1:].argmax(-1))
        forward(torch.randint(2, 90, (1, 7)))  # the next user turn: a prompt chunk
        assert counter.rows[2] == 5 + 7 and handle.stats()["decode_positions"] == 3
        with handle.verifying():  # a speculative check of 3 drafted tokens: all decode positions
            forward(torch.randint(2, 90, (1, 3)))
        assert counter.rows[2] == 5 + 7 and counter.rows[1] == 5 + 3 + 7 + 3
        stats = handle.stats()
    counter.remove()
    assert stats["decode_positions"] == 6 and stats["decided_skips"] == 6


class MultiTokenForwards:
    """Counts forwards that feed several tokens to a non-empty cache (verification steps)."""

    def __init__(self, model):
        self.count = 0
        self.hook = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if ids is not None and ids.shape[1] > 1 and cache is not None and cache.get_seq_length() > 0:
            self.count += 1


# Adaptive: every non-cold layer's cosine passes tau -1, so the rule skips max_skip layers after each trigger.
ALWAYS_ADAPTIVE = SkipPlan(mode="adaptive", tau=[-1.0] * 4, cold_start=1, cold_end=0, max_skip=2, warmup_tokens=1)


def test_multi_turn_with_an_adaptive_plan_runs_the_new_prompt_dense():
    model = tiny_model("llama", num_layers=4)
    counter = RowCounter(model)
    turn1 = torch.randint(2, 90, (1, 6))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with apply_plan(model, ALWAYS_ADAPTIVE) as handle, torch.no_grad():
        cache = DynamicCache()
        out1 = model.generate(turn1, **cache_kwargs(model, cache), **kw)
        prompt2 = torch.cat([out1, torch.randint(2, 90, (1, 7))], 1)
        chunk = prompt2.shape[1] - cache.get_seq_length()
        handle.reset_stats()
        counter.reset()
        model.generate(prompt2, **cache_kwargs(model, cache), **kw)
        stats = handle.stats()
    counter.remove()
    # every layer ran on every token of the new prompt chunk; decode positions after the warm-up skipped layers 1-2
    assert all(counter.rows[layer] >= chunk for layer in range(4))
    assert counter.rows[1] == counter.rows[2] == chunk + 1  # + the warm-up position
    assert stats["decode_positions"] == 3 and stats["decided_skips"] == 2 * 3 == stats["rows_not_computed"]  # after warm-up


@pytest.mark.parametrize("mode", ["static", "adaptive"])
@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_is_token_identical_and_skips_as_planned(assist, mode):
    model = tiny_model("llama", num_layers=4)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    extra = ({"prompt_lookup_num_tokens": 3} if assist == "prompt_lookup"
             else {"assistant_model": tiny_model("llama", num_layers=2, seed=1)})
    dense, _ = generate(model, ids, 10)
    with apply_plan(model, static([])):
        assert torch.equal(generate(model, ids, 10, **extra)[0], dense)
    plan = static([1, 2], warmup_tokens=1) if mode == "static" else ALWAYS_ADAPTIVE
    with apply_plan(model, plan) as handle:
        planned, _ = generate(model, ids, 10)
        plain = handle.stats()
        handle.reset_stats()
        verify = MultiTokenForwards(model)
        assisted, _ = generate(model, ids, 10, **extra)
        verify.hook.remove()
        stats = handle.stats()
    assert verify.count > 0  # the client really verified several tokens per forward
    assert torch.equal(assisted, planned)
    assert not torch.equal(planned, dense)  # the plan changed the output, so equality above is informative
    # every fed-back position after warm-up skips both layers (rejected drafts are decode positions too)
    assert stats["decided_skips"] == 2 * stats["decode_positions"] >= plain["decided_skips"] > 0


def test_continuous_batching_is_refused_with_a_clear_error():
    model = tiny_model("llama", num_layers=4)
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no generate_batch")
    with apply_plan(model, static([1])):
        with pytest.raises(RuntimeError, match="continuous batching.*PagedAttentionCache"):
            model.generate_batch([[5, 6, 7]], max_new_tokens=3)
        with pytest.raises(RuntimeError, match="PagedAttentionCache"):
            model.init_continuous_batching()
    assert "init_continuous_batching" not in model.__dict__


def skipped_positions(forward, layer: int) -> set[int]:
    action = forward.actions.get(layer)
    if action is None or action.kind is Kind.DENSE:
        return set()
    if action.kind is Kind.SKIP_ALL:
        return set(range(forward.positions))
    return set(action.skip.nonzero().flatten().tolist())


def test_schedule_follows_plan_rule_at_every_position():
    """The schedule against plan.py's rule: every position, several plans, pasts, widths and prompt ends (one token
    per row takes the decode-step path when the rows agree, the per-position path otherwise)."""
    plans = [SkipPlan(mode="static", skip_layers={1: 1.0, 3: 0.5}, warmup_tokens=w, dense_every=e)
             for w, e in itertools.product((0, 2), (0, 3))]
    plans.append(SkipPlan(mode="static", skip_layers={2: 0.3}, apply_to="all"))
    for plan, past, seq, end in itertools.product(plans, (0, 1, 5, 9), (1, 3, 8), (0, 4, 6)):
        rule = Rule(plan, 4, {})
        first = first_decode_index([rule, rule], past, [end, end + 1], [0, 2])
        forward = forward_plan([rule, rule], first, seq, torch.device("cpu"), None)
        counted = decided = 0
        for b in range(2):
            origin = [0, 2][b] if plan.apply_to == "all" else [end, end + 1][b]
            for s in range(seq):
                d = past + s - origin
                expected = set(plan.static_layers_at(d)) if d >= 0 else set()
                got = {l for l in range(4) if forward is not None and b * seq + s in skipped_positions(forward, l)}
                assert got == expected, (plan, past, seq, end, b, s)
                counted += d >= 0 and d >= plan.warmup_tokens
                decided += len(expected)
        if forward is None:
            assert (counted, decided) == (0, 0), (plan, past, seq, end)
        else:
            assert (forward.counts.positions, forward.counts.decided) == (counted, decided), (plan, past, seq, end)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("mode", ["static", "adaptive_device"])
def test_compiled_forward_with_inductor_has_no_graph_breaks_and_matches_eager(mode, device):
    """StaticCache and ``torch.compile(model.__call__, fullgraph=True)`` (hooks included, as generate compiles):
    fullgraph raises on any graph break, so the static and device-state adaptive paths must trace whole."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", num_layers=3).to(device)
    ids = torch.randint(2, 90, (1, 5), device=device)
    plan = (static([1], warmup_tokens=1) if mode == "static"
            else SkipPlan(mode="adaptive", tau=[-1.0] * 3, cold_start=1, cold_end=0, max_skip=1, dense_every=3))

    def decode(forward):
        return static_cache_decode(model, forward, ids, steps=5)

    with apply_plan(model, plan, host_state=False) as handle:
        eager_tokens, eager_logits = decode(model)
        eager_stats = handle.stats()
        handle.reset_stats()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model.__call__, fullgraph=True, backend="inductor")  # as generate's auto-compile
        tokens, logits = decode(compiled)
        assert handle.stats() == eager_stats and eager_stats["decided_skips"] > 0
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not counters["graph_break"]
    assert graphs <= 3  # prompt, dense decode, skipping decode: no recompilation per position
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-4)



class TokenCollector:
    """A generate streamer that keeps what it is given (the prompt first, then each new token)."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        pass


@pytest.mark.parametrize("client", ["beam", "streamer", "static_cache"])
def test_generate_clients_match_the_zeroed_reference_and_an_empty_plan_is_dense(client):
    from helpers import ZeroedReference

    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (1, 6))
    plan = static({1: 1.0, 2: 0.5}, warmup_tokens=1)
    kw = {"beam": {"num_beams": 3}, "streamer": {}, "static_cache": {"cache_implementation": "static"}}[client]

    def run(**extra):
        if client == "streamer":
            extra["streamer"] = TokenCollector()
        seq, logits = generate(model, ids, 8, **kw, **extra)
        if client == "streamer":  # the streamer saw exactly the generated tokens
            assert torch.equal(torch.cat([c.reshape(1, -1) for c in extra["streamer"].chunks], 1), seq)
        return seq, logits

    dense, dense_logits = run()
    with apply_plan(model, static([])):
        assert torch.equal(run()[0], dense)
    if client == "static_cache":  # the reference reads a dynamic cache: compare with the plan on one instead
        with apply_plan(model, plan):
            expected = generate(model, ids, 8)[0]
    else:
        ref = ZeroedReference(model, plan)
        expected = run()[0]
        ref.remove()
    with apply_plan(model, plan) as handle:
        seq, logits = run()
        stats = handle.stats()
    assert torch.equal(seq, expected) and not torch.equal(logits, dense_logits)
    assert stats["decided_skips"] > 0 and stats["rows_not_computed"] == stats["decided_skips"]
    assert "generate" not in model.__dict__


def test_text_generation_pipeline_with_the_demo_model_and_a_shipped_plan():
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from skipprofiler import demo

    model = AutoModelForCausalLM.from_pretrained(demo.model_path(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo.model_path())
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_full_text=False)
    prompt = "It is a truth universally acknowledged"
    dense = generator(prompt, **kw)[0]["generated_text"]
    with apply_plan(model, static([])):
        assert generator(prompt, **kw)[0]["generated_text"] == dense
    with apply_plan(model, Path(__file__).parent.parent / "plans" / "demo-static-25.yaml") as handle:
        planned = generator(prompt, **kw)[0]["generated_text"]
        stats = handle.stats()
        plan = handle.plan
    expected = sum(len(plan.static_layers_at(d)) for d in range(11))  # 11 generated tokens are fed back
    assert stats["decided_skips"] == stats["rows_not_computed"] == expected > 0
    assert planned != dense  # the plan changed what the pipeline generated
