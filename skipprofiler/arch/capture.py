"""The one place that registers (and removes) profiling hooks: per decoder layer, the FFN's input, raw output, its
contribution to the residual stream and the layer's output, in the registry's uniform decomposition
(``h = stream_out - contribution``; see registry.py).

Usage::

    with FFNCapture(model, on_layer) as capture:   # on_layer(LayerTensors) runs inside the layer's forward hook
        model(input_ids, attention_mask=mask)

Hooks stay cheap: they only keep references (a clone where the model mutates the FFN output in place, Falcon) and
hand the tensors to `on_layer` once the layer has returned.

With ``FFNCapture(model, on_layer, neurons=True)`` a pre-hook on each FFN's down projection also keeps that
projection's input, the FFN's intermediate activation ``a`` (``act(gate x) * (up x)`` in gated FFNs, ``act(fc1 x)``
in plain ones), as `LayerTensors.ffn_hidden`. `down_projection(site)` finds that projection and says why when an FFN
has none (sparse-MoE blocks); `down_weight(module)` reads its weight as ``[out, intermediate]`` whatever the layer
type (GPT-2's Conv1D keeps it transposed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .registry import (FFN_OUTPUT, OUTPUT_PROJECTIONS, POST_NORM_OUTPUT, RESIDUAL_INSIDE, FFNSite, ResolvedArch,
                       first_tensor, resolve)


@dataclass
class LayerTensors:
    """One decoder layer's forward, every tensor shaped like the layer output [B, S, H]."""

    index: int
    ffn_input: torch.Tensor  # what the FFN read (after its pre-norm, if any)
    ffn_output: torch.Tensor  # the FFN's raw output (Bloom: without the residual it adds inside)
    contribution: torch.Tensor  # what the FFN added to the stream (after post-norm / multiplier)
    stream_out: torch.Tensor  # the layer's output
    ffn_hidden: torch.Tensor | None = None  # [B, S, I] the down projection's input (only with neurons=True)

    @property
    def stream_in_ffn(self) -> torch.Tensor:
        """h: the residual stream entering the FFN sub-block."""
        return self.stream_out - self.contribution


def _first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


class NoNeuronSite(ValueError):
    """An FFN without one down projection whose input is the per-neuron activation (e.g. a sparse-MoE block)."""


def down_projection(site: FFNSite) -> tuple[str, nn.Module]:
    """(path inside the FFN module, module) of the FFN's down projection: the one module whose input is the FFN's
    intermediate activation. OPT: ("fc2", fc2). Raises NoNeuronSite when there is none or several (sparse MoE: one
    per expert, or fused experts keeping theirs as a parameter)."""
    if site.ffn is None:
        return "fc2", site.fc2
    fused = [f"{name}.{p}".lstrip(".") for name, mod in site.ffn.named_modules()
             for p, _ in mod.named_parameters(recurse=False) if p in OUTPUT_PROJECTIONS]
    found = [(name, mod) for name, mod in site.ffn.named_modules()
             if name and name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS and getattr(mod, "weight", None) is not None]
    if fused or len(found) != 1:
        what = (f"keeps its experts' down projections fused ({fused[0]})" if fused else
                f"has {len(found)} down projections ({', '.join(n for n, _ in found[:3])})" if found else
                "has no down projection")
        raise NoNeuronSite(f"layer {site.index}'s FFN ({type(site.ffn).__name__}) {what}: per-neuron statistics "
                           "need one dense FFN per layer; sparse-MoE blocks are not supported")
    return found[0]


def down_weight(module: nn.Module) -> torch.Tensor:
    """The down projection's weight as [out, intermediate] (column j = neuron j's output direction)."""
    weight = module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' Conv1D: weight [in, out]
        return weight.T
    return weight


def intermediate_size(module: nn.Module) -> int:
    """Width of the down projection's input (the number of FFN neurons)."""
    size = getattr(module, "in_features", None)
    if size is None:
        size = down_weight(module).shape[1]
    return int(size)


class _SiteHooks:
    """Hooks on one FFN site; fills `slot` during the layer's forward."""

    def __init__(self, site: FFNSite, deliver: Callable[[LayerTensors], None], capture: "FFNCapture",
                 neurons: bool = False):
        self.site = site
        self.deliver = deliver
        self.capture = capture
        self.slot: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        if site.ffn is None:  # OPT: fc1 input and fc2 output, both flattened to [B*S, H]
            self.handles.append(site.fc1.register_forward_pre_hook(self._fc1_pre))
            self.handles.append(site.fc2.register_forward_hook(self._fc2_out))
        else:
            self.handles.append(site.ffn.register_forward_hook(self._ffn_out, with_kwargs=True))
        if site.contribution == POST_NORM_OUTPUT:
            self.handles.append(site.post_norm.register_forward_hook(self._post_norm_out))
        self.handles.append(site.layer.register_forward_hook(self._layer_out))
        self.neurons = neurons
        if neurons:
            self.handles.append(down_projection(site)[1].register_forward_pre_hook(self._down_pre))

    def _down_pre(self, module: nn.Module, args: tuple) -> None:
        if self.capture.enabled:
            self.slot["hidden"] = args[0]

    def _fc1_pre(self, module: nn.Module, args: tuple) -> None:
        if self.capture.enabled:
            self.slot["input"] = args[0]

    def _fc2_out(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.capture.enabled:
            self.slot["output"] = first_tensor(output)

    def _ffn_out(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self.capture.enabled:
            return
        out = first_tensor(output)
        if self.site.ffn_output_mutated:  # Falcon adds attention into this very tensor after we return
            out = out.clone()
        self.slot["input"] = _first_input(args, kwargs)
        self.slot["output"] = out
        if self.site.contribution == RESIDUAL_INSIDE:
            residual = args[1] if len(args) > 1 else kwargs["residual"]
            self.slot["output"] = out - residual  # Bloom's MLP returns residual + dense_4h_to_h(...)

    def _post_norm_out(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.capture.enabled and "output" in self.slot:  # the post-norm that follows this layer's FFN
            self.slot["contribution"] = first_tensor(output)

    def _layer_out(self, module: nn.Module, args: tuple, output: Any) -> None:
        slot, self.slot = self.slot, {}
        if not self.capture.enabled or "output" not in slot:
            return  # disabled, or the FFN did not run (e.g. skipped by a plan)
        stream_out = first_tensor(output)
        shape = stream_out.shape
        ffn_output = slot["output"].reshape(shape)
        if self.site.contribution == POST_NORM_OUTPUT:
            contribution = slot["contribution"].reshape(shape)
        elif self.site.multiplier != 1.0:
            contribution = ffn_output * self.site.multiplier
        else:
            contribution = ffn_output
        hidden = None
        if self.neurons:
            if "hidden" not in slot:
                raise RuntimeError(f"layer {self.site.index}: the FFN ran but its down projection was not called as a "
                                   "module (e.g. Bloom's slow_but_exact tensor parallelism): no neuron statistics")
            hidden = slot["hidden"].reshape(*shape[:-1], -1)
        self.deliver(LayerTensors(self.site.index, slot["input"].reshape(shape), ffn_output, contribution,
                                  stream_out, hidden))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class FFNCapture:
    """Registers the hooks on every FFN site of `model`; `remove()` (or leaving the `with`) takes them all off.

    Set `enabled = False` to let forwards pass untouched (e.g. the prefill of a decode loop). `neurons=True` also
    delivers each FFN's intermediate activation (`LayerTensors.ffn_hidden`); it raises NoNeuronSite up front for
    FFNs without one down projection (sparse MoE).
    """

    def __init__(self, model: nn.Module, on_layer: Callable[[LayerTensors], None],
                 resolved: ResolvedArch | None = None, neurons: bool = False):
        self.resolved = resolved if resolved is not None else resolve(model)
        self.enabled = True
        if neurons:
            for site in self.resolved.sites:
                down_projection(site)  # refuse before any hook is registered
        self._sites = [_SiteHooks(site, on_layer, self, neurons) for site in self.resolved.sites]

    @property
    def num_layers(self) -> int:
        return self.resolved.num_layers

    def remove(self) -> None:
        for site in self._sites:
            site.remove()
        self._sites.clear()

    def __enter__(self) -> "FFNCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


__all__ = ["FFNCapture", "LayerTensors", "NoNeuronSite", "down_projection", "down_weight", "intermediate_size",
           "FFN_OUTPUT", "POST_NORM_OUTPUT", "RESIDUAL_INSIDE"]
