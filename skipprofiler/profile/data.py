"""The profile data model: per-layer FFN saturation statistics of one model on one corpus, and the queries on them.

Arrays are indexed [regime R, layer L, class C, ...]; docs/profile-format.md describes every one. Reading and
writing the file is `fileformat`, combining profiles `merge`, recording them from a model `recorder`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .histograms import chan_merge, hist_prob_above, hist_quantile
from .fileformat import ProfileError, read_profile_file, write_profile_file

METRICS = ("residual", "ffn_io", "norm_ratio", "stream_gain")
REGIMES = ("prompt", "decode")
DEFAULT_RESERVOIR = 4096
DEFAULT_DOC_RESERVOIR = 256


@dataclass
class Profile:
    """Histograms, moments and samples of the four metrics, per regime R, layer L and class C (docs/DESIGN.md)."""

    header: dict
    classes: list[str]
    edges: dict[str, np.ndarray]
    hist: dict[str, np.ndarray]  # metric -> int64 [R, L, C, B_m + 2]
    count: np.ndarray  # int64 [R, L, C] (token, layer) pairs with all metrics finite
    mean: dict[str, np.ndarray]  # metric -> float64 [R, L, C]
    m2: dict[str, np.ndarray]  # metric -> float64 [R, L, C]
    nonfinite: dict[str, np.ndarray]  # metric -> int64 [R, L, C]
    reservoir: np.ndarray  # float32 [R, C, K, L] residual cos per sampled token
    reservoir_gain: np.ndarray  # float32 [R, C, K, L] stream_gain per sampled token
    reservoir_len: np.ndarray  # int64 [R, C]
    reservoir_keys: np.ndarray  # float64 [R, C, K] (-inf = empty slot)
    router_layer: int
    doc_features: np.ndarray  # float32 [C, D, H]
    doc_len: np.ndarray  # int64 [C]
    doc_keys: np.ndarray  # float64 [C, D]
    token_count: np.ndarray | None = None  # int64 [R, C] real tokens seen (finite or not); derived when absent
    # Per-neuron FFN statistics (format version 2; None when not recorded): a = the down projection's input [.., N],
    # x = the FFN's input [.., H]; sums over the tokens counted in neuron_count.
    neuron_sum: np.ndarray | None = None  # float64 [R, L, C, N] sum of a_j
    neuron_sq: np.ndarray | None = None  # float64 [R, L, C, N] sum of a_j^2
    neuron_count: np.ndarray | None = None  # int64 [R, L, C] tokens counted (real, a and x finite)
    input_sq: np.ndarray | None = None  # float64 [R, L, C, H] sum of x_i^2

    def __post_init__(self) -> None:
        if self.token_count is None:
            worst = np.max(np.stack([self.nonfinite[m][:, 0, :] for m in self.nonfinite]), axis=0) \
                if self.nonfinite else 0
            self.token_count = (self.count[:, 0, :] + worst).astype(np.int64) if self.count.shape[1] else \
                np.zeros(self.count.shape[::2], np.int64)

    # ---------------------------------------------------------------- shape
    @property
    def num_layers(self) -> int:
        return int(self.count.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def regimes(self) -> list[str]:
        return list(REGIMES)

    @property
    def partial(self) -> bool:
        return bool(self.header.get("partial", False))

    def _r(self, regime: str) -> int:
        if regime not in REGIMES:
            raise ProfileError(f"unknown regime {regime!r}; regimes: {', '.join(REGIMES)}")
        return REGIMES.index(regime)

    def _c(self, cls: str | None) -> slice | list[int]:
        if cls is None:
            return slice(None)
        if cls not in self.classes:
            raise ProfileError(f"unknown class {cls!r}; the profile's classes: {', '.join(self.classes) or 'none'}")
        return [self.classes.index(cls)]

    def _metric(self, metric: str) -> str:
        if metric not in self.hist:
            raise ProfileError(f"unknown metric {metric!r}; metrics: {', '.join(self.hist)}")
        return metric

    # ---------------------------------------------------------------- queries
    def tokens(self, regime: str = "prompt", cls: str | None = None) -> int:
        return int(self.token_count[self._r(regime)][self._c(cls)].sum())

    def _pooled_hist(self, metric: str, regime: str, cls: str | None) -> np.ndarray:
        """[L, B + 2] histogram summed over the selected classes."""
        return self.hist[self._metric(metric)][self._r(regime)][:, self._c(cls)].sum(axis=1)

    def _pooled_moments(self, metric: str, regime: str, cls: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r, cols = self._r(regime), self._c(cls)
        counts = self.count[r][:, cols].astype(np.float64)
        means, m2s = self.mean[self._metric(metric)][r][:, cols], self.m2[metric][r][:, cols]
        n, mean, m2 = (np.zeros(self.num_layers), np.zeros(self.num_layers), np.zeros(self.num_layers))
        for c in range(counts.shape[1]):
            n, mean, m2 = chan_merge(n, mean, m2, counts[:, c], means[:, c], m2s[:, c])
        return n, mean, m2

    def layer_stats(self, metric: str = "residual", regime: str = "prompt", cls: str | None = None
                    ) -> dict[str, np.ndarray]:
        """Per layer: count, mean, std, p10, p50, p90 (NaN where no tokens)."""
        n, mean, m2 = self._pooled_moments(metric, regime, cls)
        hist, edges = self._pooled_hist(metric, regime, cls), self.edges[metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {"count": n.astype(np.int64), "mean": np.where(n > 0, mean, np.nan),
                   "std": np.where(n > 0, np.sqrt(np.maximum(m2, 0) / np.maximum(n, 1)), np.nan)}
        for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
            out[name] = hist_quantile(hist, edges, q)
        return out

    def quantile(self, q: float, metric: str, regime: str, layer: int, cls: str | None = None) -> float:
        return float(hist_quantile(self._pooled_hist(metric, regime, cls)[layer], self.edges[metric], q))

    def prob_above(self, threshold: float, metric: str, regime: str, layer: int, cls: str | None = None) -> float:
        return float(hist_prob_above(self._pooled_hist(metric, regime, cls)[layer], self.edges[metric], threshold))

    def _reservoir_rows(self, table: np.ndarray, regime: str, cls: str | None) -> np.ndarray:
        r = self._r(regime)
        if cls is not None:
            c = self._c(cls)[0]
            return table[r, c, :self.reservoir_len[r, c]]
        # All classes: the K largest keys of the union of the per-class samples is a uniform sample of all tokens.
        keys = np.concatenate([self.reservoir_keys[r, c, :self.reservoir_len[r, c]] for c in range(self.num_classes)]
                              ) if self.num_classes else np.zeros(0)
        rows = np.concatenate([table[r, c, :self.reservoir_len[r, c]] for c in range(self.num_classes)]
                              ) if self.num_classes else np.zeros((0, self.num_layers), np.float32)
        order = np.argsort(-keys, kind="stable")[:self.reservoir.shape[2]]
        return rows[order]

    def tokens_reservoir(self, regime: str, cls: str | None = None) -> np.ndarray:
        """[N, L] per-token `residual` cosines (a uniform sample of the class's tokens, or of all tokens)."""
        return self._reservoir_rows(self.reservoir, regime, cls)

    def gain_reservoir(self, regime: str, cls: str | None = None) -> np.ndarray:
        """[N, L] per-token `stream_gain`, rows aligned with `tokens_reservoir`."""
        return self._reservoir_rows(self.reservoir_gain, regime, cls)

    def documents(self, cls: str) -> np.ndarray:
        """[N, H] per-document mean hidden states (output of `router_layer`) of one class."""
        c = self._c(cls)[0]
        return self.doc_features[c, :self.doc_len[c]]

    # ---------------------------------------------------------------- per-neuron FFN statistics
    @property
    def has_neurons(self) -> bool:
        """Whether the profile holds per-neuron FFN statistics (`skipprof profile` records them for dense FFNs)."""
        return self.neuron_count is not None

    @property
    def num_neurons(self) -> int:
        """FFN intermediate width N (0 without neuron statistics)."""
        return int(self.neuron_sum.shape[-1]) if self.has_neurons else 0

    def _neuron_pool(self, table: np.ndarray | None, regime: str, layer: int | None, cls: str | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(sum over the selected classes [N] or [L, N], token count [] or [L, 1])."""
        if not self.has_neurons:
            raise ProfileError("this profile has no per-neuron FFN statistics (recorded with --no-neurons, for a "
                               "sparse-MoE model, or by skipprof before format version 2); re-profile the model")
        r, cols = self._r(regime), self._c(cls)
        if layer is not None and not -self.num_layers <= layer < self.num_layers:
            raise ProfileError(f"layer {layer} out of range: the profile has {self.num_layers} layers")
        rows = slice(None) if layer is None else layer
        total = table[r, rows][..., cols, :].sum(axis=-2)
        n = self.neuron_count[r, rows][..., cols].sum(axis=-1).astype(np.float64)
        return total, (n if layer is not None else n[:, None])

    def neuron_tokens(self, regime: str = "decode", layer: int = 0, cls: str | None = None) -> int:
        """Tokens behind the neuron statistics of one layer (real tokens whose activations were all finite)."""
        return int(self._neuron_pool(self.neuron_sum, regime, layer, cls)[1])

    def neuron_mean(self, regime: str = "decode", layer: int | None = None, cls: str | None = None) -> np.ndarray:
        """E[a_j]: mean intermediate activation (the down projection's input) per neuron; [N] for one layer, [L, N]
        for layer None; classes pooled for cls None (token-weighted). NaN where no tokens."""
        total, n = self._neuron_pool(self.neuron_sum, regime, layer, cls)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    def neuron_energy(self, regime: str = "decode", layer: int | None = None, cls: str | None = None) -> np.ndarray:
        """E[a_j^2] per neuron (times ||W_down[:, j]||^2 it is neuron j's mean output energy)."""
        total, n = self._neuron_pool(self.neuron_sq, regime, layer, cls)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    def neuron_variance(self, regime: str = "decode", layer: int | None = None, cls: str | None = None
                        ) -> np.ndarray:
        """Var[a_j] = E[a_j^2] - E[a_j]^2 per neuron (population variance, FLAP's fluctuation; >= 0)."""
        return np.maximum(self.neuron_energy(regime, layer, cls) - self.neuron_mean(regime, layer, cls) ** 2, 0.0)

    def input_sq_mean(self, regime: str = "decode", layer: int | None = None, cls: str | None = None) -> np.ndarray:
        """E[x_i^2] per input channel of the FFN (x = what the FFN reads); sqrt(count * this) is Wanda's ||x_i||."""
        total, n = self._neuron_pool(self.input_sq, regime, layer, cls)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    # ---------------------------------------------------------------- file (skipprofiler.profile.fileformat)
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees half a profile."""
        header = dict(self.header, classes=list(self.classes), router_layer=int(self.router_layer),
                      metrics=list(self.hist))
        return write_profile_file(path, header, to_tensors(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        header, tensors = read_profile_file(path)
        try:
            return _from_tensors(header, tensors)
        except (KeyError, ValueError, IndexError) as e:
            raise ProfileError(f"{path} is a damaged profile: {e}") from None


def to_tensors(p: Profile) -> dict[str, np.ndarray]:
    """The arrays of `p` under their file names, in their file dtypes."""
    out: dict[str, np.ndarray] = {}
    for m in p.hist:
        out[f"edges.{m}"] = np.ascontiguousarray(p.edges[m], dtype=np.float64)
        out[f"hist.{m}"] = np.ascontiguousarray(p.hist[m], dtype=np.int64)
        out[f"mean.{m}"] = np.ascontiguousarray(p.mean[m], dtype=np.float64)
        out[f"m2.{m}"] = np.ascontiguousarray(p.m2[m], dtype=np.float64)
        out[f"nonfinite.{m}"] = np.ascontiguousarray(p.nonfinite[m], dtype=np.int64)
    out["count"] = np.ascontiguousarray(p.count, dtype=np.int64)
    out["token_count"] = np.ascontiguousarray(p.token_count, dtype=np.int64)
    out["reservoir"] = np.ascontiguousarray(p.reservoir, dtype=np.float32)
    out["reservoir_gain"] = np.ascontiguousarray(p.reservoir_gain, dtype=np.float32)
    out["reservoir_len"] = np.ascontiguousarray(p.reservoir_len, dtype=np.int64)
    out["reservoir_keys"] = np.ascontiguousarray(p.reservoir_keys, dtype=np.float64)
    out["doc_features"] = np.ascontiguousarray(p.doc_features, dtype=np.float32)
    out["doc_len"] = np.ascontiguousarray(p.doc_len, dtype=np.int64)
    out["doc_keys"] = np.ascontiguousarray(p.doc_keys, dtype=np.float64)
    if p.has_neurons:
        out["neuron.sum"] = np.ascontiguousarray(p.neuron_sum, dtype=np.float64)
        out["neuron.sq"] = np.ascontiguousarray(p.neuron_sq, dtype=np.float64)
        out["neuron.count"] = np.ascontiguousarray(p.neuron_count, dtype=np.int64)
        out["neuron.input_sq"] = np.ascontiguousarray(p.input_sq, dtype=np.float64)
    return out


NEURON_TENSORS = ("neuron.sum", "neuron.sq", "neuron.count", "neuron.input_sq")


def _from_tensors(header: dict, t: dict[str, np.ndarray]) -> Profile:
    metrics = header.get("metrics") or list(METRICS)
    classes = [str(c) for c in header["classes"]]
    profile = Profile(
        header=header, classes=classes,
        edges={m: t[f"edges.{m}"] for m in metrics}, hist={m: t[f"hist.{m}"] for m in metrics},
        count=t["count"], mean={m: t[f"mean.{m}"] for m in metrics}, m2={m: t[f"m2.{m}"] for m in metrics},
        nonfinite={m: t[f"nonfinite.{m}"] for m in metrics}, reservoir=t["reservoir"],
        reservoir_gain=t["reservoir_gain"], reservoir_len=t["reservoir_len"], reservoir_keys=t["reservoir_keys"],
        router_layer=int(header["router_layer"]), doc_features=t["doc_features"], doc_len=t["doc_len"],
        doc_keys=t["doc_keys"], token_count=t.get("token_count"), neuron_sum=t.get("neuron.sum"),
        neuron_sq=t.get("neuron.sq"), neuron_count=t.get("neuron.count"), input_sq=t.get("neuron.input_sq"))
    present = [name for name in NEURON_TENSORS if name in t]
    if present and len(present) != len(NEURON_TENSORS):
        raise ValueError(f"neuron statistics incomplete: has {', '.join(present)} but not "
                         f"{', '.join(n for n in NEURON_TENSORS if n not in t)}")
    check_shapes(profile)
    return profile


def check_shapes(p: Profile) -> None:
    """Raise ValueError naming the first array whose shape disagrees with (R, L, C, K)."""
    R, L, C = p.count.shape
    K = p.reservoir.shape[2]
    if R != len(REGIMES) or C != len(p.classes):
        raise ValueError(f"count has shape {p.count.shape}, expected ({len(REGIMES)}, L, {len(p.classes)})")
    expect: dict[str, tuple[int, ...]] = {"reservoir": (R, C, K, L), "reservoir_gain": (R, C, K, L),
                                          "reservoir_len": (R, C), "reservoir_keys": (R, C, K),
                                          "token_count": (R, C), "doc_len": (C,)}
    if p.has_neurons:
        N, H = p.neuron_sum.shape[-1], p.input_sq.shape[-1]
        expect.update({"neuron.sum": (R, L, C, N), "neuron.sq": (R, L, C, N), "neuron.count": (R, L, C),
                       "neuron.input_sq": (R, L, C, H)})
    for m in p.hist:
        expect[f"hist.{m}"] = (R, L, C, len(p.edges[m]) + 1)
        for name in ("mean", "m2", "nonfinite"):
            expect[f"{name}.{m}"] = (R, L, C)
    tensors = to_tensors(p)
    for name, shape in expect.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name} has shape {tensors[name].shape}, expected {shape}")
    if p.doc_features.shape[:1] != (C,) or p.doc_keys.shape != p.doc_features.shape[:2]:
        raise ValueError(f"doc_features {p.doc_features.shape} / doc_keys {p.doc_keys.shape} do not match {C} classes")
