"""The ReplaceMe-style baseline (Shopkhoev et al., NeurIPS 2025, arXiv 2505.02819): a contiguous run of n whole decoder
blocks replaced by one least-squares linear map, training-free.

As here: the run [start, start + n) is the one whose input and output stream are closest in cosine on calibration
decode positions (ReplaceMe's choice, ShortGPT's metric over n blocks); the map reads the run's input stream h,
RMS-normalised without weights, and returns what the run adds: ``h_out = h + [h / rms(h)] W + b``, fitted by ridge
least squares (`substitute.fit_map`: λ chosen on held-out windows, attention sinks left out). It is applied at decode
positions only, as skip plans are (the prompt runs every block): the blocks' attention is not run for generated
tokens, so it also saves their attention FLOPs -- a stronger baseline than dropping the blocks everywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .substitute import SINK_NORM_FACTOR, VALIDATION_EVERY, FittedMap, LayerStatistics, LinearStatistics, fit_map


@dataclass
class BlockReplacement:
    start: int
    count: int
    map: FittedMap
    cosine_distance: dict[int, float]  # candidate start -> mean 1 - cos(input of start, output of start + count - 1)

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.count))


def _rms_normalized(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def _decode_mask(batch) -> torch.Tensor:
    pos = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
    return batch.attention_mask.bool() & (pos >= batch.prompt_len)


@contextlib.contextmanager
def _layer_streams(layers) -> Iterator[list]:
    """Per forward: each decoder layer's input stream, then the last layer's output (appended in order)."""
    from .registry import first_tensor

    streams: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k: streams.append(first_tensor(a[0] if a else k["hidden_states"])), with_kwargs=True)
        for layer in layers]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: streams.append(first_tensor(out))))
    try:
        yield streams
    finally:
        for h in handles:
            h.remove()


def fit_block_replacement(model, batches: Sequence, count: int) -> BlockReplacement:
    """Choose the run of `count` middle blocks with the smallest input/output cosine distance on the decode positions
    of `batches` and fit its map there (two forward passes)."""
    from .fidelity import model_forward
    from .refine import middle_layers
    from .registry import resolve

    layers = resolve(model).layers
    L = len(layers)
    starts = [s for s in middle_layers(L) if s + count - 1 <= middle_layers(L)[-1]]
    if not starts:
        raise ValueError(f"cannot replace {count} blocks of a {L}-layer model (the first and last stay)")
    forward = model_forward(model)
    distance = torch.zeros(L, dtype=torch.float64)
    n = 0
    with _layer_streams(layers) as streams, torch.inference_mode():
        for batch in batches:
            streams.clear()
            forward(batch)
            mask = _decode_mask(batch).to(streams[0].device)
            n += int(mask.sum())
            for s in starts:
                cos = torch.nn.functional.cosine_similarity(streams[s].float(), streams[s + count].float(), dim=-1)
                distance[s] += (1 - cos)[mask].double().sum().cpu()
    per_start = {s: float(distance[s] / max(n, 1)) for s in starts}
    start = min(per_start, key=per_start.get)
    d = streams[0].shape[-1] if streams else model.config.hidden_size
    stats = LayerStatistics(LinearStatistics.zeros(d, d), LinearStatistics.zeros(d, d))
    rows_seen = 0
    with _layer_streams(layers) as streams, torch.inference_mode():
        for batch in batches:
            streams.clear()
            forward(batch)
            mask = _decode_mask(batch).to(streams[0].device)
            h_in, h_out = streams[start].float(), streams[start + count].float()
            norms = h_in.norm(dim=-1)
            median = norms.masked_fill(~mask, float("nan")).nanmedian(dim=1, keepdim=True).values
            sink = mask & (norms > SINK_NORM_FACTOR * median)
            keep = mask & ~sink
            rows = torch.arange(rows_seen, rows_seen + batch.input_ids.shape[0])
            held = ((rows % VALIDATION_EVERY) == VALIDATION_EVERY - 1).to(keep.device)[:, None] & keep
            rows_seen += batch.input_ids.shape[0]
            stats.sinks += int(sink.sum())
            x, y = _rms_normalized(h_in), h_out - h_in
            stats.fit.add(x[keep & ~held], y[keep & ~held])
            stats.heldout.add(x[held], y[held])
    return BlockReplacement(start, count, fit_map(stats), per_start)


class ReplacedBlocks:
    """Eval only: at decode positions the blocks of `replacement` are replaced by its map (their outputs there are
    overwritten; what they computed is not used). Decode positions: from `decode_from` on in a teacher-forced forward
    (`with replaced.decode_from(prompt_len)`), else every position of a forward that continues a non-empty cache."""

    def __init__(self, model, replacement: BlockReplacement):
        from .registry import resolve

        self.model, self.replacement = model, replacement
        layers = resolve(model).layers
        self.first, self.last = layers[replacement.start], layers[replacement.start + replacement.count - 1]
        self.handles: list = []
        self._start: int | None = None
        self._decode = False
        self._h_in: torch.Tensor | None = None
        m = replacement.map
        self._w = torch.from_numpy(m.dense_weight())
        self._b = torch.from_numpy(m.bias)

    @contextlib.contextmanager
    def decode_from(self, start: int):
        self._start = start
        try:
            yield self
        finally:
            self._start = None

    def __enter__(self):
        from ._compat import cache_in
        from .registry import first_tensor
        from .runtime.positions import cache_length

        def model_pre(module, args, kwargs):
            self._decode = cache_length(cache_in(kwargs)) > 0

        def keep_input(module, args, kwargs):
            self._h_in = first_tensor(args[0] if args else kwargs["hidden_states"])

        def replace_output(module, args, output):
            out = first_tensor(output)
            if self._start is None and not self._decode:
                return None
            h = self._h_in
            new = h + (_rms_normalized(h.float()) @ self._w.to(h.device) + self._b.to(h.device)).to(h.dtype)
            if self._start is not None:
                pos = torch.arange(out.shape[1], device=out.device)
                new = torch.where((pos >= self._start)[None, :, None], new, out)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        self.handles = [self.model.register_forward_pre_hook(model_pre, with_kwargs=True),
                        self.first.register_forward_pre_hook(keep_input, with_kwargs=True),
                        self.last.register_forward_hook(replace_output)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
