"""Whole-block baselines, eval only: ShortGPT's layer drop (`DroppedLayers`) and the ReplaceMe-style replacement
(Shopkhoev et al., NeurIPS 2025, arXiv 2505.02819): a contiguous run of n whole decoder blocks replaced by one
least-squares linear map, training-free.

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

from ..fit.substitute import FittedMap, LayerStatistics, LinearStatistics, decode_mask, fit_map, heldout_rows


class DroppedLayers:
    """ShortGPT-style whole-layer drop: the chosen decoder layers return their input (attention and FFN both dropped,
    on every position, prompt included). Restored on exit."""

    def __init__(self, model, layers: Sequence[int]):
        from ..arch.registry import resolve

        self.layers = [resolve(model).layers[i] for i in layers]
        self.handles: list = []

    def __enter__(self):
        def passthrough(module, args, kwargs, output):
            inp = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, (tuple, list)):
                return type(output)((inp,) + tuple(output[1:]))
            return inp

        self.handles = [layer.register_forward_hook(passthrough, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


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


def _streams(model, layers, batches) -> Iterator[tuple]:
    """Per batch: (batch, decode mask, streams) with streams[l] the input of layer l and streams[L] the last output."""
    from .fidelity import model_forward
    from ..arch.registry import first_tensor

    streams: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k: streams.append(first_tensor(a[0] if a else k["hidden_states"])), with_kwargs=True)
        for layer in layers]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: streams.append(first_tensor(out))))
    forward = model_forward(model)
    try:
        with torch.inference_mode():
            for batch in batches:
                streams.clear()
                forward(batch)
                yield batch, decode_mask(batch).to(streams[0].device), streams
    finally:
        for h in handles:
            h.remove()


def fit_block_replacement(model, batches: Sequence, count: int) -> BlockReplacement:
    """Choose the run of `count` middle blocks with the smallest input/output cosine distance on the decode positions
    of `batches` and fit its map there (two forward passes: the choice, then the statistics of the chosen run)."""
    from ..fit.search import middle_layers
    from ..arch.registry import resolve

    layers = resolve(model).layers
    L = len(layers)
    starts = [s for s in middle_layers(L) if s + count - 1 <= middle_layers(L)[-1]]
    if not starts:
        raise ValueError(f"cannot replace {count} blocks of a {L}-layer model (the first and last stay)")
    distance, n = dict.fromkeys(starts, 0.0), 0
    for _, mask, streams in _streams(model, layers, batches):
        n += int(mask.sum())
        for s in starts:
            cos = torch.nn.functional.cosine_similarity(streams[s].float(), streams[s + count].float(), dim=-1)
            distance[s] += float((1 - cos)[mask].double().sum())
    per_start = {s: d / max(n, 1) for s, d in distance.items()}
    start = min(per_start, key=per_start.get)
    d = model.config.hidden_size
    stats = LayerStatistics(LinearStatistics.zeros(d, d), LinearStatistics.zeros(d, d))
    rows_seen = 0
    for batch, mask, streams in _streams(model, layers, batches):
        h_in, h_out = streams[start].float(), streams[start + count].float()
        rows = batch.input_ids.shape[0]
        stats.add_positions(_rms_normalized(h_in), h_out - h_in, h_in, mask, heldout_rows(rows_seen, rows))
        rows_seen += rows
    return BlockReplacement(start, count, fit_map(stats), per_start)


class ReplacedBlocks:
    """Eval only: at decode positions the blocks of `replacement` are replaced by its map (their outputs there are
    overwritten; what they computed is not used). Decode positions: from `decode_from` on in a teacher-forced forward
    (`with replaced.decode_from(prompt_len)`), else every position of a forward that continues a non-empty cache."""

    def __init__(self, model, replacement: BlockReplacement):
        from ..arch.registry import resolve

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
        from ..arch.compat import cache_in
        from ..arch.registry import first_tensor
        from ..runtime.handle import cache_length

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
