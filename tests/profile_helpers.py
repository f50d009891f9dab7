"""The one check that two profiles hold the same statistics (merging, sharding, device maps, file round trips)."""

from __future__ import annotations

import numpy as np

from skipprofiler.profile import METRICS, Profile

# Counts, histograms and non-finite counts are integers: exact. Means and m2 come from Chan's pairwise merge, whose
# order of additions differs from one pass over the same tokens, so they agree only to rounding: a few ulps per merge
# for means; m2 (sums of squared deviations, with a cancelling correction term) 100x looser. ATOL covers exact zeros.
MEAN_RTOL = 1e-12
M2_RTOL = 1e-10
ATOL = 1e-15


def assert_same_statistics(a: Profile, b: Profile) -> None:
    """Same classes, exactly the same counts and histograms, means and m2 equal up to merge rounding."""
    assert a.classes == b.classes
    assert np.array_equal(a.count, b.count) and np.array_equal(a.token_count, b.token_count)
    for m in METRICS:
        assert np.array_equal(a.hist[m], b.hist[m]), m
        assert np.array_equal(a.nonfinite[m], b.nonfinite[m]), m
        np.testing.assert_allclose(a.mean[m], b.mean[m], rtol=MEAN_RTOL, atol=ATOL, err_msg=m)
        np.testing.assert_allclose(a.m2[m], b.m2[m], rtol=M2_RTOL, atol=ATOL, err_msg=m)
