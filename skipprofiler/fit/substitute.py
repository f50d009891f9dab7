"""Linear substitutes for skipped FFNs (`compensation: linear`): a skipped FFN returns ``x @ W + b`` instead of
nothing, where x is what the FFN reads and (W, b) a ridge least-squares fit of the FFN's output on calibration
decode positions (ReplaceMe's training-free idea, per FFN and at decode positions only).

Three pieces, all closed form:

* `LinearStatistics`: the sufficient statistics of one layer's map (count, sums, XᵀX, XᵀY, Σ‖y‖², float64). They are
  sums, so statistics of disjoint data add exactly (`a + b`), whichever process collected them.
* `collect_statistics`: one forward pass over calibration windows with the capture hooks; decode positions only
  (teacher-forced, after a dense prompt), with *attention sinks* left out by a measured rule (a position whose
  residual-stream norm exceeds `SINK_NORM_FACTOR` x the median of its window: in SmolLM2 the first token's norm is
  ~100x the rest, and one such row ruins a least-squares fit). Every `VALIDATION_EVERY`-th document is held out.
* `fit_map`: ridge λ chosen by the held-out windows' squared error (computed from their statistics, no second pass),
  then refitted on all windows; `rank` projects that map onto the top-r directions of its fitted outputs.

Memory: each layer holds 2 x (d+1)² float64 numbers (XᵀX and XᵀY, fit and held-out parts alike): d = 576 (SmolLM2)
5.3 MB a layer; d = 4096 536 MB a layer, 17 GB for 32 layers. `collect_statistics` therefore takes the layers in
groups that fit `max_bytes` (one forward pass per group).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .._jsonable import rounded

log = logging.getLogger("skipprofiler")

SINK_NORM_FACTOR = 8.0  # a decode position whose stream norm is above this multiple of its window's median
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean input variance (mean diagonal of cov(x))
VALIDATION_EVERY = 5  # every 5th calibration document is held out to choose λ
DEFAULT_MAX_BYTES = 4 << 30  # statistics held at once (both parts); more layers take more passes


class SubstituteError(ValueError):
    """Linear substitutes cannot be fitted (no decode positions, unsupported architecture, bad rank)."""


class _Collected(Exception):
    """Raised after the last layer whose statistics are wanted: the rest of the forward (and the LM head) would
    only cost time."""


@dataclass
class LinearStatistics:
    """Sufficient statistics of a least-squares map y ≈ x W + b over some positions (float64, on the host)."""

    n: int
    sx: torch.Tensor  # [d] Σx
    sy: torch.Tensor  # [d] Σy
    xx: torch.Tensor  # [d, d] Σ xᵀx
    xy: torch.Tensor  # [d, d] Σ xᵀy
    yy: float  # Σ ‖y‖²

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> LinearStatistics:
        f = torch.float64
        return cls(0, torch.zeros(d_in, dtype=f), torch.zeros(d_out, dtype=f), torch.zeros(d_in, d_in, dtype=f),
                   torch.zeros(d_in, d_out, dtype=f), 0.0)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows x [N, d_in], y [N, d_out] (any device, any float dtype)."""
        if x.shape[0] == 0:
            return
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx += x.sum(0).cpu()
        self.sy += y.sum(0).cpu()
        self.xx += (x.T @ x).cpu()
        self.xy += (x.T @ y).cpu()
        self.yy += float((y * y).sum())

    def __add__(self, other: LinearStatistics) -> LinearStatistics:
        return LinearStatistics(self.n + other.n, self.sx + other.sx, self.sy + other.sy, self.xx + other.xx,
                                self.xy + other.xy, self.yy + other.yy)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sx, self.sy, self.xx, self.xy))

    def squared_error(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        """Σ ‖y - (x W + b)‖² over these positions, from the statistics alone."""
        w, b = weight.double(), bias.double()
        fitted = float((w * (self.xx @ w)).sum() + 2 * (self.sx @ w) @ b + self.n * (b @ b))
        cross = float((w * self.xy).sum() + b @ self.sy)
        return self.yy - 2 * cross + fitted


@dataclass
class LayerStatistics:
    """One layer's statistics: the fitting part, the held-out part, and the sink positions left out."""

    fit: LinearStatistics
    heldout: LinearStatistics
    sinks: int = 0

    def __add__(self, other: LayerStatistics) -> LayerStatistics:
        return LayerStatistics(self.fit + other.fit, self.heldout + other.heldout, self.sinks + other.sinks)

    @property
    def total(self) -> LinearStatistics:
        return self.fit + self.heldout

    def add_positions(self, x: torch.Tensor, y: torch.Tensor, stream: torch.Tensor, mask: torch.Tensor,
                      heldout_rows: torch.Tensor, sink_factor: float = SINK_NORM_FACTOR) -> None:
        """Add the masked positions of x, y [B, S, d]: attention sinks (a `stream` norm above `sink_factor` x its
        row's median over the mask) are left out and counted; rows flagged in `heldout_rows` [B] go to `heldout`."""
        mask = mask.to(x.device)
        keep = without_sinks(mask, stream, sink_factor)
        sink = mask & ~keep
        held = heldout_rows.to(keep.device)[:, None] & keep
        self.sinks += int(sink.sum())
        self.fit.add(x[keep & ~held], y[keep & ~held])
        self.heldout.add(x[held], y[held])


def without_sinks(mask: torch.Tensor, stream: torch.Tensor, sink_factor: float = SINK_NORM_FACTOR) -> torch.Tensor:
    """`mask` [B, S] less its attention sinks: positions whose residual-stream norm (`stream` [B, S, d]) is above
    `sink_factor` x the median of their row's masked positions."""
    norms = stream.float().norm(dim=-1)
    median = norms.masked_fill(~mask, float("nan")).nanmedian(dim=1, keepdim=True).values
    return mask & ~(norms > sink_factor * median)


@dataclass
class FittedMap:
    """y = x @ weight + bias; reduced rank: y = (x @ down) @ up + bias (numpy float32, as stored in plan files)."""

    bias: np.ndarray  # [d_out]
    weight: np.ndarray | None = None  # [d_in, d_out]
    down: np.ndarray | None = None  # [d_in, r]
    up: np.ndarray | None = None  # [r, d_out]
    record: dict = field(default_factory=dict)  # how it was fitted (λ, held-out errors)

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.bias": self.bias}
        if self.weight is not None:
            out[f"{prefix}.weight"] = self.weight
        else:
            out[f"{prefix}.down"], out[f"{prefix}.up"] = self.down, self.up
        return out

    def dense_weight(self) -> np.ndarray:
        return self.weight if self.weight is not None else self.down @ self.up


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def decode_mask(batch) -> torch.Tensor:
    """[B, S] bool: the real positions of a TokenBatch from its prompt length on (teacher-forced decode positions)."""
    pos = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
    return batch.attention_mask.bool() & (pos >= batch.prompt_len)


def heldout_rows(first_row: int, rows: int, every: int = VALIDATION_EVERY) -> torch.Tensor:
    """[rows] bool: which documents (by running index from `first_row`) are held out to choose λ."""
    index = torch.arange(first_row, first_row + rows)
    return (index % every) == every - 1


def collect_statistics(model, batches: Sequence, layers: Sequence[int], *, plan=None,
                       validation_every: int = VALIDATION_EVERY, sink_factor: float = SINK_NORM_FACTOR,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> dict[int, LayerStatistics]:
    """Per layer in `layers`, the statistics of (FFN input, FFN output) at the decode positions of `batches`
    (fidelity.TokenBatch: positions from `prompt_len` on), with attention sinks left out. Row i of the k-th batch is
    held out when its running document index is a multiple of `validation_every` minus one.

    `plan`: a SkipPlan applied during the pass (its skipped layers produce what the plan substitutes), so a layer's
    statistics can be taken on the inputs the plan's earlier layers produce (error-aware fits). A layer the plan
    skips must not be in `layers`."""
    from ..arch.capture import FFNCapture
    from ..evaluation.fidelity import model_forward
    from ..arch.registry import resolve
    from ..runtime import apply_plan

    arch = resolve(model)
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        return {}
    if plan is not None and set(plan.skip_layers) & set(layers):
        raise SubstituteError("statistics of a layer the applied plan skips would describe its substitute")
    d = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd"))
    per_layer = 2 * LinearStatistics.zeros(d, d).nbytes
    group = max(1, int(max_bytes // per_layer))
    out: dict[int, LayerStatistics] = {}
    forward = model_forward(model)
    for start in range(0, len(layers), group):
        wanted = set(layers[start:start + group])
        stats = {l: LayerStatistics(LinearStatistics.zeros(d, d), LinearStatistics.zeros(d, d)) for l in wanted}
        state: dict[str, torch.Tensor] = {}

        def on_layer(t, stats=stats, wanted=wanted):
            if t.index not in wanted:
                return
            stats[t.index].add_positions(t.ffn_input, t.ffn_output, t.stream_in_ffn, state["mask"],
                                         state["heldout"], sink_factor)

        def stop(module, args, output):
            raise _Collected

        rows_seen = 0
        with FFNCapture(model, on_layer, arch), torch.inference_mode():
            stopper = arch.layers[max(wanted)].register_forward_hook(stop)  # after the capture's own hook
            try:
                for batch in batches:
                    rows = batch.input_ids.shape[0]
                    state["heldout"] = heldout_rows(rows_seen, rows, validation_every)
                    state["mask"] = decode_mask(batch)
                    rows_seen += rows
                    try:
                        if plan is None:
                            forward(batch)
                        else:
                            with apply_plan(model, plan) as handle, handle.decode_from(batch.prompt_len):
                                forward(batch)
                    except _Collected:
                        pass
            finally:
                stopper.remove()
        out.update(stats)
    empty = [l for l, s in out.items() if s.fit.n == 0 or s.heldout.n == 0]
    if empty:
        raise SubstituteError(f"no calibration decode positions to fit layers {empty} on (fitting and held-out "
                              f"parts both need some; {rows_seen} documents)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fit


def _ridge(stats: LinearStatistics, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, b, cov_x) of the centred ridge fit with penalty lam x the mean input variance."""
    n = stats.n
    mx, my = stats.sx / n, stats.sy / n
    cxx = stats.xx / n - torch.outer(mx, mx)
    cxy = stats.xy / n - torch.outer(mx, my)
    scale = float(torch.diagonal(cxx).mean().clamp(min=1e-30))
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype)
    w = torch.linalg.solve(cxx + lam * scale * eye, cxy)
    return w, my - mx @ w, cxx


def _reduce_rank(w: torch.Tensor, cxx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up): W projected onto the top-`rank` eigenvectors of the fitted outputs' covariance Wᵀ cov(x) W."""
    cov = w.T @ cxx @ w
    _, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    top = vecs[:, -rank:]  # eigh sorts ascending
    return w @ top, top.T


def _as_map(w, b, rank_parts, record) -> FittedMap:
    f32 = lambda t: t.to(torch.float32).numpy().copy()  # noqa: E731
    if rank_parts is None:
        return FittedMap(bias=f32(b), weight=f32(w), record=record)
    down, up = rank_parts
    return FittedMap(bias=f32(b), down=f32(down), up=f32(up), record=record)


def fit_map(stats: LayerStatistics, rank: int | None = None,
            lambdas: Sequence[float] = RIDGE_LAMBDAS) -> FittedMap:
    """The full-rank map with the λ whose held-out squared error is lowest, refitted on all positions; with `rank`,
    then projected onto the top-r directions of its fitted outputs (one eigendecomposition: at d = 4096 choosing λ
    per rank would cost one per λ). `record`: λ, held-out relative error (error / Σ‖y‖²) of the chosen map (before
    the projection) and of the mean output, the positions used and the sinks left out."""
    if rank is not None and not 0 < rank:
        raise SubstituteError(f"rank must be >= 1, got {rank}")
    d = stats.fit.sx.shape[0]
    if rank is not None and rank >= d:
        rank = None  # a rank as large as the width is the full map
    held = stats.heldout
    errors = []
    for lam in lambdas:
        w, b, _ = _ridge(stats.fit, lam)
        errors.append(held.squared_error(w, b))
    best = int(np.argmin(errors))
    lam = lambdas[best]
    total = stats.total
    w, b, cxx = _ridge(total, lam)
    parts = None
    if rank is not None:
        parts = _reduce_rank(w, cxx, rank)
        b = total.sy / total.n - (total.sx / total.n) @ (parts[0] @ parts[1])
    mean_err = held.squared_error(torch.zeros_like(w), stats.fit.sy / stats.fit.n)
    record = {"lambda": lam, "heldout_error": rounded(errors[best] / held.yy),
              "heldout_error_mean": rounded(mean_err / held.yy),
              "tokens": total.n, "heldout_tokens": held.n, "sinks_left_out": stats.sinks}
    return _as_map(w, b, parts, record)


def calibration_batches(model, tokenizer, data_spec: str | None, *, skip_docs_per_class: int, docs_per_class: int,
                        prompt_len: int, gen_len: int, batch_size: int = 16, text_column: str | None = None,
                        class_column: str | None = None, only_class: str | None = None) -> list:
    """Token batches of calibration windows (prompt_len + gen_len tokens) for statistics, per class, leaving out each
    class's first `skip_docs_per_class` documents (the windows a layer search measures its sets on); `only_class`:
    that class's documents only."""
    from ..evaluation.fidelity import prepare_windows

    def select(docs: list) -> list:
        if only_class is not None:
            docs = [doc for doc in docs if doc.cls == only_class]
            if not docs:
                raise SubstituteError(f"no calibration document of class {only_class!r}")
        seen: dict[str, int] = {}
        rest = []
        for doc in docs:
            seen[doc.cls] = seen.get(doc.cls, 0) + 1
            if seen[doc.cls] > skip_docs_per_class:
                rest.append(doc)
        return rest or docs  # too little data to keep the sets apart: fit on the same documents

    return prepare_windows(model, tokenizer, data_spec, split="calibration", window=prompt_len + gen_len,
                           min_len=prompt_len + 2, prompt_len=prompt_len, batch_size=batch_size,
                           per_class=docs_per_class, text_column=text_column, class_column=class_column,
                           select=select, by_class=False).batches


def fit_substitutes(model, batches: Sequence, layers: Sequence[int], rank: int | None = None, *,
                    plan=None, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[int, FittedMap]:
    """Statistics on `batches` and one fitted map per layer (see `collect_statistics`, `fit_map`)."""
    started = time.perf_counter()
    stats = collect_statistics(model, batches, layers, plan=plan, max_bytes=max_bytes)
    maps = {l: fit_map(s, rank) for l, s in sorted(stats.items())}
    log.info("linear substitutes: %d layers fitted on %d decode positions in %.0f s", len(maps),
             next(iter(stats.values())).total.n if stats else 0, time.perf_counter() - started)
    return maps
