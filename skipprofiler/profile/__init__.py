"""Profiles: per-layer FFN saturation statistics of one model on one corpus, in memory and on disk.

One module per concern:

- `data`: the `Profile` data model and its queries (layer statistics, quantiles, per-token samples);
- `fileformat`: the file behind `Profile.save/load`, safetensors arrays plus a JSON header (docs/profile-format.md);
- `merge`: `merge_profiles()`, the exact merge of profiles of disjoint corpora;
- `recorder`: `profile_model()`, which runs a model over labelled batches with the capture hooks;
- `recipe`: `profile_corpus()`, the whole stage (corpus, model, header, progress), exported as
  `skipprofiler.profile_corpus`.
"""

from __future__ import annotations

from .data import METRICS, REGIMES, Profile, ProfileError
from .fileformat import FORMAT, FORMAT_VERSION
from .merge import merge_profiles
from .recorder import ProfileSettings, ProgressEvent, package_versions, profile_model

__all__ = ["METRICS", "REGIMES", "FORMAT", "FORMAT_VERSION", "Profile", "ProfileError", "merge_profiles",
           "profile_model", "ProfileSettings", "ProgressEvent", "package_versions"]
