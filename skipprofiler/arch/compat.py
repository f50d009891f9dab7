"""Transformers-version differences in one place (standard library only, so the runtime can use it).

Transformers 5.24 renamed the KV-cache forward argument and output field from ``past_key_values`` to ``cache`` and
deprecated the old name; earlier releases know only ``past_key_values``. Everything that feeds or reads a cache goes
through these helpers so that both work without deprecation warnings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE_KWARGS = ("cache", "past_key_values")  # newest first


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache a forward call was given (by either name), or None."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of forward kwargs that neither reads nor fills a cache."""
    out = dict(kwargs, use_cache=False)
    for name in CACHE_KWARGS:
        if name in out:
            out[name] = None
    return out


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward_owner: type) -> str:
    try:
        parameters = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name this model's forward takes."""
    return {_cache_kwarg_of(type(model)): cache}


def cache_out(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` or, before transformers 5.24, ``output.past_key_values``)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_KWARGS:
        if name in keys:
            return output[name]
    return None
