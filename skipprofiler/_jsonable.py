"""The one JSON sanitizer for provenance (profile headers, plan `provenance`) and the one rounding of measurements in
records; standard library only."""

from __future__ import annotations

import math
from typing import Any


def jsonable(value: Any) -> Any:
    """A strict-JSON copy: keys as strings, tuples as lists, numpy/torch scalars and arrays as Python numbers and
    lists, non-finite floats as strings ("nan", "inf"), anything else (paths, ...) as its str()."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch scalars and arrays
        value = value.tolist()
        if isinstance(value, list):
            return jsonable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def rounded(x: Any, digits: int = 6, *, decimals: bool = False) -> Any:
    """The one rounding of numbers in records (plan `fit` and `provenance`, profile headers, the eval JSON): `digits`
    significant digits (6: every measurement), or with `decimals` `digits` decimal places (6: a plan's fitted floats,
    whose YAML stays short and byte-stable). Ints (counts), None and strings are returned as they are."""
    if x is None or isinstance(x, (int, str)):
        return x
    if decimals:
        return round(float(x), digits)
    return float(f"{x:.{digits}g}")
