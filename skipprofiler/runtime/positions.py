"""Which positions of a forward are decode positions (plan.py's index d), from what the forward and its caller show.

* Inside ``model.generate`` (also pipelines, streamers, beam search, assisted and prompt-lookup decoding,
  ``use_cache=False``, a chat turn passing the previous turn's cache): the tokens generate was given are the prompt,
  every later position is decoded -- however the cache is filled or verified.
* ``decode_from(start)``: positions >= start[b] (teacher forcing, cache-less full-sequence forwards).
* Other forwards: an empty cache, or several new tokens on a non-empty one (the next turn of a chat), is a prompt;
  one new token per row is decoded; ``verifying()`` marks speculative verification forwards (several new tokens that
  are all decode positions).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch


class Positions:
    def __init__(self) -> None:
        self.decode_start: list[int] | None = None  # decode_from's starts, per row (or one for all)
        self._generate_prompt_end: int | None = None  # inside generate: the length of its input
        self._prompt_end: int | None = None  # outside generate: where the last prompt ended
        self._verifying = False
        self._warned_no_cache = False

    @contextlib.contextmanager
    def decode_from(self, start: int | torch.Tensor | Sequence[int]) -> Iterator[None]:
        if isinstance(start, torch.Tensor):
            start = start.tolist()
        previous = self.decode_start
        self.decode_start = [int(start)] if isinstance(start, int) else [int(s) for s in start]
        try:
            yield
        finally:
            self.decode_start = previous

    @contextlib.contextmanager
    def verifying(self) -> Iterator[None]:
        previous, self._verifying = self._verifying, True
        try:
            yield
        finally:
            self._verifying = previous

    def wrap_generate(self, original: Callable) -> Callable:
        """``model.generate`` that records its input length as the prompt end while it runs."""
        @functools.wraps(original)
        def generate(*args, **kwargs):
            outer, self._generate_prompt_end = self._generate_prompt_end, _input_length(args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self._generate_prompt_end = outer

        return generate

    def prompt_end(self, batch: int, seq: int, past: int, use_cache: Any) -> list[int]:
        """Per row, the first decode position of a forward feeding `seq` new tokens after `past` cached ones."""
        if self.decode_start is not None:
            starts = self.decode_start
            if len(starts) not in (1, batch):
                raise ValueError(f"decode_from got {len(starts)} start positions for a batch of {batch}")
            return starts * batch if len(starts) == 1 else list(starts)
        if self._generate_prompt_end is not None:
            end = self._generate_prompt_end
        elif past == 0 or (seq > 1 and not self._verifying):
            end = past + seq  # a prompt, or the next prompt chunk on a reused cache: dense
            if use_cache is False and not self._warned_no_cache:
                self._warned_no_cache = True  # once per handle
                warnings.warn("skipprofiler: a forward without a KV cache (use_cache=False) outside generate() looks "
                              "like a prompt, so its FFNs run dense and nothing is skipped; mark generated positions "
                              "with `with handle.decode_from(prompt_len):`", stacklevel=5)
        else:
            end = self._prompt_end if self._prompt_end is not None else past  # cache filled outside our view
        self._prompt_end = end
        return [end] * batch


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy tuple cache
        return int(cache[0][0].shape[-2]) if cache and cache[0] is not None else 0
    raise TypeError(f"skipprofiler: cannot read the decode position from a {type(cache).__name__} (it has no "
                    "get_seq_length); use a DynamicCache or StaticCache, or call handle.remove() first")


def _input_length(args: tuple, kwargs: dict) -> int | None:
    """The prompt length of a ``generate`` call: its input ids (or embeddings), previous turns included."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None,
                  kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > 0:
            return int(value.shape[1])
    return None


def refuse_continuous_batching(*args, **kwargs):
    raise RuntimeError("skipprofiler: continuous batching (generate_batch / init_continuous_batching with its "
                       "PagedAttentionCache) is not supported: its packed forwards carry no decode positions the "
                       "runtime reads, so the plan would run dense. Use generate(), or call handle.remove() first.")
