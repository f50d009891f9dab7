"""Fixed-bin mergeable histograms (fine near cos = 1), exact moments and seeded priority reservoirs.

Bin convention (shared with every consumer of a profile): for edges e[0..B], a histogram has B + 2 counts:
index 0 = underflow (value < e[0]), index i in 1..B = [e[i-1], e[i]), index B + 1 = overflow (value >= e[-1]).
This is ``np.searchsorted(edges, v, side="right")`` / ``torch.bucketize(v, edges, right=True)``. For cosines the top
edge is 1.0, so the overflow bin holds the tokens whose cosine rounds to >= 1 (an FFN that changes nothing).
Quantiles interpolate linearly inside a bin; underflow/overflow mass sits at e[0] / e[-1].

Accumulation happens on the model's device (torch); the finished numbers are numpy arrays (see profile.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Piecewise-uniform cosine bins: (start, stop, step). Coarse where nothing interesting happens, 1e-4 wide near 1.
COSINE_PIECES: tuple[tuple[float, float, float], ...] = (
    (-1.0, 0.0, 0.1), (0.0, 0.9, 0.01), (0.9, 0.99, 0.001), (0.99, 1.0, 0.0001))
# Log-spaced bins for norm ratios: (log10 low, log10 high, bins per decade).
NORM_RATIO_LOG = (-4.0, 2.0, 100)
STREAM_GAIN_LOG = (-2.0, 2.0, 200)


def piecewise_edges(pieces: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    parts = [np.arange(round((stop - start) / step)) * step + start for start, stop, step in pieces]
    edges = np.concatenate(parts + [np.array([pieces[-1][1]])])
    return np.round(edges, 10)  # kill float drift so edges are exact decimals (0.9, 0.99, ...)


def log_edges(low: float, high: float, per_decade: int) -> np.ndarray:
    return 10.0 ** np.linspace(low, high, int(round((high - low) * per_decade)) + 1)


def binning_spec() -> dict[str, dict[str, Any]]:
    """The documented binning, per metric, as recorded in a profile header."""
    cosine = {"kind": "piecewise", "pieces": [list(p) for p in COSINE_PIECES]}
    return {
        "residual": cosine,
        "ffn_io": cosine,
        "norm_ratio": {"kind": "log10", "low": NORM_RATIO_LOG[0], "high": NORM_RATIO_LOG[1],
                       "per_decade": NORM_RATIO_LOG[2]},
        "stream_gain": {"kind": "log10", "low": STREAM_GAIN_LOG[0], "high": STREAM_GAIN_LOG[1],
                        "per_decade": STREAM_GAIN_LOG[2]},
    }


def edges_from_spec(spec: dict[str, Any]) -> np.ndarray:
    if spec["kind"] == "piecewise":
        return piecewise_edges(tuple(tuple(float(x) for x in p) for p in spec["pieces"]))
    if spec["kind"] == "log10":
        return log_edges(float(spec["low"]), float(spec["high"]), int(spec["per_decade"]))
    raise ValueError(f"unknown binning kind {spec['kind']!r}")


def default_edges() -> dict[str, np.ndarray]:
    return {metric: edges_from_spec(spec) for metric, spec in binning_spec().items()}


# ---------------------------------------------------------------------------------------------------------------
# Reading histograms (numpy; vectorised over leading axes)


def hist_quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> np.ndarray:
    """q-quantile of each histogram in `hist` (shape [..., B + 2]); NaN where a histogram is empty."""
    hist = np.asarray(hist, dtype=np.float64)
    lead = hist.shape[:-1]
    flat = hist.reshape(-1, hist.shape[-1])
    out = np.full(flat.shape[0], np.nan)
    cum = np.cumsum(flat, axis=1)
    for row in range(flat.shape[0]):
        total = cum[row, -1]
        if total <= 0:
            continue
        target = max(q * total, 1e-12)  # q = 0: the first non-empty bin's lower edge
        idx = int(np.searchsorted(cum[row], target, side="left"))
        if idx == 0:
            out[row] = edges[0]
        elif idx >= len(edges):
            out[row] = edges[-1]
        else:
            before = cum[row, idx - 1]
            frac = (target - before) / flat[row, idx]
            out[row] = edges[idx - 1] + frac * (edges[idx] - edges[idx - 1])
    return out.reshape(lead)


def hist_prob_above(hist: np.ndarray, edges: np.ndarray, threshold: float) -> np.ndarray:
    """P[value > threshold] for each histogram (shape [..., B + 2]), linear inside the bin holding the threshold."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum(axis=-1)
    j = int(np.searchsorted(edges, threshold, side="right"))  # histogram index of the bin holding `threshold`
    if j == 0:
        above = total  # below every edge: underflow values are unknown, count them as above
    elif j >= len(edges):
        above = np.zeros_like(total)
    else:
        lo, hi = edges[j - 1], edges[j]
        above = hist[..., j] * (hi - threshold) / (hi - lo) + hist[..., j + 1:].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, above / np.maximum(total, 1), np.nan)


def chan_merge(n_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, n_b: np.ndarray, mean_b: np.ndarray,
               m2_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge (count, mean, M2) of two disjoint samples (Chan et al.); works for numpy arrays and torch tensors."""
    n = n_a + n_b
    safe = np.maximum(n, 1) if isinstance(n, np.ndarray) else n.clamp(min=1)
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / safe
    m2 = m2_a + m2_b + delta * delta * n_a * n_b / safe
    return n, mean, m2


# ---------------------------------------------------------------------------------------------------------------
# Accumulating on the device


class MetricAccumulator:
    """Histograms, nonfinite counts and moments of several metrics, per (layer, class), on one device.

    `add` takes every layer of a batch at once: one bucketize + one bincount per metric. A (token, layer) pair is
    counted in the histograms and moments only if all metrics are finite there; `nonfinite[m]` counts the pairs where
    metric m is NaN/inf, `excluded` the pairs left out.
    """

    def __init__(self, edges: dict[str, np.ndarray], num_layers: int, num_classes: int, device: torch.device):
        self.metrics = tuple(edges)
        self.num_layers = num_layers
        self.num_classes = 0
        self.device = torch.device(device)
        # float32 boundaries: the metric values are float32, and bucketize wants matching dtypes.
        self.edges = {m: torch.as_tensor(e, dtype=torch.float32, device=self.device) for m, e in edges.items()}
        self.num_bins = {m: len(e) + 1 for m, e in edges.items()}
        self.hist: dict[str, torch.Tensor] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}
        self.count = torch.zeros(num_layers, 0, dtype=torch.int64, device=self.device)
        self.excluded = torch.zeros(num_layers, 0, dtype=torch.int64, device=self.device)
        self.tokens = torch.zeros(0, dtype=torch.int64, device=self.device)
        for m in self.metrics:
            self.hist[m] = torch.zeros(num_layers, 0, self.num_bins[m], dtype=torch.int64, device=self.device)
            self.nonfinite[m] = torch.zeros(num_layers, 0, dtype=torch.int64, device=self.device)
            self.mean[m] = torch.zeros(num_layers, 0, dtype=torch.float64, device=self.device)
            self.m2[m] = torch.zeros(num_layers, 0, dtype=torch.float64, device=self.device)
        self.ensure_classes(num_classes)

    def ensure_classes(self, num_classes: int) -> None:
        """Grow the class axis (classes can first appear late in a streamed corpus)."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return

        def grow(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=dim)

        for m in self.metrics:
            self.hist[m] = grow(self.hist[m], 1)
            self.nonfinite[m] = grow(self.nonfinite[m], 1)
            self.mean[m] = grow(self.mean[m], 1)
            self.m2[m] = grow(self.m2[m], 1)
        self.count = grow(self.count, 1)
        self.excluded = grow(self.excluded, 1)
        self.tokens = grow(self.tokens, 0)
        self.num_classes = num_classes

    def add(self, values: dict[str, torch.Tensor], classes: torch.Tensor) -> None:
        """values: metric -> [L, N] float32 for N real tokens; classes: [N] int64 class index per token."""
        L, C = self.num_layers, self.num_classes
        n_tokens = classes.numel()
        if n_tokens == 0:
            return
        self.tokens += torch.bincount(classes, minlength=C)
        group = (torch.arange(L, device=self.device)[:, None] * C + classes[None, :])  # [L, N]
        finite = {m: torch.isfinite(values[m]) for m in self.metrics}
        ok = finite[self.metrics[0]]
        for m in self.metrics[1:]:
            ok = ok & finite[m]
        groups_ok = group[ok]
        n_batch = torch.bincount(groups_ok, minlength=L * C)
        self.excluded += torch.bincount(classes, minlength=C)[None, :] - n_batch.view(L, C)
        n_old = self.count.view(-1).to(torch.float64)
        n_new = n_batch.to(torch.float64)
        for m in self.metrics:
            self.nonfinite[m] += torch.bincount(group[~finite[m]], minlength=L * C).view(L, C)
            v = values[m][ok]
            bins = torch.bucketize(v, self.edges[m], right=True)
            nb = self.num_bins[m]
            self.hist[m] += torch.bincount(groups_ok * nb + bins, minlength=L * C * nb).view(L, C, nb)
            v64 = v.to(torch.float64)
            batch_sum = torch.zeros(L * C, dtype=torch.float64, device=self.device).index_add_(0, groups_ok, v64)
            batch_mean = batch_sum / n_new.clamp(min=1)
            dev = v64 - batch_mean[groups_ok]
            batch_m2 = torch.zeros(L * C, dtype=torch.float64, device=self.device).index_add_(0, groups_ok, dev * dev)
            _, mean, m2 = chan_merge(n_old, self.mean[m].view(-1), self.m2[m].view(-1), n_new, batch_mean, batch_m2)
            self.mean[m] = mean.view(L, C)
            self.m2[m] = m2.view(L, C)
        self.count += n_batch.view(L, C)

    def numpy(self) -> dict[str, Any]:
        return {
            "hist": {m: self.hist[m].cpu().numpy() for m in self.metrics},
            "nonfinite": {m: self.nonfinite[m].cpu().numpy() for m in self.metrics},
            "mean": {m: self.mean[m].cpu().numpy() for m in self.metrics},
            "m2": {m: self.m2[m].cpu().numpy() for m in self.metrics},
            "count": self.count.cpu().numpy(),
            "tokens": self.tokens.cpu().numpy(),
        }


class PriorityReservoir:
    """A bounded uniform sample per class: every row gets a seeded random key, the K largest keys are kept.

    Merging two reservoirs = keeping the K largest keys of the union, which is exactly the reservoir of the union.
    """

    def __init__(self, capacity: int, num_classes: int, row_shapes: dict[str, tuple[int, ...]],
                 device: torch.device, generator: torch.Generator):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.generator = generator
        self.row_shapes = dict(row_shapes)
        self.num_classes = 0
        self.keys = torch.zeros(0, self.capacity, dtype=torch.float64, device=self.device)
        self.rows = {name: torch.zeros(0, self.capacity, *shape, dtype=torch.float32, device=self.device)
                     for name, shape in self.row_shapes.items()}
        self.ensure_classes(num_classes)

    def ensure_classes(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        self.keys = torch.cat([self.keys, torch.full((extra, self.capacity), -torch.inf, dtype=torch.float64,
                                                     device=self.device)])
        for name, shape in self.row_shapes.items():
            pad = torch.zeros(extra, self.capacity, *shape, dtype=torch.float32, device=self.device)
            self.rows[name] = torch.cat([self.rows[name], pad])
        self.num_classes = num_classes

    def add(self, classes: torch.Tensor, **rows: torch.Tensor) -> None:
        """classes: [N] class index per row; rows: name -> [N, *shape]."""
        if classes.numel() == 0 or self.capacity == 0:
            return
        keys = torch.rand(classes.numel(), dtype=torch.float64, device=self.device, generator=self.generator)
        for c in torch.unique(classes).tolist():
            pick = classes == c
            cand_keys = torch.cat([self.keys[c], keys[pick]])
            top = torch.topk(cand_keys, self.capacity).indices if cand_keys.numel() > self.capacity else \
                torch.argsort(cand_keys, descending=True)
            new_keys = torch.full((self.capacity,), -torch.inf, dtype=torch.float64, device=self.device)
            new_keys[:top.numel()] = cand_keys[top]
            self.keys[c] = new_keys
            for name in self.row_shapes:
                cand = torch.cat([self.rows[name][c], rows[name][pick].to(torch.float32)])
                self.rows[name][c, :top.numel()] = cand[top]

    def numpy(self) -> dict[str, np.ndarray]:
        """Rows sorted by descending key; `len` = valid rows per class; invalid slots have key -inf and zero rows."""
        keys = self.keys.cpu().numpy()
        valid = np.isfinite(keys)
        out = {name: np.where(valid.reshape(valid.shape + (1,) * len(self.row_shapes[name])),
                              t.cpu().numpy(), 0).astype(np.float32) for name, t in self.rows.items()}
        out["keys"] = keys
        out["len"] = valid.sum(axis=1).astype(np.int64)
        return out


def merge_reservoir(keys_a: np.ndarray, rows_a: dict[str, np.ndarray], keys_b: np.ndarray,
                    rows_b: dict[str, np.ndarray], capacity: int) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Top-`capacity` keys of the union of two single-class reservoirs (invalid keys are -inf)."""
    keys = np.concatenate([keys_a, keys_b])
    order = np.argsort(-keys, kind="stable")[:capacity]
    order = order[np.isfinite(keys[order])]
    out_keys = np.full(capacity, -np.inf)
    out_keys[:len(order)] = keys[order]
    out_rows = {}
    for name in rows_a:
        both = np.concatenate([rows_a[name], rows_b[name]])
        merged = np.zeros((capacity,) + both.shape[1:], dtype=np.float32)
        merged[:len(order)] = both[order]
        out_rows[name] = merged
    return out_keys, out_rows, len(order)
