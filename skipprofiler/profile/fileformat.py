"""The profile file: safetensors tensors plus a JSON header in the safetensors metadata (docs/profile-format.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._jsonable import jsonable
from ..atomic import atomic_path
from .data import METRICS, REGIMES, Profile, ProfileError

FORMAT = "skipprof-profile"
FORMAT_VERSION = 1


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
    return out


def save_profile(p: Profile, path: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same folder, then rename): a reader never sees half a profile."""
    from safetensors.numpy import save_file

    path = Path(path)
    header = dict(p.header, format=FORMAT, format_version=FORMAT_VERSION, classes=list(p.classes),
                  router_layer=int(p.router_layer), metrics=list(p.hist))
    metadata = {"skipprof": json.dumps(jsonable(header), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(to_tensors(p), str(tmp), metadata=metadata)
    return path


def load_profile(path: str | os.PathLike) -> Profile:
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
    tensors = to_tensors(p)
    for name, shape in expect.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name} has shape {tensors[name].shape}, expected {shape}")
    if p.doc_features.shape[:1] != (C,) or p.doc_keys.shape != p.doc_features.shape[:2]:
        raise ValueError(f"doc_features {p.doc_features.shape} / doc_keys {p.doc_keys.shape} do not match {C} classes")
