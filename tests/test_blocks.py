"""Whole-block baselines (skipprofiler.evaluation.blocks): the ReplaceMe-style one replaces blocks by a fitted linear map at decode
positions only, the same way in teacher-forced and cached decode forwards."""

from __future__ import annotations

import torch
from helpers import greedy_loop, token_batches
from tiny_models import tiny_model

from skipprofiler.evaluation.blocks import ReplacedBlocks, fit_block_replacement


def test_replaced_blocks_change_decode_positions_only_and_agree_between_teacher_forcing_and_decoding():
    model = tiny_model("llama", num_layers=6)
    replacement = fit_block_replacement(model, token_batches(n_docs=10), count=2)
    assert 1 <= replacement.start <= 3 and replacement.layers == [replacement.start, replacement.start + 1]
    assert replacement.map.weight.shape == (32, 32) and replacement.map.record["tokens"] > 0
    ids = torch.randint(2, 90, (1, 5))
    dense_logits, _ = greedy_loop(model, ids, 4)
    with ReplacedBlocks(model, replacement) as replaced:
        logits, tokens = greedy_loop(model, ids, 4)  # the prompt forward is dense, each decode step replaced
        full = torch.cat([ids, tokens], 1)
        with replaced.decode_from(5), torch.no_grad():
            forced = model(input_ids=full).logits
    assert (logits - dense_logits).abs().max() > 1e-4
    with torch.no_grad():
        dense_forced = model(input_ids=full).logits
    assert torch.equal(forced[:, :5], dense_forced[:, :5])  # prompt positions untouched
    # logits[t] predicts the token after decode position 5 + t: teacher forcing sees the same inputs
    assert torch.allclose(forced[0, 5:9], logits[:, 0], atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
