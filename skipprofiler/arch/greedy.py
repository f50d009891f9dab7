"""Greedy decoding with a KV cache: the one hand-written loop behind eval's greedy agreement and the decode benchmarks,
and the cached step the profiler's decode regime runs. torch, the standard library and `_compat` only, so every stage
(profile, fidelity, bench) may import it.
"""

from __future__ import annotations

from typing import Any

import torch

from .compat import cache_kwargs, cache_out


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward's output (a ModelOutput or a plain tuple)."""
    return output.logits if hasattr(output, "logits") else output[0]


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward takes keyword `name` (e.g. ``logits_to_keep``, ``position_ids``)."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def greedy_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any = None,
                **forward_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """One forward that fills the KV cache (`cache` None: the prompt forward); returns the greedy next token of each
    row ([B] long) and the cache to pass to the next step."""
    given = cache_kwargs(model, cache) if cache is not None else {}
    out = model(input_ids=input_ids, **given, use_cache=True, **forward_kwargs)
    return logits_of(out)[:, -1].argmax(-1), cache_out(out)


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[B, new_tokens] greedy continuation of unpadded [B, S] prompts: one prompt forward, then new_tokens - 1
    one-token forwards, logits for the last position only where the model allows it. No EOS stop, so continuations
    have comparable lengths (generated with a plan applied or not)."""
    kwargs = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    tokens: list[torch.Tensor] = []
    with torch.inference_mode():
        if new_tokens > 0:
            nxt, cache = greedy_step(model, input_ids, None, **kwargs)
            tokens.append(nxt)
        while len(tokens) < new_tokens:
            nxt, cache = greedy_step(model, nxt[:, None], cache, **kwargs)
            tokens.append(nxt)
    return torch.stack(tokens, 1) if tokens else input_ids.new_zeros((input_ids.shape[0], 0))
