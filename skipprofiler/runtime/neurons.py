"""Neuron plans (``neurons`` in skipprofiler.plan.model): part of an FFN at decode positions, as an exact
reparametrisation. Imported only for plans that narrow an FFN.

At apply_plan each narrowed FFN's intermediate neurons are permuted once, in place, so the kept ones come first: the
rows of its input projections (gate/up, fc1, c_fc, ...; both halves of a fused ``gate_up_proj``) and their biases, the
columns of its down projection (GPT-2's Conv1D keeps both transposed). The dense function is unchanged; ``remove()``
applies the inverse permutation, bit for bit. No weight is copied (a one-matrix buffer while permuting).

A narrowed call runs the FFN module's own forward -- its activation, gating, biases, Bloom's residual add -- with its
projections patched to compute on weight views of the first k neurons while `Narrowing.width` is set:
``F.linear(x, W[:k], b[:k])`` in, ``F.linear(a, W[:, :k], b) + bias`` out (``bias``: the plan's mean fill), plus
``map_out @ (map_in @ a)`` with fill map (a rank-r map from the kept activations onto the dropped neurons' output);
with fill refit the down projection runs on the kept columns refitted with the plan's regression,
``F.linear(a, W[:, :k] + W[:, k:] @ regression, b) + bias`` (folded once: a copy, the model's own columns still serve
the full rows).

Mixed forwards (teacher forcing with decode_from, prompts beside decode rows, rows at different decode indices) split
the positions: the narrowed rows run the module at width k, the full rows at full width, each part gathered and
scattered back (as GATHER does for skips); skipped rows get the fill. Every position computes what it would in a
plain decode step, and the narrowed rows save their share. OPT (fc1 -> activation -> fc2 inline, no module) runs fc1
full on every row and fc2 narrowed on the narrowed rows (its activation sits between the two calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arch.registry import OUTPUT_PROJECTIONS, RESIDUAL_INSIDE, FFNSite, ResolvedArch, first_tensor
from ..plan.model import STATIC, PlanError, SkipPlan
from .patcher import Patcher
from .schedule import Action, Forward, Kind

# The projections whose output rows are the FFN's neurons, by name inside the FFN module (fused: gate and up halves).
IN_PROJECTIONS = {"gate_proj", "up_proj", "c_fc", "fc_in", "dense_h_to_4h", "fc1", "w1", "w3"}
FUSED_IN_PROJECTIONS = {"gate_up_proj"}
LINEAR, CONV1D, FUSED = "linear", "conv1d", "fused"


class CannotNarrow(ValueError):
    pass


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return LINEAR
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' Conv1D: weight [in, out]
        return CONV1D
    raise CannotNarrow(f"{type(module).__name__} projection")


def projections(site: FFNSite) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str], int]:
    """(input projections with their kind, the down projection with its kind, the number of neurons I); raises
    CannotNarrow naming why (sparse MoE, no single down projection, parameters the rule does not know)."""
    if site.ffn is None:  # OPT
        ins, down = [(site.fc1, _kind(site.fc1))], (site.fc2, _kind(site.fc2))
    else:
        ins, downs, other = [], [], []
        for name, module in site.ffn.named_modules():
            if not name:
                if any(True for _ in module.parameters(recurse=False)):
                    other.append(type(module).__name__)
                continue
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "." in name:
                other.append(name)
            elif leaf in OUTPUT_PROJECTIONS:
                downs.append(module)
            elif leaf in IN_PROJECTIONS or leaf in FUSED_IN_PROJECTIONS:
                ins.append((module, FUSED if leaf in FUSED_IN_PROJECTIONS else _kind(module)))
            else:
                other.append(name)
        if len(downs) != 1 or not ins or other:
            what = (f"parameters outside one dense FFN ({', '.join(other[:3])})" if other else
                    f"{len(downs)} down projections" if len(downs) != 1 else "no input projection")
            raise CannotNarrow(f"{type(site.ffn).__name__} has {what}")
        down = (downs[0], _kind(downs[0]))
        if any(k == FUSED and not isinstance(m, nn.Linear) for m, k in ins):
            raise CannotNarrow("a fused gate_up projection that is not a Linear")
    module, kind = down
    size = int(module.weight.shape[1] if kind == LINEAR else module.weight.shape[0])
    for m, k in ins:
        rows = m.weight.shape[0] if k != CONV1D else m.weight.shape[1]
        if rows != (2 * size if k == FUSED else size):
            raise CannotNarrow(f"projection widths disagree ({rows} rows vs {size} neurons)")
    return ins, down, size


def neuron_problems(plan: SkipPlan, label: str, arch: ResolvedArch) -> list[str]:
    """What keeps this model from running the plan's neuron subsets, one line each."""
    subsets = plan.neurons
    if subsets is None or (not subsets.tensors and subsets.file is None):
        return []
    if plan.mode != STATIC:
        return [f"{label}: neurons need a static plan (mode is {plan.mode})"]
    if not subsets.tensors:
        return [f"{label}: neurons need their index arrays (load the plan from its file, beside which they are stored)"]
    problems, refused = [], {}
    hidden = getattr(arch._config, "hidden_size", None) or getattr(arch._config, "n_embd", None)
    for layer in subsets.layers:
        if not 0 <= layer < arch.num_layers:
            problems.append(f"{label}: neurons: layer {layer} is out of range (the model has {arch.num_layers})")
            continue
        try:
            size = projections(arch.sites[layer])[2]
        except CannotNarrow as e:
            refused.setdefault(str(e), []).append(layer)
            continue
        kept = np.asarray(subsets.kept(layer))
        if kept.ndim != 1 or (kept.size and (kept.min() < 0 or kept.max() >= size)):
            problems.append(f"{label}: neurons: layer {layer} keeps indices out of range (the FFN has {size} neurons, "
                            f"indices {int(kept.min()) if kept.size else 0}..{int(kept.max()) if kept.size else 0})")
        elif np.unique(kept).size != kept.size:
            problems.append(f"{label}: neurons: layer {layer} keeps a neuron twice")
        bias = subsets.bias(layer)
        if bias is not None and hidden and np.asarray(bias).shape != (hidden,):
            problems.append(f"{label}: neurons: layer {layer}'s bias has shape {tuple(np.asarray(bias).shape)}, "
                            f"not ({hidden},)")
        regression = subsets.regression(layer)
        if regression is not None and np.asarray(regression).shape != (size - kept.size, kept.size):
            problems.append(f"{label}: neurons: layer {layer}'s regression has shape "
                            f"{tuple(np.asarray(regression).shape)}, not ({size - kept.size}, {kept.size})")
    for why, layers in refused.items():
        problems.append(f"{label}: neurons: {arch.model_type} cannot run part of an FFN (layers "
                        f"{', '.join(map(str, layers))}: {why}); neuron plans need one dense FFN with a single down "
                        "projection per layer")
    return problems


@dataclass(frozen=True)
class Parts:
    """A mixed forward's positions for one narrowed layer (flattened b * seq + s, on the device)."""

    narrow: torch.Tensor  # LongTensor: rows that run the kept neurons
    full: torch.Tensor | None  # LongTensor: rows that run every neuron (None: none)
    narrow_mask: torch.Tensor  # BoolTensor [P]: the narrowed rows (counts real tokens under padding)


class Narrowing:
    """One FFN's kept neurons: the permutation that moves them first, the narrowed projections, the mean bias."""

    def __init__(self, site: FFNSite, kept: np.ndarray, bias: np.ndarray | None,
                 neuron_map: tuple[np.ndarray, np.ndarray] | None = None, regression: np.ndarray | None = None):
        self.site, self.layer = site, site.index
        self.ins, self.down, self.size = projections(site)
        self.k = int(len(kept))
        self.width: int | None = None  # set while the FFN runs narrowed
        kept = np.asarray(kept, dtype=np.int64)
        self._kept = kept
        self._bias_array = None if bias is None else np.asarray(bias, dtype=np.float32)
        self._bias: torch.Tensor | None = None
        self._map_arrays = None if neuron_map is None else tuple(np.asarray(m, dtype=np.float32) for m in neuron_map)
        self._map: tuple[torch.Tensor, torch.Tensor] | None = None
        # fill refit: the dropped neurons' activations regressed on the kept ones [I - k, k]; folded into the kept
        # down columns at install (`_fold`), the model's own columns untouched
        self._regression = None if regression is None else np.asarray(regression)
        self._refit: torch.Tensor | None = None
        module, kind = self.down
        self.hidden = int(module.weight.shape[0] if kind == LINEAR else module.weight.shape[1])
        # multiply-add FLOPs of one neuron for one row: each input projection's row and the down projection's column
        per_neuron = sum(2 * (m.weight.shape[1] if k != CONV1D else m.weight.shape[0]) * (2 if k == FUSED else 1)
                         for m, k in self.ins) + 2 * self.hidden
        rank = 0 if neuron_map is None else int(self._map_arrays[0].shape[0])
        self.saved_per_row = float((self.size - self.k) * per_neuron - (self.hidden if bias is not None else 0)
                                   - 2 * rank * (self.k + self.hidden))

    def same_as(self, kept: np.ndarray, bias: np.ndarray | None, neuron_map=None, regression=None) -> bool:
        def same(a, b) -> bool:
            return (a is None) == (b is None) and (a is None or np.array_equal(np.asarray(a, dtype=np.float32), b))

        maps = (neuron_map is None) == (self._map_arrays is None) and (
            neuron_map is None or all(same(a, b) for a, b in zip(neuron_map, self._map_arrays)))
        return (np.array_equal(np.asarray(kept, dtype=np.int64), self._kept) and same(bias, self._bias_array) and maps
                and same(regression, self._regression))

    @property
    def extra_elements(self) -> int:
        """Numbers this FFN's plan holds beside the model's weights at run time: the bias, fill map's maps, fill
        refit's folded down columns (hidden x k; the permutation itself copies nothing)."""
        refit = self.hidden * self.k if self._regression is not None else 0
        return refit + int(sum(a.size for a in (self._bias_array, *(self._map_arrays or ())) if a is not None))

    # ---- the reparametrisation -------------------------------------------------------------------------------------

    def order(self) -> torch.Tensor:
        """New position -> old neuron index: the kept neurons first (ascending), then the others."""
        dropped = np.setdiff1d(np.arange(self.size, dtype=np.int64), self._kept)
        return torch.from_numpy(np.concatenate([self._kept, dropped]))

    @torch.no_grad()
    def _reorder(self, order: torch.Tensor) -> None:
        """Permute the neurons in place: parameter i of the result holds old neuron order[i]."""
        def move(param: torch.Tensor | None, dim: int, idx: torch.Tensor) -> None:
            if param is not None:
                param.copy_(param.index_select(dim, idx.to(param.device)))  # one matrix in flight, same storage

        for module, kind in self.ins:
            idx = torch.cat([order, order + self.size]) if kind == FUSED else order
            move(module.weight, 1 if kind == CONV1D else 0, idx)
            move(getattr(module, "bias", None), 0, idx)
        module, kind = self.down
        move(module.weight, 0 if kind == CONV1D else 1, order)

    def install(self, patcher: Patcher) -> None:
        order = self.order()
        self._reorder(order)
        inverse = torch.argsort(order)
        patcher.on_undo(lambda: self._reorder(inverse))
        if self._regression is not None:  # fold now, not in a decode step (a compiled graph would trace the fold)
            self._refit = self._fold()
        if self.site.ffn is not None:  # OPT's fc1/fc2 are wrapped by families.patch_fc_pair, which calls us
            for module, kind in self.ins:
                patcher.set_attr(module, "forward", self._in_forward(module, kind, module.forward))
            module, kind = self.down
            patcher.set_attr(module, "forward", self._down_forward(module, kind, module.forward))

    # ---- narrowed projections --------------------------------------------------------------------------------------

    def _in_forward(self, module: nn.Module, kind: str, original: Callable) -> Callable:
        def forward(x):
            k = self.width
            return original(x) if k is None else narrow_in(module, kind, x, k, self.size)

        return forward

    def _down_forward(self, module: nn.Module, kind: str, original: Callable) -> Callable:
        def forward(a):
            k = self.width
            return original(a) if k is None else self.narrow_down(a)

        return forward

    def narrow_down(self, a: torch.Tensor) -> torch.Tensor:
        """The down projection on the first k neurons of `a` (its last dim: k or more), plus the mean bias."""
        module, kind = self.down
        k = self.k
        a = a[..., :k]
        if self._regression is not None:
            out = F.linear(a, self._refitted(a), module.bias)  # [hidden, k]: Conv1D's bias is [hidden] too
        elif kind == CONV1D:
            out = torch.addmm(module.bias, a.reshape(-1, k), module.weight[:k]).view(*a.shape[:-1], self.hidden)
        else:
            out = F.linear(a, module.weight[:, :k], module.bias)
        if self._bias_array is None:
            return out
        bias = self._bias
        if bias is None or bias.device != out.device or bias.dtype != out.dtype:
            bias = self._bias = torch.from_numpy(self._bias_array).to(device=out.device, dtype=out.dtype)
            if self._map_arrays is not None:
                self._map = tuple(torch.from_numpy(m).to(device=out.device, dtype=out.dtype) for m in self._map_arrays)
        if self._map is not None:
            return out + F.linear(F.linear(a, self._map[0]), self._map[1], bias)
        return out + bias

    def _fold(self) -> torch.Tensor:
        module, kind = self.down
        return fold_regression(module.weight.detach().t() if kind == CONV1D else module.weight.detach(), self.k,
                               self._regression)

    def _refitted(self, a: torch.Tensor) -> torch.Tensor:
        """The folded columns on a's device and dtype (folded at install; again only if the model moved since)."""
        refit = self._refit
        if refit.device != a.device or refit.dtype != a.dtype:
            refit = self._refit = self._fold().to(device=a.device, dtype=a.dtype)
        return refit

    # ---- what a narrowed FFN call computes -------------------------------------------------------------------------

    def run(self, site: FFNSite, forward: Forward, action: Action, original: Callable, x, *args, **kwargs):
        """A patched FFN module's call under a NARROW action (ffn.py)."""
        parts: Parts | None = action.parts
        if parts is None:  # every position narrowed: the module's own forward at width k
            self.width = self.k
            try:
                return original(x, *args, **kwargs)
            finally:
                self.width = None
        flat = x.reshape(-1, x.shape[-1])
        forward.check_rows(flat.shape[0], site.index)
        if site.contribution == RESIDUAL_INSIDE:  # Bloom: mlp(x, residual) returns residual + contribution
            residual = args[0] if args else kwargs["residual"]
            res = residual.reshape(-1, residual.shape[-1])
            out = res + action.filled(flat, res.shape[-1], res)
            inputs = (flat, res)
        else:
            out = action.filled(flat, flat.shape[-1])
            inputs = (flat,)
        for rows, width in ((parts.full, None), (parts.narrow, self.k)):
            if rows is None:
                continue
            self.width = width
            try:
                y = first_tensor(original(*(t.index_select(0, rows).unsqueeze(0) for t in inputs)))
            finally:
                self.width = None
            out = out.index_copy(0, rows, y.reshape(-1, out.shape[-1]).to(out.dtype))
        shape = residual.shape if site.contribution == RESIDUAL_INSIDE else (*x.shape[:-1], out.shape[-1])
        return out.view(shape)

    def fc1(self, forward: Forward, action: Action, original: Callable, x: torch.Tensor) -> torch.Tensor:
        """OPT's fc1 under a NARROW action: the kept neurons when every row is narrowed, else every neuron."""
        forward.check_rows(x.shape[0], self.layer)
        if action.parts is None:
            module, kind = self.ins[0]
            return narrow_in(module, kind, x, self.k, self.size)
        return original(x)

    def fc2(self, action: Action, original: Callable, a: torch.Tensor, ffn_input: torch.Tensor) -> torch.Tensor:
        """OPT's fc2 under a NARROW action: the narrowed rows on the first k columns, the full rows whole."""
        parts: Parts | None = action.parts
        if parts is None:
            return self.narrow_down(a)
        out = action.filled(ffn_input, self.hidden).to(a.dtype)
        if parts.full is not None:
            out = out.index_copy(0, parts.full, original(a.index_select(0, parts.full)).to(out.dtype))
        return out.index_copy(0, parts.narrow, self.narrow_down(a.index_select(0, parts.narrow)).to(out.dtype))


@torch.no_grad()
def fold_regression(weight: torch.Tensor, k: int, regression: np.ndarray) -> torch.Tensor:
    """Fill refit's down columns [hidden, k]: W[:, :k] + W[:, k:] @ regression, `weight` the permuted down weight as
    [hidden, I] (the dropped neurons follow the kept ones in ascending order, as the regression's rows), computed in
    float32 or wider, returned contiguous in the weight's dtype on its device (the runtime and the vLLM plugin)."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    b = torch.from_numpy(np.asarray(regression)).to(device=weight.device, dtype=wide)
    return torch.addmm(weight[:, :k].to(wide), weight[:, k:].to(wide), b).to(weight.dtype).contiguous()


def narrow_in(module: nn.Module, kind: str, x: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """An input projection on its first k neurons (fused gate_up: the first k of each half, side by side)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if kind == CONV1D:
        return torch.addmm(bias[:k], x.reshape(-1, x.shape[-1]), weight[:, :k]).view(*x.shape[:-1], k)
    if kind == FUSED:
        return torch.cat([F.linear(x, weight[:k], None if bias is None else bias[:k]),
                          F.linear(x, weight[size:size + k], None if bias is None else bias[size:size + k])], -1)
    return F.linear(x, weight[:k], None if bias is None else bias[:k])


def install(arch: ResolvedArch, plans: list[SkipPlan], patcher: Patcher) -> dict[int, Narrowing]:
    """Permute and patch every FFN a plan narrows (one subset per layer: the plans must agree); the undo is on
    `patcher`."""
    narrowings: dict[int, Narrowing] = {}
    for plan in plans:  # every check before the first permutation
        subsets = plan.neurons
        for layer in subsets.layers:
            parts = (subsets.kept(layer), subsets.bias(layer), subsets.neuron_map(layer), subsets.regression(layer))
            existing = narrowings.get(layer)
            if existing is None:
                narrowings[layer] = Narrowing(arch.sites[layer], *parts)
            elif not existing.same_as(*parts):
                raise PlanError(f"the selected plans keep different neurons in layer {layer}; apply one class plan "
                                "(prompt_class=...) at a time")
    for narrowing in narrowings.values():
        narrowing.install(patcher)
    return narrowings


def narrow_action(skip: torch.Tensor | None, narrow: torch.Tensor, fill: Any, narrowing: Narrowing,
                  device: torch.device) -> Action:
    """A layer's action from per-position flags (CPU BoolTensors [P]; `skip` wins where both are set): every row
    narrowed is one plain call at width k; otherwise the rows are split (`Parts`)."""
    skipped = skip is not None and bool(skip.any())
    if not skipped and bool(narrow.all()):
        return Action(Kind.NARROW, neurons=narrowing)
    if skipped:
        narrow = narrow & ~skip
    full = ~narrow if not skipped else ~(narrow | skip)
    parts = Parts(narrow.nonzero().flatten().to(device),
                  full.nonzero().flatten().to(device) if bool(full.any()) else None, narrow.to(device))
    return Action(Kind.NARROW, fill, skip=skip.to(device) if skipped else None, neurons=narrowing, parts=parts)
