"""The one place that registers (and removes) profiling hooks: per decoder layer, the FFN's input, raw output, its
contribution to the residual stream and the layer's output, in the registry's uniform decomposition
(``h = stream_out - contribution``; see registry.py).

Usage::

    with FFNCapture(model, on_layer) as capture:   # on_layer(LayerTensors) runs inside the layer's forward hook
        model(input_ids, attention_mask=mask)

Hooks stay cheap: they only keep references (a clone where the model mutates the FFN output in place, Falcon) and
hand the tensors to `on_layer` once the layer has returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .registry import FFN_OUTPUT, POST_NORM_OUTPUT, RESIDUAL_INSIDE, FFNSite, ResolvedArch, first_tensor, resolve


@dataclass
class LayerTensors:
    """One decoder layer's forward, every tensor shaped like the layer output [B, S, H]."""

    index: int
    ffn_input: torch.Tensor  # what the FFN read (after its pre-norm, if any)
    ffn_output: torch.Tensor  # the FFN's raw output (Bloom: without the residual it adds inside)
    contribution: torch.Tensor  # what the FFN added to the stream (after post-norm / multiplier)
    stream_out: torch.Tensor  # the layer's output

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


class _SiteHooks:
    """Hooks on one FFN site; fills `slot` during the layer's forward."""

    def __init__(self, site: FFNSite, deliver: Callable[[LayerTensors], None], capture: "FFNCapture"):
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
        self.deliver(LayerTensors(self.site.index, slot["input"].reshape(shape), ffn_output, contribution,
                                  stream_out))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class FFNCapture:
    """Registers the hooks on every FFN site of `model`; `remove()` (or leaving the `with`) takes them all off.

    Set `enabled = False` to let forwards pass untouched (e.g. the prefill of a decode loop).
    """

    def __init__(self, model: nn.Module, on_layer: Callable[[LayerTensors], None],
                 resolved: ResolvedArch | None = None):
        self.resolved = resolved if resolved is not None else resolve(model)
        self.enabled = True
        self._sites = [_SiteHooks(site, on_layer, self) for site in self.resolved.sites]

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


__all__ = ["FFNCapture", "LayerTensors", "FFN_OUTPUT", "POST_NORM_OUTPUT", "RESIDUAL_INSIDE"]
