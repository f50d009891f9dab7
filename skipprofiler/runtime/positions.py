"""Where decode positions start is read by the handle (runtime/handle.py); `cache_length` stays importable here for
skipprofiler.evaluation.blocks, which imports it from this module."""

from .handle import cache_length

__all__ = ["cache_length"]
