"""The fit stage: plans from a profile's statistics (`from_profile`), chosen by measured KL on calibration windows
(`refine`, over the searches of `search` and the cost of `measure`), with linear substitutes (`substitute`)."""

from .from_profile import FitError, FitResult, FitSettings

__all__ = ["FitSettings", "FitResult", "FitError"]
