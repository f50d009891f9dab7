"""compensation linear: the maps' statistics and closed-form fit, the plan artifact (safetensors beside the YAML),
and the runtime's substitute against an independent hook reference on every registered family."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from helpers import (
    LinearReference,
    greedy_loop,
    plan_file,
    random_maps,
    static,
    token_batches,
    untouched,
)
from tiny_models import MODEL_TYPES, tiny_model

from skipprofiler.evaluation.fidelity import measure_plan
from skipprofiler.plan.model import LinearMaps, PlanError
from skipprofiler.plan import load_plan, save_plan, weights_file_for
from skipprofiler.runtime import apply_plan
from skipprofiler.fit.substitute import (
    LayerStatistics,
    LinearStatistics,
    collect_statistics,
    fit_map,
    fit_substitutes,
)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_linear_substitute_equals_the_hook_reference_on_every_family(model_type):
    model = tiny_model(model_type, num_layers=4)
    maps = random_maps(model, [1, 2])
    ids = torch.randint(2, 90, (2, 5))
    reference = LinearReference(model, {1, 2}, maps)
    ref_logits, ref_tokens = greedy_loop(model, ids, 6)
    reference.remove()
    assert untouched(model)
    with apply_plan(model, plan_file(model, static([1, 2], compensation="linear", linear=maps))) as handle:
        logits, tokens = greedy_loop(model, ids, 6)
        stats = handle.stats()
    with apply_plan(model, plan_file(model, static([1, 2]))):
        plain_logits, _ = greedy_loop(model, ids, 6)
    assert (logits - ref_logits).abs().max().item() <= 1e-5 and torch.equal(tokens, ref_tokens)
    assert (logits - plain_logits).abs().max() > 1e-3  # the substitute really contributed
    assert stats["substitute_rows"] == 2 * 2 * 6  # two layers, two rows, six decode forwards
    assert untouched(model)


def test_low_rank_substitute_equals_its_product():
    model = tiny_model("llama", num_layers=4)
    maps = random_maps(model, [2], rank=3)
    ids = torch.randint(2, 90, (1, 4))
    reference = LinearReference(model, {2}, maps)
    ref_logits, _ = greedy_loop(model, ids, 5)
    reference.remove()
    with apply_plan(model, plan_file(model, static([2], compensation="linear", linear=maps))):
        logits, _ = greedy_loop(model, ids, 5)
    assert (logits - ref_logits).abs().max().item() <= 1e-5


def test_statistics_are_sums_and_add_exactly():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g)
    whole, a, b = (LinearStatistics.zeros(6, 6) for _ in range(3))
    whole.add(x, y)
    a.add(x[:20], y[:20])
    b.add(x[20:], y[20:])
    merged = a + b
    assert merged.n == whole.n == 50
    for name in ("sx", "sy", "xx", "xy"):
        assert torch.allclose(getattr(merged, name), getattr(whole, name), rtol=0, atol=1e-12)
    w, bias = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    direct = float(((y.double() - x.double() @ w - bias) ** 2).sum())
    assert whole.squared_error(w, bias) == pytest.approx(direct, rel=1e-10)


def test_fit_recovers_a_linear_function_and_reports_held_out_error():
    g = torch.Generator().manual_seed(2)
    a, c = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    stats = LayerStatistics(LinearStatistics.zeros(8, 8), LinearStatistics.zeros(8, 8))
    x = torch.randn(400, 8, generator=g) + 3.0
    stats.fit.add(x[:300], x[:300] @ a + c)
    stats.heldout.add(x[300:], x[300:] @ a + c)
    fitted = fit_map(stats, lambdas=(1e-8, 1e-1))
    assert fitted.record["lambda"] == 1e-8 and fitted.record["heldout_error"] < 1e-8
    assert np.allclose(fitted.weight, a.numpy(), atol=1e-4) and np.allclose(fitted.bias, c.numpy(), atol=1e-4)
    assert fitted.record["heldout_error_mean"] > 1e-3  # the mean output leaves the linear part unexplained
    low = fit_map(stats, rank=2)
    assert low.down.shape == (8, 2) and low.up.shape == (2, 8) and low.weight is None
    w = torch.from_numpy(low.dense_weight()).double()
    assert stats.heldout.squared_error(w, torch.from_numpy(low.bias).double()) > 10 * stats.heldout.squared_error(
        torch.from_numpy(fitted.weight).double(), torch.from_numpy(fitted.bias).double())  # rank 2 of 8 loses


def test_collected_statistics_cover_decode_positions_only_and_fit_a_useful_map():
    model = tiny_model("llama", num_layers=4)
    batches = token_batches()
    stats = collect_statistics(model, batches, [1, 2], validation_every=5)
    decode = sum(int((b.attention_mask.sum(1) - b.prompt_len).clamp(min=0).sum()) for b in batches)
    assert stats[1].total.n + stats[1].sinks == decode == 10 * 18
    assert stats[1].heldout.n + stats[1].sinks // 5 >= 2 * 18 - stats[1].sinks  # two of ten documents held out
    maps = fit_substitutes(model, batches, [1, 2])
    linear = static([1, 2], compensation="linear",
                    linear=LinearMaps(None, {k: v for l, m in maps.items() for k, v in m.tensors(str(l)).items()}))
    sums_linear, stats = measure_plan(model, _refs(model, batches), linear)
    sums_zero, _ = measure_plan(model, _refs(model, batches), static([1, 2]))
    assert sums_linear.total_kl_mean() < sums_zero.total_kl_mean()
    d = model.config.hidden_size
    assert stats["plan_bytes"] == 2 * (d * d + d) * 4  # two full-rank maps and their biases, float32, held beside


def _refs(model, batches):
    from skipprofiler.evaluation.fidelity import dense_references

    return dense_references(model, batches)


def test_positions_with_an_outsized_stream_norm_are_left_out_as_attention_sinks():
    model = tiny_model("llama", num_layers=3)
    batches = token_batches(n_docs=5)
    embed = model.get_input_embeddings()
    token = int(batches[0].input_ids[0, batches[0].prompt_len + 3])
    with torch.no_grad():
        embed.weight[token] *= 1000.0  # a massive-activation token, as an attention sink is
    occurrences = sum(int(((b.input_ids == token) & (torch.arange(b.input_ids.shape[1]) >= b.prompt_len)
                           & b.attention_mask.bool()).sum()) for b in batches)
    stats = collect_statistics(model, batches, [1])
    assert stats[1].sinks == occurrences >= 1


def test_linear_plans_save_their_maps_beside_the_yaml_and_refuse_missing_or_altered_files(tmp_path):
    model = tiny_model("llama", num_layers=4)
    plan = plan_file(model, static([1, 2], compensation="linear", linear=random_maps(model, [1, 2], rank=2)))
    path = save_plan(plan, tmp_path / "p.yaml")
    weights = weights_file_for(path)
    assert weights.name == "p.safetensors" and "    file: p.safetensors\n    sha256: " in path.read_text()
    loaded = load_plan(path)
    assert loaded.global_plan.linear.rank == 2
    for k, v in plan.global_plan.linear.tensors.items():
        assert np.array_equal(loaded.global_plan.linear.tensors[k], v)
    text, blob = path.read_text(), weights.read_bytes()
    save_plan(loaded, tmp_path / "p.yaml")  # re-export: byte-identical
    assert path.read_text() == text and weights.read_bytes() == blob
    assert hashlib.sha256(blob).hexdigest() in text
    with apply_plan(model, loaded):
        pass
    weights.write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(PlanError, match="was altered") as e:
        load_plan(path)
    assert len(e.value.problems) == 1
    weights.unlink()
    with pytest.raises(PlanError, match="is missing"):
        load_plan(path)


def test_linear_maps_are_checked_against_the_model_and_the_skipped_layers(tmp_path):
    model = tiny_model("llama", num_layers=4)
    maps = random_maps(model, [1])
    maps.tensors["1.weight"] = maps.tensors["1.weight"][:, :-1].copy()
    plan = plan_file(model, static([1, 2], compensation="linear", linear=maps))
    with pytest.raises(PlanError) as e:
        apply_plan(model, plan)
    text = "; ".join(e.value.problems)
    assert "no map for skipped layers [2]" in text and "weight has shape" in text
    assert untouched(model)


@pytest.mark.parametrize("client", ["padded_batch", "beam", "static_cache", "no_cache", "prompt_lookup"])
def test_linear_plans_in_generate_clients_match_the_reference(client):
    from helpers import generate, left_padded

    model = tiny_model("llama", num_layers=4)
    maps = random_maps(model, [1, 2])
    plan = plan_file(model, static([1, 2], compensation="linear", linear=maps))
    if client == "padded_batch":
        ids, mask = left_padded()
    else:
        ids, mask = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]]), None
    kw = {"padded_batch": {}, "beam": {"num_beams": 3}, "static_cache": {"cache_implementation": "static"},
          "no_cache": {"use_cache": False}, "prompt_lookup": {"prompt_lookup_num_tokens": 3}}[client]
    reference = LinearReference(model, {1, 2}, maps)
    expected = generate(model, ids, 6, mask)[0]  # a plain cached greedy run with the hook reference
    reference.remove()
    with apply_plan(model, plan) as handle:
        seq = generate(model, ids, 6, mask, **kw)[0]
        stats = handle.stats()
    if client != "beam":  # beam search explores other sequences; it must still run the substitutes
        assert torch.equal(seq, expected)
    assert stats["substitute_rows"] > 0 and stats["substitute_flops"] == stats["substitute_rows"] * (
        2 * 32 * 32 + 32)
    assert untouched(model)


def test_linear_decode_step_compiles_to_one_graph_without_breaks():
    from transformers import DynamicCache

    from skipprofiler.arch.compat import cache_kwargs

    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(2, 90, (1, 5))
    plan = plan_file(model, static([1, 2], compensation="linear", linear=random_maps(model, [1, 2], rank=4)))
    with apply_plan(model, plan):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
            explained = torch._dynamo.explain(model)(input_ids=ids[:, :1], **cache_kwargs(model, cache),
                                                     use_cache=True)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_class_maps_keep_the_global_set_and_fit_each_class_on_its_own_windows(tmp_path):
    from helpers import word_tokenizer, write_jsonl

    from skipprofiler.fit.refine import class_substitutes

    g = torch.Generator().manual_seed(9)
    records = [{"text": " ".join(f"w{int(t)}" for t in torch.randint(4 + 40 * c, 44 + 40 * c, (60,), generator=g)),
                "class": cls} for c, cls in enumerate(("low", "high")) for _ in range(12)]
    data = write_jsonl(tmp_path / "cal.jsonl", records)
    model, tokenizer = tiny_model("llama", num_layers=4), word_tokenizer()
    glob = static([1, 2], compensation="linear", linear=random_maps(model, [1, 2]))
    plans = plan_file(model, glob, classes={"low": glob, "high": glob})
    class_substitutes(model, tokenizer, plans, str(data))
    low, high = plans.classes["low"], plans.classes["high"]
    assert low.skip_layers == high.skip_layers == glob.skip_layers
    assert low.fit["substitutes"]["class"] == "low" and low.fit["substitutes"]["tokens"] > 0
    assert not np.array_equal(low.linear.tensors["1.weight"], high.linear.tensors["1.weight"])
    path = save_plan(plans, tmp_path / "pc.yaml")  # one weights file holds every plan's maps
    loaded = load_plan(path)
    assert np.array_equal(loaded.classes["high"].linear.tensors["2.bias"], high.linear.tensors["2.bias"])
    ids = torch.randint(44, 84, (2, 5))
    with apply_plan(model, loaded, prompt_class="high"):
        high_logits, _ = greedy_loop(model, ids, 3)
    with apply_plan(model, loaded, prompt_class="low"):
        low_logits, _ = greedy_loop(model, ids, 3)
    assert (high_logits - low_logits).abs().max() > 1e-4  # each class runs its own maps


def test_a_batch_routed_to_two_classes_runs_each_rows_own_maps():
    from helpers import pooled

    from skipprofiler.plan.model import Router

    model = tiny_model("llama", num_layers=4)
    a, b = torch.randint(2, 40, (1, 6)), torch.randint(50, 90, (1, 6))
    router = Router(layer=1, classes=["code", "fiction"],
                    centroids=[pooled(model, a, 1)[0].tolist(), pooled(model, b, 1)[0].tolist()])
    code = static([2], compensation="linear", linear=random_maps(model, [2], seed=1))
    fiction = static([2], compensation="linear", linear=random_maps(model, [2], seed=2))
    pf = plan_file(model, static([]), classes={"code": code, "fiction": fiction}, router=router)
    batch = torch.cat([a, b, a])
    with apply_plan(model, pf, prompt_class="auto") as handle:
        logits, tokens = greedy_loop(model, batch, 5)
        assert handle.chosen_classes == ["code", "fiction", "code"]
    for row, cls in ((0, "code"), (1, "fiction")):
        with apply_plan(model, pf, prompt_class=cls):
            row_logits, row_tokens = greedy_loop(model, batch[row:row + 1], 5)
        assert torch.equal(tokens[row:row + 1], row_tokens)
        torch.testing.assert_close(logits[:, row:row + 1], row_logits, rtol=0, atol=1e-5)
