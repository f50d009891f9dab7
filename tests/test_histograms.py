"""Binning, device accumulation, quantiles and reservoirs against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skipprofiler.profile.histograms import (
    MetricAccumulator,
    PriorityReservoir,
    binning_spec,
    default_edges,
    edges_from_spec,
    hist_prob_above,
    hist_quantile,
    merge_reservoir,
)


def test_cosine_edges_are_fine_near_one():
    edges = default_edges()["residual"]
    assert edges[0] == -1.0 and edges[-1] == 1.0 and np.all(np.diff(edges) > 0)
    widths = np.diff(edges)
    assert np.allclose(widths[edges[:-1] >= 0.99], 1e-4)
    assert np.allclose(widths[(edges[:-1] >= 0.9) & (edges[:-1] < 0.99)], 1e-3)
    assert np.sum((edges >= 0.9) & (edges <= 1.0)) == 191  # 90 + 100 bins in the interesting range
    assert 0.95 in edges and 0.99 in edges and 0.999 in edges


def test_edges_rebuild_from_the_recorded_spec():
    for metric, spec in binning_spec().items():
        assert np.array_equal(edges_from_spec(spec), default_edges()[metric])
    ratio = default_edges()["norm_ratio"]
    assert ratio[0] == pytest.approx(1e-4) and ratio[-1] == pytest.approx(100.0)
    assert np.allclose(np.diff(np.log10(ratio)), 0.01)


def _accumulate(values: dict[str, np.ndarray], classes: np.ndarray, chunks: int = 3) -> MetricAccumulator:
    edges = {m: default_edges()[m] for m in values}
    acc = MetricAccumulator(edges, values["residual"].shape[0], int(classes.max()) + 1, torch.device("cpu"))
    for part in np.array_split(np.arange(len(classes)), chunks):
        acc.add({m: torch.as_tensor(v[:, part], dtype=torch.float32) for m, v in values.items()},
                torch.as_tensor(classes[part]))
    return acc


def test_accumulator_matches_numpy_and_counts_nonfinite_apart():
    rng = np.random.default_rng(0)
    L, N = 3, 500
    cos = np.clip(0.97 + 0.02 * rng.standard_normal((L, N)), -1, 1).astype(np.float32)
    ratio = np.exp(rng.standard_normal((L, N))).astype(np.float32)
    cos[1, 7], ratio[2, 9], ratio[0, 11] = np.nan, np.inf, np.nan
    classes = rng.integers(0, 2, N)
    out = _accumulate({"residual": cos, "norm_ratio": ratio}, classes).numpy()
    ok = np.isfinite(cos) & np.isfinite(ratio)
    for m, v in (("residual", cos), ("norm_ratio", ratio)):
        edges32 = default_edges()[m].astype(np.float32)
        for l in range(L):
            for c in range(2):
                pick = ok[l] & (classes == c)
                x = v[l, pick]
                expected = np.bincount(np.searchsorted(edges32, x, side="right"), minlength=len(edges32) + 1)
                assert np.array_equal(out["hist"][m][l, c], expected)
                assert out["count"][l, c] == pick.sum()
                assert out["mean"][m][l, c] == pytest.approx(x.astype(np.float64).mean(), rel=1e-12)
                assert out["m2"][m][l, c] == pytest.approx(((x - x.astype(np.float64).mean()) ** 2).sum(), rel=1e-9)
    assert out["nonfinite"]["residual"].sum() == 1 and out["nonfinite"]["norm_ratio"].sum() == 2
    assert out["tokens"].tolist() == np.bincount(classes).tolist()


def test_quantiles_interpolate_inside_bins():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    hist = np.array([0, 10, 0, 10, 0])  # uniform on [0, 1) and [2, 3)
    assert hist_quantile(hist, edges, 0.25) == pytest.approx(0.5)
    assert hist_quantile(hist, edges, 0.75) == pytest.approx(2.5)
    assert hist_quantile(hist, edges, 0.0) == pytest.approx(0.0)
    assert hist_prob_above(hist, edges, 0.5) == pytest.approx(0.75)
    assert hist_prob_above(hist, edges, 2.9) == pytest.approx(0.05)
    assert np.isnan(hist_quantile(np.zeros(5), edges, 0.5))
    with_overflow = np.array([0, 0, 0, 0, 4])
    assert hist_quantile(with_overflow, edges, 0.5) == 3.0 and hist_prob_above(with_overflow, edges, 2.5) == 1.0


def test_quantiles_of_a_real_distribution_are_accurate_near_one():
    rng = np.random.default_rng(1)
    x = 1 - np.abs(0.01 * rng.standard_normal(20000))
    edges = default_edges()["residual"]
    hist = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
    for q in (0.1, 0.5, 0.9):
        assert hist_quantile(hist, edges, q) == pytest.approx(np.quantile(x, q), abs=2e-4)
    assert hist_prob_above(hist, edges, 0.99) == pytest.approx(np.mean(x > 0.99), abs=2e-3)


def _reservoir(capacity: int, seed: int) -> PriorityReservoir:
    return PriorityReservoir(capacity, 2, {"row": (3,)}, torch.device("cpu"), torch.Generator().manual_seed(seed))


def test_reservoir_keeps_the_largest_keys_and_is_bounded():
    res = _reservoir(5, 0)
    rows = torch.arange(60, dtype=torch.float32).reshape(20, 3)
    classes = torch.tensor([0] * 12 + [1] * 8)
    res.add(classes[:10], row=rows[:10])
    res.add(classes[10:], row=rows[10:])
    out = res.numpy()
    assert out["len"].tolist() == [5, 5] and out["row"].shape == (2, 5, 3)
    # Replay the generator: each class keeps the rows with its 5 largest keys, in descending key order.
    g = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.rand(10, dtype=torch.float64, generator=g), torch.rand(10, dtype=torch.float64,
                                                                                     generator=g)])
    for c in (0, 1):
        pick = (classes == c).nonzero().flatten()
        top = pick[keys[pick].topk(5).indices]
        assert np.array_equal(out["keys"][c], keys[top].numpy())
        assert np.array_equal(out["row"][c], rows[top].numpy())


def test_reservoir_merge_is_the_reservoir_of_the_union():
    """Keys fixed per row: merging two halves' reservoirs keeps exactly the union's top-K rows."""
    rng = np.random.default_rng(2)
    keys = rng.random(40)
    rows = rng.random((40, 3)).astype(np.float32)
    empty = np.full(6, -np.inf)
    zeros = {"row": np.zeros((6, 3), np.float32)}
    a_keys, a_rows, _ = merge_reservoir(empty, zeros, keys[:25], {"row": rows[:25]}, 6)
    b_keys, b_rows, _ = merge_reservoir(empty, zeros, keys[25:], {"row": rows[25:]}, 6)
    m_keys, m_rows, n = merge_reservoir(a_keys, a_rows, b_keys, b_rows, 6)
    top = np.argsort(-keys)[:6]
    assert n == 6 and np.array_equal(m_keys, keys[top]) and np.array_equal(m_rows["row"], rows[top])
    short_keys, _, n_short = merge_reservoir(empty, zeros, keys[:2], {"row": rows[:2]}, 6)
    assert n_short == 2 and np.isinf(short_keys[2:]).all()


def test_reservoir_is_seeded():
    rows = torch.rand(50, 3, generator=torch.Generator().manual_seed(5))
    classes = torch.zeros(50, dtype=torch.long)
    a, b, c = _reservoir(4, 7), _reservoir(4, 7), _reservoir(4, 8)
    for res in (a, b, c):
        res.add(classes, row=rows)
    assert np.array_equal(a.numpy()["row"], b.numpy()["row"])
    assert not np.array_equal(a.numpy()["row"], c.numpy()["row"])
