"""Profiles: per-layer FFN saturation statistics of one model on one corpus, in memory and on disk.

`profile_model()` runs a model over labelled batches with the capture hooks and returns a `Profile`;
`Profile.save/load` read and write the file format (safetensors tensors + a JSON header in the safetensors metadata,
documented in docs/profile-format.md); `merge_profiles()` combines profiles of disjoint corpora exactly.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ._jsonable import jsonable
from .atomic import atomic_path
from .capture import FFNCapture, LayerTensors
from .corpus import Batch
from .greedy import accepts, greedy_step
from .histograms import (MetricAccumulator, PriorityReservoir, binning_spec, chan_merge, default_edges,
                         hist_prob_above, hist_quantile, merge_reservoir)
from .registry import model_fingerprint, resolve

METRICS = ("residual", "ffn_io", "norm_ratio", "stream_gain")
REGIMES = ("prompt", "decode")
FORMAT = "skipprof-profile"
FORMAT_VERSION = 1
DEFAULT_RESERVOIR = 4096
DEFAULT_DOC_RESERVOIR = 256


class ProfileError(ValueError):
    """A profile cannot be read, merged or queried; the message is one line."""


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

    # ---------------------------------------------------------------- file format
    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for m in self.hist:
            out[f"edges.{m}"] = np.ascontiguousarray(self.edges[m], dtype=np.float64)
            out[f"hist.{m}"] = np.ascontiguousarray(self.hist[m], dtype=np.int64)
            out[f"mean.{m}"] = np.ascontiguousarray(self.mean[m], dtype=np.float64)
            out[f"m2.{m}"] = np.ascontiguousarray(self.m2[m], dtype=np.float64)
            out[f"nonfinite.{m}"] = np.ascontiguousarray(self.nonfinite[m], dtype=np.int64)
        out["count"] = np.ascontiguousarray(self.count, dtype=np.int64)
        out["token_count"] = np.ascontiguousarray(self.token_count, dtype=np.int64)
        out["reservoir"] = np.ascontiguousarray(self.reservoir, dtype=np.float32)
        out["reservoir_gain"] = np.ascontiguousarray(self.reservoir_gain, dtype=np.float32)
        out["reservoir_len"] = np.ascontiguousarray(self.reservoir_len, dtype=np.int64)
        out["reservoir_keys"] = np.ascontiguousarray(self.reservoir_keys, dtype=np.float64)
        out["doc_features"] = np.ascontiguousarray(self.doc_features, dtype=np.float32)
        out["doc_len"] = np.ascontiguousarray(self.doc_len, dtype=np.int64)
        out["doc_keys"] = np.ascontiguousarray(self.doc_keys, dtype=np.float64)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder, then rename): a reader never sees half a profile."""
        from safetensors.numpy import save_file

        path = Path(path)
        header = dict(self.header, format=FORMAT, format_version=FORMAT_VERSION, classes=list(self.classes),
                      router_layer=int(self.router_layer), metrics=list(self.hist))
        metadata = {"skipprof": json.dumps(jsonable(header), sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile not found: {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ProfileError(f"{path} is truncated or not a skipprof profile (not a readable safetensors file: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            header = json.loads(metadata["skipprof"])
        except (KeyError, ValueError):
            raise ProfileError(f"{path} is a safetensors file without a skipprof profile header") from None
        if header.get("format") != FORMAT:
            raise ProfileError(f"{path} is not a skipprof profile (format {header.get('format')!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise ProfileError(f"{path} has profile format_version {header.get('format_version')!r}; this skipprof "
                               f"reads version {FORMAT_VERSION}")
        try:
            return _from_tensors(header, tensors)
        except (KeyError, ValueError, IndexError) as e:
            raise ProfileError(f"{path} is a damaged profile: {e}") from None


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
        doc_keys=t["doc_keys"], token_count=t.get("token_count"))
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
    for m in p.hist:
        expect[f"hist.{m}"] = (R, L, C, len(p.edges[m]) + 1)
        for name in ("mean", "m2", "nonfinite"):
            expect[f"{name}.{m}"] = (R, L, C)
    tensors = p.tensors()
    for name, shape in expect.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name} has shape {tensors[name].shape}, expected {shape}")
    if p.doc_features.shape[:1] != (C,) or p.doc_keys.shape != p.doc_features.shape[:2]:
        raise ValueError(f"doc_features {p.doc_features.shape} / doc_keys {p.doc_keys.shape} do not match {C} classes")


# -------------------------------------------------------------------------------------------------------------------
# Merging


def merge_profiles(profiles: Sequence[Profile]) -> Profile:
    """Exact merge of profiles of disjoint corpora (same model, same binning); classes are matched by name."""
    if not profiles:
        raise ProfileError("nothing to merge: no profiles given")
    first = profiles[0]
    for i, other in enumerate(profiles[1:], start=1):
        _check_compatible(first, other, i)
    classes: list[str] = []
    for p in profiles:
        classes += [c for c in p.classes if c not in classes]
    R, L, C = len(REGIMES), first.num_layers, len(classes)
    K = min(p.reservoir.shape[2] for p in profiles)
    # Profiles that recorded no documents (e.g. a rank that saw no batch) must not shrink the document sample.
    with_docs = [p for p in profiles if p.doc_len.sum() > 0] or profiles
    D = min(p.doc_features.shape[1] for p in with_docs)
    H = max(p.doc_features.shape[2] for p in with_docs)
    metrics = list(first.hist)
    hist = {m: np.zeros((R, L, C, len(first.edges[m]) + 1), np.int64) for m in metrics}
    nonfinite = {m: np.zeros((R, L, C), np.int64) for m in metrics}
    mean = {m: np.zeros((R, L, C)) for m in metrics}
    m2 = {m: np.zeros((R, L, C)) for m in metrics}
    count = np.zeros((R, L, C), np.int64)
    token_count = np.zeros((R, C), np.int64)
    res_keys = np.full((R, C, K), -np.inf)
    res_rows = {"cos": np.zeros((R, C, K, L), np.float32), "gain": np.zeros((R, C, K, L), np.float32)}
    res_len = np.zeros((R, C), np.int64)
    doc_keys, doc_feat, doc_len = np.full((C, D), -np.inf), np.zeros((C, D, H), np.float32), np.zeros(C, np.int64)
    for p in profiles:
        for pc, name in enumerate(p.classes):
            c = classes.index(name)
            for m in metrics:
                hist[m][:, :, c] += p.hist[m][:, :, pc]
                nonfinite[m][:, :, c] += p.nonfinite[m][:, :, pc]
                _, mean[m][:, :, c], m2[m][:, :, c] = chan_merge(
                    count[:, :, c].astype(np.float64), mean[m][:, :, c], m2[m][:, :, c],
                    p.count[:, :, pc].astype(np.float64), p.mean[m][:, :, pc], p.m2[m][:, :, pc])
            count[:, :, c] += p.count[:, :, pc]
            token_count[:, c] += p.token_count[:, pc]
            for r in range(R):
                n = p.reservoir_len[r, pc]
                keys, rows, res_len[r, c] = merge_reservoir(
                    res_keys[r, c], {"cos": res_rows["cos"][r, c], "gain": res_rows["gain"][r, c]},
                    p.reservoir_keys[r, pc, :n], {"cos": p.reservoir[r, pc, :n], "gain": p.reservoir_gain[r, pc, :n]},
                    K)
                res_keys[r, c], res_rows["cos"][r, c], res_rows["gain"][r, c] = keys, rows["cos"], rows["gain"]
            n = p.doc_len[pc]
            if n and p.doc_features.shape[2] == H:
                keys, rows, doc_len[c] = merge_reservoir(doc_keys[c], {"f": doc_feat[c]}, p.doc_keys[pc, :n],
                                                         {"f": p.doc_features[pc, :n]}, D)
                doc_keys[c], doc_feat[c] = keys, rows["f"]
    header = _merged_header([p.header for p in profiles], token_count, classes)
    return Profile(header=header, classes=classes, edges={m: first.edges[m].copy() for m in metrics}, hist=hist,
                   count=count, mean=mean, m2=m2, nonfinite=nonfinite, reservoir=res_rows["cos"],
                   reservoir_gain=res_rows["gain"], reservoir_len=res_len, reservoir_keys=res_keys,
                   router_layer=first.router_layer, doc_features=doc_feat, doc_len=doc_len, doc_keys=doc_keys,
                   token_count=token_count)


def _check_compatible(a: Profile, b: Profile, index: int) -> None:
    fa = (a.header.get("model") or {}).get("fingerprint")
    fb = (b.header.get("model") or {}).get("fingerprint")
    if fa != fb:
        raise ProfileError(f"profile {index} was made with another model (fingerprint {fb} vs {fa}); only profiles "
                           "of the same model can be merged")
    if list(a.hist) != list(b.hist) or any(not np.array_equal(a.edges[m], b.edges[m]) for m in a.hist):
        raise ProfileError(f"profile {index} uses a different binning; re-profile with the same skipprof version")
    if a.num_layers != b.num_layers:
        raise ProfileError(f"profile {index} has {b.num_layers} layers, the first has {a.num_layers}")
    if a.router_layer != b.router_layer:
        raise ProfileError(f"profile {index} pools documents at layer {b.router_layer}, the first at "
                           f"{a.router_layer}")


def _merged_header(headers: list[dict], token_count: np.ndarray, classes: list[str]) -> dict:
    first = headers[0]
    header = {k: v for k, v in first.items() if k not in ("classes", "metrics", "router_layer")}
    header["corpus"] = [spec for h in headers for spec in (h.get("corpus") or [])]
    header["tokens"] = _token_summary(token_count, classes)
    header["partial"] = any(bool(h.get("partial")) for h in headers)
    header["merged_from"] = len(headers)
    header["created"] = _now()
    for key in ("dtype", "device"):
        values = sorted({str(h.get(key)) for h in headers})
        header[key] = values[0] if len(values) == 1 else values
    header["reservoir_size"] = min(int(h.get("reservoir_size", 0) or 0) for h in headers)
    return header


def _token_summary(token_count: np.ndarray, classes: list[str]) -> dict:
    out: dict[str, Any] = {regime: int(token_count[r].sum()) for r, regime in enumerate(REGIMES)}
    out["by_class"] = {name: {regime: int(token_count[r, c]) for r, regime in enumerate(REGIMES)}
                       for c, name in enumerate(classes)}
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# -------------------------------------------------------------------------------------------------------------------
# Profiling a model


@dataclass
class ProfileSettings:
    generate: int = 0  # greedy tokens generated per prompt and profiled as the decode regime
    reservoir_size: int = DEFAULT_RESERVOIR
    doc_reservoir_size: int = DEFAULT_DOC_RESERVOIR
    seed: int = 0
    router_layer: int | None = None  # default num_layers // 2


@dataclass
class ProgressEvent:
    prompt_tokens: int
    decode_tokens: int
    batches: int


def _metrics_of(t: LayerTensors) -> torch.Tensor:
    """[4, B, S] float32: residual cos, ffn_io cos, norm_ratio, stream_gain (NaN where a norm is 0)."""
    out = t.stream_out.float()
    contribution = t.contribution.float()
    h = out - contribution
    norm_h, norm_out = torch.linalg.vector_norm(h, dim=-1), torch.linalg.vector_norm(out, dim=-1)
    residual = torch.linalg.vecdot(h, out) / (norm_h * norm_out)
    x, y = t.ffn_input.float(), t.ffn_output.float()
    ffn_io = torch.linalg.vecdot(x, y) / (torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1))
    norm_ratio = torch.linalg.vector_norm(contribution, dim=-1) / norm_h
    return torch.stack([residual, ffn_io, norm_ratio, norm_out / norm_h])


class ProfileRecorder:
    """Turns captured layers into accumulator updates: hooks stash [4, B, S] per layer, `commit` bins them all."""

    def __init__(self, num_layers: int, device: torch.device, settings: ProfileSettings, num_classes: int = 0):
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.router_layer = settings.router_layer if settings.router_layer is not None else num_layers // 2
        self.edges = default_edges()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(settings.seed)
        self.stats = {regime: MetricAccumulator(self.edges, num_layers, num_classes, self.device)
                      for regime in REGIMES}
        self.samples = {regime: PriorityReservoir(settings.reservoir_size, num_classes,
                                                  {"cos": (num_layers,), "gain": (num_layers,)}, self.device,
                                                  generator) for regime in REGIMES}
        self.doc_reservoir_size = settings.doc_reservoir_size
        self.generator = generator
        self.docs: PriorityReservoir | None = None
        self._stash: list[torch.Tensor | None] = [None] * num_layers
        self._doc_mean: torch.Tensor | None = None
        self.pool_documents = False
        self.token_mask: torch.Tensor | None = None  # [B, S] bool, set before each forward

    def on_layer(self, t: LayerTensors) -> None:
        self._stash[t.index] = _metrics_of(t)  # computed on the layer's own device (device maps)
        if self.pool_documents and t.index == self.router_layer:
            mask = self.token_mask.to(t.stream_out.device).unsqueeze(-1).to(torch.float32)
            pooled = (t.stream_out.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
            self._doc_mean = pooled.to(self.device)

    def ensure_classes(self, num_classes: int) -> None:
        for regime in REGIMES:
            self.stats[regime].ensure_classes(num_classes)
            self.samples[regime].ensure_classes(num_classes)
        if self.docs is not None:
            self.docs.ensure_classes(num_classes)

    def commit(self, regime: str, class_ids: torch.Tensor) -> int:
        """Bin the stashed forward; returns the number of real tokens counted."""
        stash, self._stash = self._stash, [None] * self.num_layers
        if any(s is None for s in stash):
            missing = [i for i, s in enumerate(stash) if s is None]
            raise RuntimeError(f"the capture hooks saw no FFN in layers {missing[:5]}: the model's forward "
                               "did not run them (is another skip plan applied?)")
        values = torch.stack([s.to(self.device) for s in stash])  # [L, 4, B, S]; 4 floats/token cross devices
        mask = self.token_mask
        token_classes = class_ids.to(self.device)[:, None].expand(mask.shape)[mask]
        picked = values[:, :, mask]  # [L, 4, N]
        per_metric = {m: picked[:, i] for i, m in enumerate(METRICS)}
        self.stats[regime].add(per_metric, token_classes)
        rows_cos, rows_gain = per_metric["residual"].T, per_metric["stream_gain"].T
        finite_rows = torch.isfinite(rows_cos).all(1) & torch.isfinite(rows_gain).all(1)
        self.samples[regime].add(token_classes[finite_rows], cos=rows_cos[finite_rows], gain=rows_gain[finite_rows])
        if self.pool_documents and self._doc_mean is not None:
            if self.docs is None:
                self.docs = PriorityReservoir(self.doc_reservoir_size, self.stats[regime].num_classes,
                                              {"f": (self._doc_mean.shape[-1],)}, self.device, self.generator)
            self.docs.add(class_ids.to(self.device), f=self._doc_mean)
            self._doc_mean = None
        return int(token_classes.numel())

    def to_profile(self, header: dict, classes: list[str]) -> Profile:
        C = len(classes)
        self.ensure_classes(C)
        parts = {regime: self.stats[regime].numpy() for regime in REGIMES}
        samples = {regime: self.samples[regime].numpy() for regime in REGIMES}

        def stack(get: Callable[[dict], np.ndarray]) -> np.ndarray:
            return np.stack([get(parts[regime]) for regime in REGIMES])

        if self.docs is not None:
            docs = self.docs.numpy()
            doc_features, doc_len, doc_keys = docs["f"], docs["len"], docs["keys"]
        else:
            doc_features = np.zeros((C, 0, 0), np.float32)
            doc_len, doc_keys = np.zeros(C, np.int64), np.zeros((C, 0))
        token_count = stack(lambda p: p["tokens"])
        header = dict(header, tokens=_token_summary(token_count, classes), binning=binning_spec(),
                      reservoir_size=self.samples["prompt"].capacity, doc_reservoir_size=self.doc_reservoir_size,
                      router_layer=self.router_layer)
        return Profile(
            header=header, classes=list(classes), edges={m: self.edges[m].copy() for m in METRICS},
            hist={m: stack(lambda p: p["hist"][m]) for m in METRICS}, count=stack(lambda p: p["count"]),
            mean={m: stack(lambda p: p["mean"][m]) for m in METRICS},
            m2={m: stack(lambda p: p["m2"][m]) for m in METRICS},
            nonfinite={m: stack(lambda p: p["nonfinite"][m]) for m in METRICS},
            reservoir=np.stack([samples[r]["cos"] for r in REGIMES]),
            reservoir_gain=np.stack([samples[r]["gain"] for r in REGIMES]),
            reservoir_len=np.stack([samples[r]["len"] for r in REGIMES]),
            reservoir_keys=np.stack([samples[r]["keys"] for r in REGIMES]),
            router_layer=self.router_layer, doc_features=doc_features, doc_len=doc_len, doc_keys=doc_keys,
            token_count=token_count)


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current batch; a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def _graceful_sigint() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first parameter that holds weights (accelerate leaves offloaded ones on `meta`)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def profile_model(model: torch.nn.Module, batches: Iterable[Batch], settings: ProfileSettings | None = None,
                  class_names: Callable[[], list[str]] | list[str] | None = None, header: dict | None = None,
                  on_batch: Callable[[ProgressEvent], None] | None = None, eos_token_ids: Sequence[int] = (),
                  pad_token_id: int = 0) -> Profile:
    """Profile `model` on `batches` (teacher-forced prompt regime, plus `settings.generate` greedy decode tokens per
    prompt). Ctrl-C stops after the current batch and returns a profile with header `partial: true`."""
    settings = settings or ProfileSettings()
    resolved = resolve(model)
    device = _model_device(model)
    recorder = ProfileRecorder(resolved.num_layers, device, settings)
    forward_kwargs = {"use_cache": False}
    if accepts(model, "logits_to_keep"):
        forward_kwargs["logits_to_keep"] = 1  # the prompt pass needs no logits: skip most of the LM head
    pass_positions = accepts(model, "position_ids")
    progress = ProgressEvent(0, 0, 0)
    partial = False
    model_was_training = model.training
    model.eval()
    # A first Ctrl-C stops after the current batch (partial profile); a second one aborts and writes nothing.
    with FFNCapture(model, recorder.on_layer, resolved) as capture, torch.inference_mode(), \
            _graceful_sigint() as stop:
        for batch in batches:
            recorder.ensure_classes(batch.num_classes)
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            recorder.token_mask = mask.bool()
            recorder.pool_documents = True
            model(input_ids=ids, attention_mask=mask, **forward_kwargs)
            progress.prompt_tokens += recorder.commit("prompt", batch.class_ids)
            recorder.pool_documents = False
            if settings.generate > 0:
                progress.decode_tokens += _profile_decode(model, capture, recorder, ids, mask, batch.class_ids,
                                                          settings.generate, eos_token_ids, pad_token_id,
                                                          pass_positions, stop)
            progress.batches += 1
            if on_batch is not None:
                on_batch(progress)
            if stop.requested:
                partial = True
                break
    if model_was_training:
        model.train()
    names = list(class_names() if callable(class_names) else (class_names or []))
    names += [f"class{i}" for i in range(len(names), recorder.stats["prompt"].num_classes)]
    full_header = _base_header(model, device, settings)
    full_header.update(header or {})
    full_header["partial"] = partial
    full_header["router_layer"] = recorder.router_layer
    return recorder.to_profile(full_header, names)


def _profile_decode(model: torch.nn.Module, capture: FFNCapture, recorder: ProfileRecorder, ids: torch.Tensor,
                    mask: torch.Tensor, class_ids: torch.Tensor, new_tokens: int, eos_token_ids: Sequence[int],
                    pad_token_id: int, pass_positions: bool, stop: _StopFlag) -> int:
    """Greedy decoding with the KV cache from left-padded prompts; only real generated tokens are recorded.

    Not `greedy.greedy_decode`: rows are padded, stop at EOS and are recorded step by step; only the step is shared."""
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions",
                                                                                      None)
    lengths = mask.sum(1)
    keep = int(lengths.max())
    if max_positions:
        keep = max(1, min(keep, int(max_positions) - new_tokens))
    ids, mask = _left_pad(ids, mask, keep, pad_token_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_token_ids) or [-1], device=ids.device)
    capture.enabled = False  # the prompt was already profiled by the teacher-forced pass
    try:
        kwargs = {"position_ids": positions} if pass_positions else {}
        next_token, cache = greedy_step(model, ids, None, attention_mask=mask, **kwargs)
    finally:
        capture.enabled = True
    active = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    last_position = positions[:, -1]
    counted = 0
    for _ in range(new_tokens):
        active = active & ~torch.isin(next_token, eos)  # a row that produced EOS stops; EOS is not fed back
        if not bool(active.any()) or stop.requested:
            break
        step_mask = active.to(mask.dtype)[:, None]
        mask = torch.cat([mask, step_mask], dim=1)
        last_position = last_position + 1
        feed = torch.where(active, next_token, torch.full_like(next_token, pad_token_id))[:, None]
        recorder.token_mask = active[:, None]
        kwargs = {"position_ids": last_position[:, None]} if pass_positions else {}
        next_token, cache = greedy_step(model, feed, cache, attention_mask=mask, **kwargs)
        counted += recorder.commit("decode", class_ids)
    return counted


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, keep: int, pad_token_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows -> left-padded rows of width `keep`, each holding its last `keep` real tokens."""
    B = ids.shape[0]
    out_ids = torch.full((B, keep), pad_token_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((B, keep), dtype=mask.dtype, device=mask.device)
    for row, n in enumerate(mask.sum(1).tolist()):
        n_keep = min(int(n), keep)
        if n_keep:
            out_ids[row, keep - n_keep:] = ids[row, int(n) - n_keep:int(n)]
            out_mask[row, keep - n_keep:] = 1
    return out_ids, out_mask


def _base_header(model: torch.nn.Module, device: torch.device, settings: ProfileSettings) -> dict:
    config = getattr(model, "config", None)
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": str(getattr(config, "_name_or_path", "") or type(model).__name__),
                  "fingerprint": model_fingerprint(model),
                  "max_position_embeddings": getattr(config, "max_position_embeddings", None)
                  or getattr(config, "n_positions", None)},
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "corpus": [],
        "partial": False,
        "generate": int(settings.generate),
        "seed": int(settings.seed),
        "versions": package_versions(),
        "created": _now(),
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("skipprofiler", "torch", "transformers", "datasets", "numpy", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


__all__ = ["METRICS", "REGIMES", "Profile", "ProfileError", "merge_profiles", "profile_model", "ProfileSettings",
           "ProgressEvent", "package_versions"]
