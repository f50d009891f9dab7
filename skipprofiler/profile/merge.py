"""Exact merge of profiles of disjoint corpora (same model, same binning): shards, ranks, array jobs."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

import numpy as np

from .histograms import chan_merge, merge_reservoir
from .data import REGIMES, Profile, ProfileError


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
    neurons = first.has_neurons
    if neurons:  # sums: the merge adds them
        N, Hx = first.num_neurons, first.input_sq.shape[-1]
        n_sum, n_sq = np.zeros((R, L, C, N)), np.zeros((R, L, C, N))
        n_count, n_input = np.zeros((R, L, C), np.int64), np.zeros((R, L, C, Hx))
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
            if neurons:
                n_sum[:, :, c] += p.neuron_sum[:, :, pc]
                n_sq[:, :, c] += p.neuron_sq[:, :, pc]
                n_count[:, :, c] += p.neuron_count[:, :, pc]
                n_input[:, :, c] += p.input_sq[:, :, pc]
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
                   token_count=token_count, **({"neuron_sum": n_sum, "neuron_sq": n_sq, "neuron_count": n_count,
                                                "input_sq": n_input} if neurons else {}))


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
    if a.has_neurons != b.has_neurons:
        state = "has no per-neuron FFN statistics and the first has them" if a.has_neurons else \
            "has per-neuron FFN statistics and the first has none"
        raise ProfileError(f"profile {index} {state} (recorded with --no-neurons, for a sparse-MoE model or by an "
                           "older skipprof): merge profiles recorded with the same --neurons setting")
    if a.has_neurons and (a.neuron_sum.shape[-1], a.input_sq.shape[-1]) != (b.neuron_sum.shape[-1],
                                                                            b.input_sq.shape[-1]):
        raise ProfileError(f"profile {index} has neuron statistics of another FFN width")
    if a.header.get("router_pooling", "mean") != b.header.get("router_pooling", "mean"):
        raise ProfileError(f"profile {index} pools documents as {b.header.get('router_pooling', 'mean')!r}, the first "
                           f"as {a.header.get('router_pooling', 'mean')!r}")
    if a.router_layer != b.router_layer:
        raise ProfileError(f"profile {index} pools documents at layer {b.router_layer}, the first at "
                           f"{a.router_layer}")


def _merged_header(headers: list[dict], token_count: np.ndarray, classes: list[str]) -> dict:
    first = headers[0]
    header = {k: v for k, v in first.items() if k not in ("classes", "metrics", "router_layer")}
    header["corpus"] = [spec for h in headers for spec in (h.get("corpus") or [])]
    header["tokens"] = token_summary(token_count, classes)
    header["partial"] = any(bool(h.get("partial")) for h in headers)
    header["merged_from"] = len(headers)
    header["created"] = now()
    for key in ("dtype", "device"):
        values = sorted({str(h.get(key)) for h in headers})
        header[key] = values[0] if len(values) == 1 else values
    header["reservoir_size"] = min(int(h.get("reservoir_size", 0) or 0) for h in headers)
    return header


def token_summary(token_count: np.ndarray, classes: list[str]) -> dict:
    out: dict[str, Any] = {regime: int(token_count[r].sum()) for r, regime in enumerate(REGIMES)}
    out["by_class"] = {name: {regime: int(token_count[r, c]) for r, regime in enumerate(REGIMES)}
                       for c, name in enumerate(classes)}
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
