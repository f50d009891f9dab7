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


def rounded(x: float) -> float:
    """A measurement as plan and profile records store it: 6 significant digits."""
    return float(f"{x:.6g}")
