"""Teacher-forced KL / ppl / top-1 math and greedy agreement primitives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from skipprofiler.evaluation.fidelity import (
    FidelityError,
    FidelitySums,
    TokenBatch,
    compare,
    compare_greedy,
    dense_reference,
    greedy_tokens,
    make_batches,
)


def _batch() -> TokenBatch:
    return make_batches([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [1, 2]], ["a", "b", "a"], prompt_len=2, pad_id=0,
                        batch_size=8)[0]


def test_make_batches_pads_right_and_drops_too_short_documents():
    batch = _batch()
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]]
    assert batch.classes == ["a", "b"]
    # decode positions >= prompt_len whose next token is real: 2..4 for the first row, 2 for the second
    assert batch.measured_mask().nonzero().tolist() == [[0, 2], [0, 3], [0, 4], [1, 2]]
    with pytest.raises(FidelityError, match="prompt_len \\+ 2"):
        make_batches([[1, 2, 3]], ["a"], prompt_len=2, pad_id=0, batch_size=4)


def _fixed_logits(seed: int, shape=(2, 6, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_compare_matches_hand_computed_kl_nll_and_top1():
    batch = _batch()
    dense, plan = _fixed_logits(1), _fixed_logits(2)
    ref = dense_reference(lambda b: dense, batch)
    sums = compare(ref, plan)
    mask = batch.measured_mask()
    p, q = F.log_softmax(dense[mask], -1), F.log_softmax(plan[mask], -1)
    kl = (p.exp() * (p - q)).sum(-1)
    targets = torch.tensor([8, 9, 10, 14])
    overall = sums.summary()
    assert overall["tokens"] == 4
    assert overall["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert overall["ppl"] == pytest.approx(math.exp(float(-q.gather(1, targets[:, None]).mean())), rel=1e-5)
    assert overall["ppl_dense"] == pytest.approx(math.exp(float(-p.gather(1, targets[:, None]).mean())), rel=1e-5)
    assert overall["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    # per class: rows of class "a" are the first three measured positions
    assert sums.summary("a")["kl_mean"] == pytest.approx(float(kl[:3].mean()), rel=1e-5)
    assert sums.summary("b")["tokens"] == 1


def test_identical_logits_give_zero_kl_and_full_agreement():
    batch = _batch()
    logits = _fixed_logits(3)
    summary = compare(dense_reference(lambda b: logits, batch), logits.clone()).summary()
    assert summary["kl_mean"] == 0.0 and summary["top1_agreement"] == 1.0
    assert summary["ppl"] == summary["ppl_dense"]


def test_sums_merge_equals_one_pass():
    batch = _batch()
    ref = dense_reference(lambda b: _fixed_logits(4), batch)
    one = compare(ref, _fixed_logits(5))
    two = FidelitySums()
    two.merge(compare(ref, _fixed_logits(5)))
    assert one.summary() == two.summary()


def test_non_finite_logits_are_errors_not_numbers():
    batch = _batch()
    ref = dense_reference(lambda b: _fixed_logits(6), batch)
    bad = _fixed_logits(7)
    bad[0, 3, 0] = float("nan")
    with pytest.raises(FidelityError, match="non-finite"):
        compare(ref, bad)
    with pytest.raises(FidelityError, match="non-finite"):
        dense_reference(lambda b: bad, batch)


def test_compare_greedy_agreement_and_first_divergence():
    cmp = compare_greedy([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert cmp.per_prompt_first_divergence == [2, 4]
    assert cmp.agreement == pytest.approx(7 / 8)
    assert cmp.first_divergence_mean == 3.0 and cmp.identical == 0.5
    with pytest.raises(FidelityError):
        compare_greedy([], [])


def test_greedy_tokens_match_generate():
    model = tiny_model("llama")
    prompt = [3, 14, 15, 9, 26]
    ours = greedy_tokens(model, [prompt], 6)[0]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_greedy_decode_of_a_batch_matches_generate():
    from skipprofiler.arch.greedy import greedy_decode

    model = tiny_model("llama")
    prompts = torch.tensor([[3, 14, 15, 9, 26], [2, 7, 18, 28, 1]])
    ref = model.generate(prompts, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)[:, 5:]
    assert torch.equal(greedy_decode(model, prompts, 5), ref)
    assert greedy_decode(model, prompts, 0).shape == (2, 0)


def test_eval_documents_accept_what_profile_accepts(tmp_path):
    """load_documents reads chat `messages` and named text / class columns as `skipprof profile` does."""
    from helpers import word_tokenizer, write_jsonl

    from skipprofiler.evaluation.fidelity import load_documents, token_windows

    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "w10 w11 w12"}],
                                                   "class": "qa"}])
    docs = load_documents(str(chats))
    tokens, classes = token_windows(word_tokenizer(chat=True), docs, window=16, per_class=None, min_len=1)
    assert tokens == [[2, 10, 11, 12, 3]] and classes == ["qa"]
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": "w5 w6", "topic": "a"}])
    assert [(d.text, d.cls) for d in load_documents(str(body), text_column="body", class_column="topic")] == [
        ("w5 w6", "a")]
    with pytest.raises(FidelityError, match="no text column"):
        load_documents(str(body))
    assert {d.cls for d in load_documents(None, split="heldout")} == {"fiction", "scripture", "docs", "code"}
