"""Row families: the series name every eval row carries in `family` (docs/eval-schema.md), shared by the rows, the
figures' styles and the results tables. Named plans are their own family (the row name)."""

from __future__ import annotations

# Plans a sweep fits from the profile. Without refining, the fitted static row is FITTED_STATIC; with refining, the
# same plan is FITTED_STATIC_UNREFINED and its refined set FITTED_STATIC_REFINED.
FITTED_STATIC = "fitted static"
FITTED_STATIC_UNREFINED = "fitted static (unrefined)"
FITTED_STATIC_REFINED = "fitted static (refined)"
FITTED_ADAPTIVE = "fitted adaptive"
# Class plans, each held-out document routed to its own class's plan.
FITTED_STATIC_PER_CLASS = "fitted static per-class (routed by label)"
FITTED_STATIC_PER_CLASS_REFINED = "fitted static per-class (refined, routed by label)"
FITTED_ADAPTIVE_PER_CLASS = "fitted adaptive per-class (routed by label)"

# Baselines at the reference plan's realized skip ratio.
RANDOM_FFN = "random FFN"
CONTIGUOUS_WINDOW = "contiguous window"
PAPER_DEFAULTS = "FFN-SkipLLM paper defaults"
LLM_DROP = "LLM-Drop top-by-cosine"
SHORTGPT = "ShortGPT layer drop"
REPLACEME = "ReplaceMe-style linear blocks"

# References searched on the held-out windows themselves (not deployable).
ORACLE = "oracle static"
SEARCH_REFERENCE = "search reference"
